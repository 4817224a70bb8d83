"""Fine-tuning: LoRA (jaxmodels.models.lora), freezing and learning-rate multipliers (jaxmodels.optim.freezing)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import experiment, read_metrics
from flax import nnx

import jaxmodels
from jaxmodels.models import MLP, TransformerLM
from jaxmodels.models.lora import LoRALinear, apply_lora, merge_lora
from jaxmodels.optim import freezing, make_optimizer
from jaxmodels.runs.export import export, load_run_model
from jaxmodels.runs.state import split_model
from jaxmodels.runtime.errors import UserError
from jaxmodels.tools.compress import compress
from jaxmodels.train import Trainer
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate

LORA = dict(rank=4, alpha=8.0, targets=("hidden", "out"))


def mlp_config(steps, **train):
  c = experiment("digits_mlp")
  c.model.hidden_sizes = (32,)
  # a constant rate: a run of 5 steps resumed to 10 takes the steps of one of 10
  c.train.update(dict(steps=steps, schedule="constant", warmup_steps=0, log_every=5, eval_every=steps, **train))
  c.checkpoint.every = 5
  return c


def flat(params) -> dict:
  return {freezing.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A base digits MLP (10 steps) and a LoRA run started from its parameters (10 steps)."""
  base, tuned = (str(tmp_path_factory.mktemp(n)) for n in ("base", "lora"))
  train_and_evaluate(mlp_config(10), base)
  lora_run(10, base, tuned)
  return base, tuned


def lora_run(steps, base, workdir):
  c = mlp_config(steps)
  c.train.lora.update(LORA)
  c.checkpoint.restore_from = base
  train_and_evaluate(c, workdir)


def test_lora_run_trains_only_the_adapters_and_keeps_optimizer_state_for_them_alone(runs):
  base, tuned = runs
  before = flat(split_model(load_run_model(base))[1])
  after = flat(split_model(load_run_model(tuned, log=lambda _: None))[1])
  adapters = {k for k in after if freezing.is_adapter(k)}
  assert adapters == {"hidden/0/lora_a", "hidden/0/lora_b", "out/lora_a", "out/lora_b"}
  assert set(after) - adapters == set(before)
  for k in before:  # every base weight bit-identical
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert np.abs(after["out/lora_b"]).max() > 0 and np.abs(after["hidden/0/lora_b"]).max() > 0  # B starts at 0

  c = mlp_config(10)
  c.train.lora.update(LORA)
  lora_state = build_experiment(c).checkpoint_state
  full_state = build_experiment(mlp_config(10)).checkpoint_state
  adapter_bytes = nbytes({k: v for k, v in flat(lora_state.params).items() if freezing.is_adapter(k)})
  moments = lambda state: [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # adamw's mu and nu
  assert nbytes(moments(lora_state)) == 2 * adapter_bytes
  assert nbytes(moments(full_state)) == 2 * nbytes(full_state.params) > 4 * nbytes(moments(lora_state))


def test_merged_export_matches_the_unmerged_model_and_keep_adapters_keeps_them(runs, tmp_path):
  _, tuned = runs
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 1)), jnp.float32)
  unmerged = load_run_model(tuned, log=lambda _: None)
  assert isinstance(unmerged.out, LoRALinear)
  merged = export(tuned, str(tmp_path / "merged"))
  model = jaxmodels.load_model(merged)
  assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))
  assert json.loads((tmp_path / "merged" / "config.json").read_text())["train"]["lora"]["rank"] == 0
  np.testing.assert_allclose(model(x), unmerged(x), atol=1e-5, rtol=0)
  kept = jaxmodels.load_model(export(tuned, str(tmp_path / "kept"), merge_lora=False))
  assert isinstance(kept.out, LoRALinear)
  np.testing.assert_array_equal(kept(x), unmerged(x))
  compress(tuned, "prune", str(tmp_path / "pruned"), sparsity=0.5, repeats=1)  # compresses the merged model
  pruned = jaxmodels.load_model(str(tmp_path / "pruned"))
  assert type(pruned.out) is nnx.Linear and float(jnp.mean(pruned.out.kernel[...] == 0)) == 0.5


