"""The Trainer: your own module, loss and batches through the command line's loop, on 8 simulated devices (FSDP)."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels import parallel
from jaxmodels.models.layers import axes
from jaxmodels.runtime.errors import NonFiniteLoss, Preempted
from jaxmodels.train import Trainer

STEPS = 10


class MLP(nnx.Module):
  """Kernels named with logical axes, so the FSDP rules split `embed` over the fsdp axis."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(16, 32, kernel_metadata=axes("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(32, 8, kernel_metadata=axes("mlp", "embed"), rngs=rngs)
    self.dropout = nnx.Dropout(0.1)

  def __call__(self, x, rngs=None):
    return self.down(self.dropout(jax.nn.gelu(self.up(x)), rngs=rngs))


def batch_fn(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"x": rng.normal(size=(16, 16)).astype(np.float32), "y": rng.normal(size=(16, 8)).astype(np.float32)}


def loss_fn(model, batch, rng):
  """Summed squared error over the batch's examples, and its count; deterministic (dropout off) for the match."""
  model.eval()
  err = model(batch["x"]) - batch["y"]
  return jnp.sum(err**2), {"count": err.shape[0], "abs_err": jnp.sum(jnp.abs(err))}


def dropout_loss_fn(model, batch, rng):
  model.train()
  err = model(batch["x"], rngs=nnx.Rngs(dropout=rng)) - batch["y"]
  return jnp.sum(err**2), {"count": err.shape[0]}


def records(workdir) -> dict[int, dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}


def fsdp_trainer(workdir, loss=loss_fn, **kwargs) -> Trainer:
  return Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), loss, batch_fn, mesh=parallel.make_mesh(strategy="fsdp"),
                 workdir=workdir, log_every=1, **kwargs)


def test_custom_loss_on_fsdp_matches_a_hand_written_jit_loop(tmp_path):
  assert jax.device_count() == 8
  trainer = fsdp_trainer(tmp_path / "run")
  assert trainer.state_shardings.params["up"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  state = trainer.fit(STEPS)
  assert int(state.step) == STEPS
  assert state.params["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)

  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, batch):
    def mean_loss(p):
      m = nnx.merge(graphdef, p)
      m.eval()
      return jnp.mean(jnp.sum((m(batch["x"]) - batch["y"]) ** 2, axis=-1))
    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for s in range(STEPS):
    params, opt_state, loss = step(params, opt_state, batch_fn(s))
    losses.append(float(loss))
  logged = records(tmp_path / "run")
  np.testing.assert_allclose([logged[s + 1]["loss"] for s in range(STEPS)], losses, rtol=1e-5)
  assert "abs_err" in logged[STEPS] and "grad_norm" in logged[STEPS]
  np.testing.assert_allclose(np.asarray(state.params["down"]["kernel"]),
                             np.asarray(nnx.to_pure_dict(params)["down"]["kernel"]), rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly_and_hooks_fire_every_n_steps(tmp_path):
  fired = []
  whole = fsdp_trainer(tmp_path / "whole", dropout_loss_fn, checkpoint_every=5, grad_accum_steps=2)
  whole.add_hook(lambda step, state: fired.append((step, int(state.step))), every=3)
  expected = whole.fit(STEPS)
  assert fired == [(3, 3), (6, 6), (9, 9)]

  fsdp_trainer(tmp_path / "split", dropout_loss_fn, checkpoint_every=5, grad_accum_steps=2).fit(6)
  resumed_hooks = []
  resumed = fsdp_trainer(tmp_path / "split", dropout_loss_fn, checkpoint_every=5, grad_accum_steps=2)
  resumed.add_hook(lambda step, state: resumed_hooks.append(step), every=3)
  state = resumed.fit(STEPS)
  assert resumed_hooks == [9]  # resumed at step 6: only the steps it took
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  whole_losses = {s: r["loss"] for s, r in records(tmp_path / "whole").items()}
  assert {s: r["loss"] for s, r in records(tmp_path / "split").items()} == whole_losses


def test_a_signal_saves_the_step_raises_preempted_and_fit_again_resumes(tmp_path):
  trainer = fsdp_trainer(tmp_path / "run")
  trainer.add_hook(lambda step, state: os.kill(os.getpid(), signal.SIGINT), every=3)  # during step 3's actions
  with pytest.raises(Preempted) as stopped:
    trainer.fit(STEPS)
  assert stopped.value.args[0] == 4  # the signal is read after the next step, which is saved
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [4]
  state = fsdp_trainer(tmp_path / "run").fit(STEPS)
  assert int(state.step) == STEPS and set(records(tmp_path / "run")) == set(range(1, STEPS + 1))


@pytest.mark.parametrize("bad_loss, message", [
    (lambda m, b, r: loss_fn(m, b, r)[0], "returned one array: expected a pair (loss_sum, metrics)"),
    (lambda m, b, r: (jnp.sum((m(b["x"], rngs=nnx.Rngs(r)) - b["y"]) ** 2, -1), {"count": 16}),
     "loss_sum has shape (16,)"),
    (lambda m, b, r: (loss_fn(m, b, r)[0], {"count": 16, "err": jnp.zeros(8)}), "metrics err (8,): expected scalar"),
])
def test_a_loss_that_breaks_the_protocol_is_a_value_error_naming_what_it_returned(bad_loss, message):
  trainer = Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), bad_loss, batch_fn)
  with pytest.raises(ValueError, match="the loss function") as raised:
    trainer.fit(1)
  assert message in str(raised.value)


def test_a_nonfinite_loss_advises_the_trainers_arguments_not_config_keys():
  def inf_loss(model, batch, rng):
    loss, metrics = loss_fn(model, batch, rng)
    return loss * jnp.inf, metrics
  with pytest.raises(NonFiniteLoss, match=r"loss is inf at step 1.*or pass skip_nonfinite=True$"):
    Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), inf_loss, batch_fn, log_every=1).fit(2)


def test_a_batch_fn_that_breaks_the_protocol_is_a_value_error_naming_it():
  as_list = lambda step: list(batch_fn(step).values())
  with pytest.raises(ValueError, match=r"^batch_fn\(0\) returned list: expected a dict of host arrays$"):
    Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, as_list).fit(1)
  with pytest.raises(ValueError, match=r"^batch_fn\(0\) gave 16 examples, which grad_accum_steps=3 micro-batches"):
    Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, batch_fn, grad_accum_steps=3).fit(1)
