"""Gaps found verifying issues 29 and 30 on main: what the library cannot compute or should not, refused in one
error where it was silent."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels import parallel, tasks
from jaxmodels.config import default_config, validate
from jaxmodels.models import TransformerConfig, TransformerLM
from jaxmodels.optim import make_optimizer, make_schedule
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.actions import summarize
from jaxmodels.train import Trainer
from jaxmodels.train.experiment import build_experiment

LM = dict(d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16, scan_layers=False)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_forward_call_refuses_known_positions_outside_max_len(positions):
  # decode checked its positions_BT; __call__ and hidden_and_head did not: position 16 of a learned table gave NaN
  # logits, position -1 its last row, rotary positions past max_len a finite answer, all without a word.
  model = TransformerLM(11, TransformerConfig(positions=positions, **LM), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 4), jnp.int32)
  assert model(tokens, positions_BT=jnp.full((1, 4), 15)).shape == (1, 4, 11)
  for bad in (16, -1):
    with pytest.raises(ValueError, match=rf"position {bad} is outside \[0, 16\) \(4 of 4 out of range\)"):
      model(tokens, positions_BT=jnp.full((1, 4), bad))
    with pytest.raises(ValueError, match=rf"position {bad} is outside \[0, 16\)"):
      model.hidden_and_head(tokens, positions_BT=jnp.full((1, 4), bad))


@pytest.mark.parametrize("kwargs,message", [
    (dict(learning_rate=-1e-3), r"train.learning_rate=-0.001: expected a finite number > 0"),
    (dict(learning_rate=float("nan")), r"train.learning_rate=nan: expected a finite number > 0"),
    (dict(end_lr_fraction=2.0), r"train.end_lr_fraction=2.0: expected a number in \[0, 1\]"),
    (dict(b1=1.0), r"train.b1=1.0: expected a number in \[0, 1\)"),
    (dict(momentum=-0.5, optimizer="sgd"), r"train.momentum=-0.5: expected a number in \[0, 1\)"),
    (dict(weight_decay=float("inf")), r"train.weight_decay=inf: expected a finite number >= 0"),
    (dict(grad_clip=-1.0), r"train.grad_clip=-1.0: expected a finite number >= 0"),
    (dict(warmup_steps=-5), r"train.warmup_steps=-5: expected an integer >= 0"),
    (dict(steps=0, schedule="constant"), r"train.steps=0: expected a positive integer"),
])
def test_plain_argument_factories_refuse_what_the_config_keys_refuse(kwargs, message):
  # The config's validation refused these; the keyword forms built an optimizer that ascended (a negative rate)
  # or wrote NaN into every parameter, without a word.
  with pytest.raises(UserError, match=f"^{message}$"):
    make_optimizer(**kwargs)
  if set(kwargs) <= {"learning_rate", "end_lr_fraction", "warmup_steps", "steps", "schedule"}:
    with pytest.raises(UserError, match=f"^{message}$"):
      make_schedule(**kwargs)
  make_optimizer(learning_rate=np.float32(1e-3), b1=0.0, grad_clip=0)  # NumPy numbers and the bounds are fine


def test_plain_argument_factories_take_jax_scalars():
  # `jnp.float32(3e-4)` is a 0-d jax.Array, not a numbers.Real: it was refused as "expected a finite number > 0".
  _, schedule = make_optimizer(learning_rate=jnp.float32(3e-4), b1=jnp.float32(0.9), schedule="constant")
  assert float(schedule(0)) == pytest.approx(3e-4)
  with pytest.raises(UserError, match=r"^train.b2=Array\(True, dtype=bool\): expected a number in \[0, 1\)$"):
    make_optimizer(b2=jnp.bool_(True))


LOSS_MODULE = '''
import jax.numpy as jnp
import optax


def half_mse(outputs, targets):
  return 0.5 * jnp.square(outputs - targets)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def one_number(outputs, targets):
  return jnp.sum(outputs)


def fails(outputs, targets):
  raise RuntimeError("boom")


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def loss_module(tmp_path, monkeypatch):
  (tmp_path / "my_losses.py").write_text(LOSS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("loss_module")
def test_your_own_loss_by_import_path_for_any_task():
  # train.loss took mse | mae | huber only (and was ignored but for regress): no loss of yours through the CLI.
  rng = np.random.default_rng(0)
  outputs, targets, mask = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), np.ones((4, 3), np.float32)
  own = tasks.loss_sums("regress", outputs, targets, mask, "my_losses:half_mse")
  built_in = tasks.loss_sums("regress", outputs, targets, mask, "mse")
  np.testing.assert_allclose(own["loss_sum"], 0.5 * built_in["loss_sum"], rtol=1e-6)
  np.testing.assert_allclose(own["correct"], built_in["correct"])  # the task's metrics are unchanged
  tasks.check_loss("my_losses:half_mse", "regress", 3, (3,))
  tasks.check_loss("my_losses:cross_entropy", "lm", 11)
  with pytest.raises(UserError, match=r"^train.loss='my_losses:one_number' returned shape \(\) for targets of shape "
                                      r"\(2,\): expected the loss of each target, the targets' shape$"):
    tasks.check_loss("my_losses:one_number", "classify", 10)
  with pytest.raises(UserError, match=r"^train.loss='my_losses:fails' fails on outputs \(2, 10\) and targets \(2,\) "
                                      r"of data.task=classify: RuntimeError: boom$"):
    tasks.check_loss("my_losses:fails", "classify", 10)
  for path, message in (("my_losses:NOT_A_FUNCTION", "is of type int, not a function"),
                        ("my_losses:nope", "my_losses has no attribute nope"),
                        ("no_such_module:f", "cannot import no_such_module"),
                        ("l1", "expected one of mse, mae, huber")):
    c = default_config()
    c.train.loss = path
    with pytest.raises(UserError, match=f"^train.loss='{path}'.*{message}"):
      validate(c)


@pytest.mark.usefixtures("loss_module")
def test_your_own_loss_trains_through_the_experiment_as_the_built_in_one():
  config = experiment("digits_mlp")
  config.model.dropout = 0.0
  config.train.batch_size = 32
  losses = []
  for loss in ("mse", "my_losses:cross_entropy"):  # classify's built-in loss ignores "mse"
    config.train.loss = loss
    exp = build_experiment(config)
    _, metrics = exp.train_step(exp.init_state(), jax.device_put(exp.dataset.train_batch(0, 32)))
    losses.append(summarize(np.stack(parallel.fetch([metrics])))["loss"])
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)
  config.train.loss = "my_losses:one_number"  # refused by build_experiment, before a run writes anything
  with pytest.raises(UserError, match=r"returned shape \(\) for targets of shape \(2,\)"):
    build_experiment(config)
  config.train.loss = "mae"  # a regression loss on a classifier was ignored without a word
  with pytest.raises(UserError, match=r"^train.loss=mae is a regression loss, but data.task=classify has its own"):
    build_experiment(config)


class Dense(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.up, self.down = nnx.Linear(4, width, rngs=rngs), nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x_BD):
    return self.down(jax.nn.relu(self.up(x_BD)))


def test_a_trainer_resuming_another_models_checkpoint_is_told_about_its_arguments_not_command_line_flags(tmp_path):
  # The refusal told a library user to pass --workdir or --config.checkpoint.restore_from, flags a Trainer has not.
  def loss_fn(model, batch, rng):  # pylint: disable=unused-argument
    err_BO = model(batch["x"]) - batch["y"]
    return jnp.sum(err_BO**2), {"count": err_BO.shape[0]}

  def batch_fn(step):
    x = np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": x[:, :2]}

  def trainer(width):
    return Trainer(Dense(width, nnx.Rngs(0)), optax.sgd(1e-2), loss_fn, batch_fn, workdir=str(tmp_path))
  trainer(8).fit(steps=1)
  with pytest.raises(UserError, match=r"saved state does not match the state built here: 3 paths shaped differently "
                                      r".*Use a new workdir, or the module and optimizer it was saved with\.$") as e:
    trainer(16).fit(steps=2)
  assert "--" not in str(e.value) and "config" not in str(e.value)
