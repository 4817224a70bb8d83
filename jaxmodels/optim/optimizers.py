"""The optimizer factory: one `train.*` config group -> an Optax transformation (magnitude pruning included,
`train.pruning`, jaxmodels.optim.pruning).

Gradient accumulation is not here: the train step splits its batch into
`train.grad_accum_steps` micro-batches and sums their gradients inside one
compiled step (see `jaxmodels.train`), so one optimizer step always sees the
whole `train.batch_size`.
"""

import functools

import optax

from jaxmodels.optim import pruning
from jaxmodels.optim.decay import decay_mask
from jaxmodels.runtime.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")


SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(t) -> optax.Schedule:
  """Linear warmup over `warmup_steps`, then cosine / linear decay to `end_lr_fraction`, or constant."""
  peak, warmup, steps = t.learning_rate, t.warmup_steps, t.steps
  end = peak * t.end_lr_fraction
  if t.schedule not in SCHEDULES:
    raise UserError(f"train.schedule={t.schedule!r}: expected one of {', '.join(SCHEDULES)}")
  if warmup >= steps and t.schedule != "constant":
    raise UserError(f"train.warmup_steps={warmup} must be below train.steps={steps}")
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, end)
  if t.schedule == "linear":
    decay = optax.linear_schedule(peak, end, steps - warmup)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) for the `train.*` config group."""
  schedule = make_schedule(t)
  decay_mask_fn = functools.partial(decay_mask, decay_embeddings=t.decay_embeddings)
  if t.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask_fn)
  elif t.optimizer in ("adam", "sgd"):
    if t.optimizer == "adam":
      tx = optax.adam(schedule, b1=t.b1, b2=t.b2)
    else:
      tx = optax.sgd(schedule, momentum=t.momentum or None, nesterov=t.nesterov)
    if t.weight_decay:  # classic L2 decay added to the gradient (PyTorch semantics); adamw decouples it
      tx = optax.chain(optax.add_decayed_weights(t.weight_decay, mask=decay_mask_fn), tx)
  else:
    raise UserError(f"train.optimizer={t.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
  if t.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  prune = pruning.from_config(t)
  if prune is not None:  # last: it zeroes the pruned weights' final updates (params + updates = 0 there)
    tx = optax.chain(tx, prune)
  return tx, schedule
