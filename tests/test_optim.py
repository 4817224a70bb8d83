import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels import parallel
from jaxmodels.config import default_config
from jaxmodels.models import CNN, TransformerConfig, TransformerLM
from jaxmodels.models.transformer import scan_to_unrolled
from jaxmodels.optim import (
  decay_mask,
  freezing,
  make_optimizer,
  make_optimizer_from_config,
  make_schedule,
  make_schedule_from_config,
  pruning,
)
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.actions import summarize
from jaxmodels.train.experiment import build_experiment


def train_config(**kw):
  t = default_config().train
  for k, v in kw.items():
    t[k] = v
  return t


def test_decay_mask_skips_biases_and_norm_scales():
  model = CNN((8, 8, 1), 10, features=(4,), kernel_sizes=(3,), strides=(1,), norm="layer", rngs=nnx.Rngs(0))
  mask = decay_mask(nnx.state(model, nnx.Param))
  assert mask["convs"][0]["kernel"].get_value() is True
  assert mask["out"]["kernel"].get_value() is True
  assert mask["convs"][0]["bias"].get_value() is False
  assert mask["norms"][0]["scale"].get_value() is False
  assert mask["norms"][0]["bias"].get_value() is False


def test_decay_mask_goes_by_role_not_rank():
  m = TransformerConfig(d_model=8, num_heads=2, num_layers=2, d_ff=16, max_len=8, norm="rms", mlp="swiglu",
                        positions="learned", tie_embeddings=True, dropout=0.0, scan_layers=True, remat="none",
                        attention_impl="einsum")
  params = nnx.to_pure_dict(nnx.state(TransformerLM(11, m, rngs=nnx.Rngs(0)), nnx.Param))
  for decay_embeddings in (True, False):
    mask = decay_mask(params, decay_embeddings)
    blocks = mask["stack"]["blocks"]
    assert blocks["attn"]["query"]["kernel"] and blocks["mlp"]["down"]["kernel"]  # (layers, in, out)
    assert not blocks["attn_norm"]["scale"] and not mask["stack"]["final_norm"]["scale"]  # (layers, d) and (d,)
    assert mask["embed"]["embedding"] is mask["pos_embed"]["embedding"] is decay_embeddings
    unrolled = decay_mask(scan_to_unrolled(params), decay_embeddings)
    assert unrolled["stack"]["blocks"][0] == unrolled["stack"]["blocks"][1] == blocks


def test_scanned_and_unrolled_transformers_train_alike_under_weight_decay():
  # Same parameters, same batches, weight_decay=0.1: a mask by rank decayed the scanned (layers, d) norm
  # scales only, and the two runs drifted 1e-4 apart in 30 steps.
  runs = {}
  for scan in (True, False):
    c = experiment("text_transformer")
    c.data.seq_len = 16
    c.model.update(dict(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=16, scan_layers=scan))
    c.train.update(dict(batch_size=8, steps=30, warmup_steps=5, weight_decay=0.1))
    runs[scan] = build_experiment(c)
  scanned = runs[True].init_state()
  params = jax.device_get(scan_to_unrolled(scanned.params))
  unrolled = runs[False].init_state().replace(params=params, opt_state=runs[False].tx.init(params))
  losses = {}
  for scan, state in ((True, scanned), (False, unrolled)):
    exp = runs[scan]
    for step in range(30):
      state, metrics = exp.train_step(state, exp.batch(step))
    losses[scan] = summarize(np.stack(parallel.fetch([metrics])))["loss"]
  assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_weight_decay_changes_kernels_not_biases(optimizer):
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  tx, _ = make_optimizer(optimizer=optimizer, weight_decay=0.1, schedule="constant", learning_rate=0.5)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.all(np.asarray(updates["kernel"]) < 0)  # decayed towards zero
  assert np.all(np.asarray(updates["bias"]) == 0)


