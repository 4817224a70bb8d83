"""The optimizer factory: keyword arguments (the `train.*` keys of the same names) -> an Optax transformation and
its learning-rate schedule; `make_optimizer_from_config` takes the `train.*` config group itself (magnitude
pruning included, `train.pruning`, jaxmodels.optim.pruning).

Gradient accumulation is not here: the train step splits its batch into
`train.grad_accum_steps` micro-batches and sums their gradients inside one
compiled step (see `jaxmodels.train`), so one optimizer step always sees the
whole `train.batch_size`.
"""

import functools
import inspect
import math
import numbers

import jax.numpy as jnp
import optax

from jaxmodels.optim import freezing, pruning
from jaxmodels.optim.decay import decay_mask
from jaxmodels.runtime.errors import UserError

__all__ = ["make_optimizer", "make_optimizer_from_config", "make_schedule", "make_schedule_from_config",
           "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adamw", "adam", "sgd")


SCHEDULES = ("cosine", "linear", "constant")


def _check_numbers(**checks) -> None:
  """UserError `train.KEY=VALUE: expected WHAT` for the first keyword given as (value, test, what) whose value is
  not a finite real passing `test`. A run's config is validated before (jaxmodels.config
  validates every train.* key); these are the plain-argument callers' checks, where a negative or NaN rate would
  otherwise train without a word."""
  for key, (value, test, what) in checks.items():
    if not (_is_real(value) and math.isfinite(value) and test(value)):
      raise UserError(f"train.{key}={value!r}: expected {what}")


def _is_real(value) -> bool:
  """A real number, not a bool: a Python or NumPy int or float, or a 0-d array of one (`jnp.float32(3e-4)`)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Real):
    return True
  dtype = getattr(value, "dtype", None)
  return (getattr(value, "shape", None) == () and dtype is not None and dtype != bool
          and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)))


def make_schedule(*, learning_rate: float = 1e-3, schedule: str = "cosine", warmup_steps: int = 0,
                  steps: int = 1000, end_lr_fraction: float = 0.0) -> optax.Schedule:
  """Learning rate (float32 scalar) as a function of the step: linear warmup from 0 over `warmup_steps`, then
  `schedule` (cosine | linear decay from `learning_rate` to `learning_rate * end_lr_fraction` at `steps`, or
  constant).

  Keyword arguments only, each the `train.*` key of its name with its default (`make_schedule_from_config` takes
  the group). Raises UserError for an unknown schedule, a `learning_rate` not a finite number > 0, an
  `end_lr_fraction` outside [0, 1], `warmup_steps` not an integer >= 0, `steps` not a positive integer, or a
  warmup not below `steps` (cosine, linear). Numbers may be 0-d arrays (`jnp.float32(3e-4)`).
  """
  _check_numbers(learning_rate=(learning_rate, lambda v: v > 0, "a finite number > 0"),
                 end_lr_fraction=(end_lr_fraction, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                 warmup_steps=(warmup_steps, lambda v: v >= 0 and v == int(v), "an integer >= 0"),
                 steps=(steps, lambda v: v > 0 and v == int(v), "a positive integer"))
  peak, end = learning_rate, learning_rate * end_lr_fraction
  if schedule not in SCHEDULES:
    raise UserError(f"train.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
  if warmup_steps >= steps and schedule != "constant":
    raise UserError(f"train.warmup_steps={warmup_steps} must be below train.steps={steps}")
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, steps, end)
  if schedule == "linear":
    decay = optax.linear_schedule(peak, end, steps - warmup_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def make_optimizer(*, optimizer: str = "adamw", learning_rate: float = 1e-3, schedule: str = "cosine",
                   warmup_steps: int = 0, steps: int = 1000, end_lr_fraction: float = 0.0, weight_decay: float = 0.0,
                   decay_embeddings: bool = True, momentum: float = 0.9, nesterov: bool = False, b1: float = 0.9,
                   b2: float = 0.999, grad_clip: float = 0.0, lr_multipliers=(),
                   prune: optax.GradientTransformation | None = None, trainable=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule): `optimizer` (adamw | adam | sgd) on `make_schedule`'s rates.

  Keyword arguments only, each the `train.*` key of its name with its default (`make_optimizer_from_config` takes
  the group): `weight_decay` is decoupled for adamw and L2 on the gradient for adam and sgd, never on biases and
  norm scales (`decay_mask`), on embeddings when `decay_embeddings`; `momentum` and `nesterov` are sgd's, `b1`
  and `b2` adam's and adamw's; `grad_clip` > 0 clips the gradients' global norm first. `prune`: a transformation
  chained last, e.g. `pruning.magnitude_pruning(0.5)`. A misspelled keyword is a TypeError; an unknown optimizer
  or schedule, or a number out of its key's range (`learning_rate` > 0, `weight_decay` and `grad_clip` >= 0,
  `momentum`, `b1`, `b2` in [0, 1); all finite), a UserError.

  Fine-tuning (jaxmodels.optim.freezing): `lr_multipliers`, (regex, multiplier) pairs, scale the updates of the
  parameters whose path a regex occurs in (the first pair that matches; `train.lr_multipliers`); `trainable`, a
  trainable filter (`freezing.trainable_filter`, e.g. `train.freeze`'s patterns or a LoRA run's adapters), leaves
  the other parameters unchanged and keeps no optimizer state for them.
  """
  _check_numbers(**{k: (x, lambda v: v >= 0, "a finite number >= 0")
                    for k, x in (("weight_decay", weight_decay), ("grad_clip", grad_clip))},
                 **{k: (x, lambda v: 0 <= v < 1, "a number in [0, 1)")
                    for k, x in (("momentum", momentum), ("b1", b1), ("b2", b2))})
  lr = make_schedule(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps, steps=steps,
                     end_lr_fraction=end_lr_fraction)
  decay_mask_fn = functools.partial(decay_mask, decay_embeddings=decay_embeddings)
  if optimizer == "adamw":
    tx = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask_fn)
  elif optimizer in ("adam", "sgd"):
    if optimizer == "adam":
      tx = optax.adam(lr, b1=b1, b2=b2)
    else:
      tx = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    if weight_decay:  # classic L2 decay added to the gradient (PyTorch semantics); adamw decouples it
      tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask_fn), tx)
  else:
    raise UserError(f"train.optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  if lr_multipliers:
    tx = optax.chain(tx, freezing.lr_multipliers(lr_multipliers))
  if prune is not None:  # last: it zeroes the pruned weights' final updates (params + updates = 0 there)
    tx = optax.chain(tx, prune)
  return freezing.freeze(tx, trainable), lr


def _train_keys(fn, t) -> dict:
  """The `train.*` values of group `t` that `fn` takes as keyword arguments (all of its parameters but `prune` and
  `trainable`)."""
  return {name: t[name] for name in inspect.signature(fn).parameters if name not in ("prune", "trainable")}


def make_schedule_from_config(t) -> optax.Schedule:
  """`make_schedule` of the `train.*` config group `t`."""
  return make_schedule(**_train_keys(make_schedule, t))


def make_optimizer_from_config(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` of the `train.*` config group `t`, magnitude pruning (`train.pruning`) and the trainable
  filter (`train.freeze`, `train.lora`; freezing.from_config) included."""
  return make_optimizer(**_train_keys(make_optimizer, t), prune=pruning.from_config(t),
                        trainable=freezing.from_config(t))