def test_lora_run_resumes_exactly(runs, tmp_path):
  base, tuned = runs
  lora_run(5, base, str(tmp_path))
  lora_run(10, base, str(tmp_path))  # resumes its own step-5 checkpoint
  resumed = flat(split_model(load_run_model(tmp_path, log=lambda _: None))[1])
  for k, v in flat(split_model(load_run_model(tuned, log=lambda _: None))[1]).items():
    np.testing.assert_array_equal(resumed[k], v, err_msg=k)


@pytest.mark.parametrize("scan", [True, False])
def test_apply_lora_on_a_transformer_starts_as_the_base_and_merges_to_its_logits(scan):
  model = TransformerLM(37, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8, scan_layers=scan,
                        rngs=nnx.Rngs(0))
  tokens = jnp.arange(16).reshape(2, 8) % 37
  base_logits = model(tokens)
  model = apply_lora(model, rank=2, alpha=4.0, targets=("query", "value", "mlp/up"), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(model(tokens), base_logits)  # B = 0: the base model
  paths = {freezing.path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}
  assert paths == {f"stack/blocks/{'' if scan else '0/'}{p}" for p in ("attn/query", "attn/value", "mlp/up")}
  a = model.stack.blocks.attn.query.lora_a if scan else model.stack.blocks[0].attn.query.lora_a
  assert a.shape == ((1, 16, 2) if scan else (16, 2))
  assert a.get_metadata()["out_sharding"] == (("layers", "embed", None) if scan else ("embed", None))
  nnx.update(model, jax.tree.map(lambda v: v + 0.05, nnx.state(model, nnx.LoRAParam)))
  logits = model(tokens)
  assert np.abs(logits - base_logits).max() > 1e-3
  merged = merge_lora(model)
  assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(merged))
  np.testing.assert_allclose(merged(tokens), logits, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="match no Linear layer.*stack/blocks/attn/query"):
    apply_lora(TransformerLM(37, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8, rngs=nnx.Rngs(0)),
               rank=2, targets=("nothing",), rngs=nnx.Rngs(0))


def test_trainer_with_a_freeze_filter_leaves_frozen_weights_bit_identical():
  model = MLP((4,), 3, hidden_sizes=(8,), rngs=nnx.Rngs(0))
  before = flat(split_model(model)[1])
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  y = (np.arange(16) % 3).astype(np.int32)

  def loss_fn(m, batch, _rng):
    losses = optax.softmax_cross_entropy_with_integer_labels(m(batch["x"]), batch["y"])
    return losses.sum(), {"count": jnp.float32(losses.size)}

  trainable = freezing.trainable_filter(freeze=("hidden/0",))
  trainer = Trainer(model, optax.adam(1e-2), loss_fn, lambda _: {"x": x, "y": y}, trainable=trainable)
  state = trainer.fit(steps=3)
  after = flat(state.params)
  for k in ("hidden/0/kernel", "hidden/0/bias"):
    np.testing.assert_array_equal(after[k], before[k])
  assert not np.array_equal(after["out/kernel"], before["out/kernel"])
  assert nbytes(state.opt_state) == 2 * nbytes({k: v for k, v in after.items() if k.startswith("out/")}) + 4