def test_warmup_cosine_schedule():
  s = make_schedule(schedule="cosine", learning_rate=1.0, warmup_steps=10, steps=110, end_lr_fraction=0.1)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine to 0.1
  assert float(s(110)) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
  lin = make_schedule(schedule="linear", learning_rate=2.0, warmup_steps=4, steps=24)
  assert [float(lin(i)) for i in (0, 2, 4, 14, 24)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])
  const = make_schedule(schedule="constant", learning_rate=0.3, warmup_steps=0)
  assert float(const(0)) == float(const(1000)) == pytest.approx(0.3)


def test_global_norm_clipping():
  tx, _ = make_optimizer(optimizer="sgd", momentum=0.0, schedule="constant", learning_rate=1.0, grad_clip=1.0)
  params = {"w": jnp.zeros((4,))}
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0)


def test_nesterov_differs_from_plain_momentum():
  params = {"w": jnp.zeros(())}
  outs = []
  for nesterov in (False, True):
    tx, _ = make_optimizer(optimizer="sgd", nesterov=nesterov, schedule="constant")
    state = tx.init(params)
    for _ in range(2):
      upd, state = tx.update({"w": jnp.ones(())}, state, params)
    outs.append(float(upd["w"]))
  assert outs[0] != pytest.approx(outs[1])


def test_bad_optimizer_and_schedule_names():
  with pytest.raises(UserError, match="train.optimizer"):
    make_optimizer(optimizer="lion")
  with pytest.raises(UserError, match="train.schedule"):
    make_schedule(schedule="step")
  with pytest.raises(UserError, match="warmup_steps"):
    make_schedule(warmup_steps=10, steps=10)


def test_shortened_runs_keep_a_valid_warmup():
  from conftest import experiment  # pylint: disable=import-outside-toplevel

  from jaxmodels.config import fit_to_steps  # pylint: disable=import-outside-toplevel
  c = experiment("text_transformer")
  assert c.train.warmup_steps == 100
  c.train.steps = 20
  notices = fit_to_steps(c)
  assert c.train.warmup_steps == 2 and "warming up over 2 steps" in notices[0]
  make_schedule_from_config(c.train)  # valid now
  c.train.update(steps=1000, warmup_steps=100, profile_steps=(2000, 2001))
  assert len(fit_to_steps(c)) == 1 and c.train.warmup_steps == 100  # only the profile window is reported


def test_plain_arguments_train_as_the_config_group():
  kw = dict(optimizer="adamw", learning_rate=0.05, schedule="linear", warmup_steps=2, steps=6, end_lr_fraction=0.1,
            weight_decay=0.1, decay_embeddings=False, b1=0.8, b2=0.99, grad_clip=0.5)
  prune = dict(sparsity=0.5, start_step=1, end_step=3, every=1)
  t = train_config(**kw)
  t.pruning.update(prune)
  plain, lr = make_optimizer(**kw, prune=pruning.magnitude_pruning(**prune))
  grouped, grouped_lr = make_optimizer_from_config(t)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32), "bias": jnp.zeros(4)}}
  states = [plain.init(params), grouped.init(params)]
  for step in range(6):
    grads = jax.tree.map(lambda p, s=step: jnp.full_like(p, s - 2.5) + p, params)
    (u1, states[0]), (u2, states[1]) = (tx.update(grads, s, params) for tx, s in zip((plain, grouped), states))
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    assert float(lr(step)) == float(grouped_lr(step)) == float(make_schedule_from_config(t)(step))
    params = optax.apply_updates(params, u1)
  assert float(jnp.mean(params["dense"]["kernel"] == 0)) == 0.5  # pruning took part


def test_factory_defaults_are_the_configs_and_typos_are_type_errors():
  t = default_config().train
  for fn in (make_optimizer, make_schedule):
    params = inspect.signature(fn).parameters
    not_keys = ("prune", "trainable")
    assert {k: p.default for k, p in params.items() if k not in not_keys} == {k: t[k] for k in params
                                                                              if k not in not_keys}
  assert inspect.signature(make_optimizer).parameters["prune"].default is pruning.from_config(t) is None
  assert inspect.signature(make_optimizer).parameters["trainable"].default is freezing.from_config(t) is None
  with pytest.raises(TypeError, match="learnig_rate"):
    make_optimizer(learnig_rate=1.0)
  with pytest.raises(TypeError, match="warmup"):
    make_schedule(warmup=3)
