"""float16 dynamic loss scaling and the parameter EMA: the parts of the train state beyond params and optimizer.

Loss scaling (`model.dtype=float16`): float16 gradients underflow to zero below ~6e-8, so the loss is multiplied
by a large scale before differentiation and the float32 gradient sums are divided by it afterwards (the train
step's loss is a sum over targets: it is multiplied by scale / targets per batch, the scale of a mean loss). A gradient
that overflows (inf or NaN) skips the step's update, params and optimizer state unchanged, and halves the scale;
after `train.loss_scale_period` finite steps in a row the scale doubles. bfloat16 has float32's range and gets no
scaling. Hand-written (about 20 lines) because no kept library fits the train step: jmp (DeepMind) has had no
release since 2023; flax.training.dynamic_scale.DynamicScale wraps one `value_and_grad` call and decides
finiteness per call, before the step's micro-batches and devices are summed (so accumulation would count a step
several times and pmap replicas could disagree on the scale); optax offers `apply_if_finite`, which skips only the
optimizer update (not BatchNorm statistics, not the EMA) and keeps no scale.

EMA (`train.ema_decay` = d > 0): after each applied update, ema <- d * ema + (1 - d) * params, in float32
(optax.incremental_update), starting from the initial parameters; a skipped step leaves it unchanged.
"""

import flax
import jax
import jax.numpy as jnp
import optax

__all__ = ["ema_as_params", "ema_init", "ema_update", "initial_loss_scale", "INITIAL_SCALE", "loss_factor",
           "LossScale", "needs_loss_scale", "scaled", "update_loss_scale"]

INITIAL_SCALE = 2.0**15  # float16's largest power of two is 2**15; loss sums of O(1) stay far below its max 65504


@flax.struct.dataclass
class LossScale:
  scale: jax.Array  # float32 scalar: the factor the loss is multiplied by before differentiation
  good_steps: jax.Array  # int32 scalar: finite steps since the scale last changed


def needs_loss_scale(dtype: str) -> bool:
  """Whether a compute dtype (model.dtype) trains with dynamic loss scaling: float16 only."""
  return dtype == "float16"


def initial_loss_scale(scale: float = INITIAL_SCALE) -> LossScale:
  return LossScale(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32))


def loss_factor(ls: LossScale | None, targets_per_slot: float) -> jax.Array | None:
  """What the train step multiplies its summed loss by: the scale over the targets of one micro-batch slot
  (static), so that the scale means what it means for a mean loss (PyTorch's GradScaler, jmp) whatever the batch
  size. None without loss scaling."""
  return None if ls is None else ls.scale / targets_per_slot


def scaled(loss_fn, scale: jax.Array | None):
  """`loss_fn` (returning (loss, aux)) with its loss multiplied by `scale` (float32 scalar); None: `loss_fn`."""
  if scale is None:
    return loss_fn

  def fn(*args):
    loss, aux = loss_fn(*args)
    return loss * scale, aux

  return fn


def update_loss_scale(ls: LossScale, finite: jax.Array, period: int) -> LossScale:
  """The scale after a step: halved (not below 1) on a non-finite gradient, doubled after `period` finite steps."""
  grow = finite & (ls.good_steps + 1 >= period)
  scale = jnp.where(finite, jnp.where(grow, ls.scale * 2, ls.scale), jnp.maximum(ls.scale / 2, 1.0))
  good_steps = jnp.where(finite & ~grow, ls.good_steps + 1, 0)
  return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


def ema_init(params: dict) -> dict:
  """The EMA's starting point: the parameters, in float32."""
  return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def ema_update(ema: dict | None, params: dict, decay: float) -> dict | None:
  """decay * ema + (1 - decay) * params, in float32; None (a state without an EMA): None."""
  return None if ema is None else optax.incremental_update(ema_init(params), ema, 1.0 - decay)


def ema_as_params(ema: dict, params: dict) -> dict:
  """The EMA in the parameters' dtypes (what the model is built for): what eval and export use in place of them."""
  return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)