def test_lr_multiplier_zero_keeps_a_weight_and_one_changes_nothing():
  params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def step(**kw):
    tx, _ = make_optimizer(learning_rate=0.1, schedule="constant", weight_decay=0.1, **kw)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  plain, zero, one = step(), step(lr_multipliers=(("^a/", 0.0),)), step(lr_multipliers=(("^a/", 1.0),))
  np.testing.assert_array_equal(zero["a"]["kernel"], params["a"]["kernel"])
  np.testing.assert_array_equal(zero["b"]["kernel"], plain["b"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, one, plain)
  assert not np.array_equal(plain["a"]["kernel"], params["a"]["kernel"])


def test_lora_config_errors_are_one_line():
  c = mlp_config(5)
  c.train.lora.update(rank=2, targets=("attn",))
  with pytest.raises(UserError, match="train.lora.targets.*hidden/0"):
    build_experiment(c)
  c.train.lora.targets = ("[",)
  with pytest.raises(UserError, match=r"train.lora.targets=.*a non-empty tuple of regexes"):
    build_experiment(c)
  c = mlp_config(5)
  c.train.freeze = ("out",)
  c.train.lr_multipliers = (("out", -1.0),)
  with pytest.raises(UserError, match="train.lr_multipliers"):
    build_experiment(c)


def test_lora_targets_selecting_weights_no_linear_holds_are_refused_not_skipped():
  # An MoE's experts are stacked weights, not nnx.Linear layers: "mlp" used to adapt the router alone, silently.
  moe = TransformerLM(37, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8, num_experts=4,
                      experts_per_token=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="select stack/blocks/mlp/down.*which no Linear layer holds.*mlp/router"):
    apply_lora(moe, rank=2, targets=("mlp",), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="select embed/embedding, which no Linear"):
    apply_lora(TransformerLM(37, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8, rngs=nnx.Rngs(0)),
               rank=2, targets=("query", "embed"), rngs=nnx.Rngs(1))
  adapted = apply_lora(moe, rank=2, targets=("attn", "router"), rngs=nnx.Rngs(1))  # norms' scales are no matter
  assert sum(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(adapted)) == 5


def test_restore_from_a_run_or_export_holding_adapters_says_to_merge_them(runs, tmp_path):
  # It used to advise "restore_from with restore_mode=params", which is what had just failed.
  _, tuned = runs
  kept = export(tuned, str(tmp_path / "kept"), merge_lora=False)
  for source, lora in ((tuned, {}), (kept, LORA)):
    c = mlp_config(5)
    c.train.lora.update(lora)
    c.checkpoint.restore_from = source
    with pytest.raises(UserError, match=r"holds LoRA adapters apart from its weights \(train.lora.rank=4\).*"
                                        r"merge them first \(jaxmodels export"):
      train_and_evaluate(c, str(tmp_path / "next"))


def test_freeze_and_lr_multiplier_patterns_that_select_nothing_are_one_line_errors():
  # A misspelt pattern used to freeze or scale nothing, silently ("1e+02%" of the parameters trained).
  c = mlp_config(5)
  c.train.freeze = ("hiden",)
  with pytest.raises(UserError, match=r"train.freeze: the pattern 'hiden' occurs in no parameter's path; .*hidden/0/"):
    build_experiment(c)
  c = mlp_config(5)
  c.train.lr_multipliers = (("hidden", 0.5), ("outt", 2.0))
  with pytest.raises(UserError, match=r"train.lr_multipliers: the pattern 'outt' occurs in no parameter's path"):
    build_experiment(c)


def test_lora_run_under_pmap_starts_from_the_base(runs, tmp_path):
  # pmap's fresh adapters came stacked per device, and the first step failed with a reshape error.
  base, _ = runs
  c = mlp_config(2)
  c.train.lora.update(LORA)
  c.checkpoint.restore_from = base
  c.parallel.strategy = "pmap"
  train_and_evaluate(c, str(tmp_path))
  before = flat(split_model(load_run_model(base))[1])
  after = flat(split_model(load_run_model(str(tmp_path), log=lambda _: None))[1])
  assert after["out/lora_a"].shape == (32, 4) and after["out/lora_b"].shape == (4, 10)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_lora_run_from_a_base_takes_the_same_first_step_under_single_dp_and_pmap(runs, tmp_path):
  # pmap drew its own dropout masks (a key folded with the device index): first loss 2.189 against 2.213.
  base, _ = runs
  first = {}
  for strategy in ("single", "dp", "pmap"):
    c = mlp_config(1)
    assert c.model.dropout > 0
    c.train.update(dict(lora=LORA, log_every=1))
    c.checkpoint.restore_from = base
    c.parallel.strategy = strategy
    train_and_evaluate(c, str(tmp_path / strategy))
    first[strategy] = read_metrics(str(tmp_path / strategy))[0]
  assert jax.device_count() == 8 and first["single"]["step"] == 1
  for strategy in ("dp", "pmap"):
    for k in ("loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(first[strategy][k], first["single"][k], rtol=1e-5, err_msg=f"{strategy} {k}")
