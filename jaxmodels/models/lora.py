"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685): a frozen
weight W plus a trained low-rank update, y = x W + b + (alpha / r) (x A) B, with A (in, r) random and B (r, out)
zero at the start, so the adapted model starts as the base model.

    model = apply_lora(model, rank=8, alpha=16, targets=("query", "value"), rngs=nnx.Rngs(0))
    ...train only the adapters (freezing.trainable_filter(adapters_only=True))...
    plain = merge_lora(model)   # nnx.Linear layers again, W + (alpha / r) A B: the base model's structure

`LoRALinear` is an `nnx.Linear` with two more parameters, `lora_a` and `lora_b` (`nnx.LoRAParam`, a kind of
`nnx.Param`); its kernel and bias stay where the Linear had them, so parameter paths, sharding names and
`checkpoint.restore_from` of the base model are unchanged. It works on any family (Transformer, MLP, your own
module) and on stacked (scanned) layers: a kernel of shape (*L, in, out) gets adapters (*L, in, r) and
(*L, r, out), sliced with it by the scan, and sharded like it (the adapters' rank axis unsplit).

Flax's own `nnx.LoRA`/`nnx.LoRALinear` are not used as they stand: they have no alpha / r scale, build a fresh
kernel rather than adapt an existing one, and give a stacked kernel unstacked adapters.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.optim import freezing
from jaxmodels.runtime.errors import UserError

__all__ = ["apply_lora", "from_config", "LoRALinear", "lora_targets", "merge_lora"]

_INTERNAL = ("_pytree__state", "_pytree__nodes")
# norms' and biases' parameter names: vectors, stacked to (L, D) by scanned layers, never LoRA's matrices
_NOT_MATRICES = ("scale", "bias")  # NNX's own bookkeeping, made per module by its metaclass


def _copy_fields(source: nnx.Module, target: nnx.Module, skip=()) -> None:
  for name, value in vars(source).items():
    if name not in _INTERNAL and name not in skip:
      setattr(target, name, value)


class LoRALinear(nnx.Linear):
  """`base` (an nnx.Linear, whose kernel and bias it takes over) plus a rank-`rank` update scaled by
  `alpha / rank`: inputs (..., in) -> (..., out) in the Linear's compute dtype.

  `lora_a` (*L, in, rank): He-uniform over `in` (Flax's nnx.LoRA initializer); `lora_b` (*L, rank, out): zeros.
  `param_dtype` as the base kernel's. Raises ValueError for a rank < 1.
  """

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank={rank}: expected a positive integer")
    _copy_fields(base, self)
    kernel = base.kernel
    *lead, d_in, d_out = kernel.shape
    names = kernel.get_metadata().get("out_sharding")
    meta = lambda a, b: {} if names is None else {"out_sharding": (*names[:-2], a, b), "eager_sharding": False}
    batch = tuple(range(len(lead)))
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=batch)
    self.lora_a = nnx.LoRAParam(init(rngs.params(), (*lead, d_in, rank), kernel.dtype),
                                **meta(None if names is None else names[-2], None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), kernel.dtype),
                                **meta(None, None if names is None else names[-1]))
    self.scale = alpha / rank

  def __call__(self, inputs, out_sharding=None):
    y = super().__call__(inputs, out_sharding=out_sharding)
    x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    return y + (x @ a @ b) * jnp.asarray(self.scale, y.dtype)

  def merged_kernel(self) -> jax.Array:
    """W + (alpha / r) A B, computed in float32 and cast to the kernel's dtype."""
    f32 = lambda v: v[...].astype(jnp.float32)
    delta = jnp.matmul(f32(self.lora_a), f32(self.lora_b)) * self.scale
    return (f32(self.kernel) + delta).astype(self.kernel.dtype)

  def merged(self) -> nnx.Linear:
    """A plain nnx.Linear whose kernel is `merged_kernel()` (metadata kept), sharing this layer's bias."""
    linear = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))  # every field is replaced below
    _copy_fields(self, linear, skip=("lora_a", "lora_b", "scale"))
    linear.kernel = self.kernel.replace(self.merged_kernel())
    return linear


def lora_targets(model: nnx.Module, targets) -> list[tuple]:
  """The module paths (tuples of names) of `model`'s plain nnx.Linear layers whose kernel path
  ('stack/blocks/attn/query/kernel') a regex of `targets` occurs in (jaxmodels.optim.freezing's patterns)."""
  match = freezing.matches(targets)
  return [path for path, m in nnx.iter_modules(model)
          if type(m) is nnx.Linear and match(freezing.path_name((*path, "kernel")))]


def _replace(model: nnx.Module, path: tuple, fn) -> nnx.Module:
  """`model` with the submodule at `path` replaced by fn(it) (in place; the root returns the new module)."""
  if not path:
    return fn(model)
  parent = model
  for name in path[:-1]:
    parent = parent[name] if isinstance(name, int) else getattr(parent, name)
  if isinstance(path[-1], int):
    parent[path[-1]] = fn(parent[path[-1]])
  else:
    setattr(parent, path[-1], fn(getattr(parent, path[-1])))
  return model


def apply_lora(model: nnx.Module, *, rank: int, alpha: float = 16.0, targets=("query", "value"),
               rngs: nnx.Rngs) -> nnx.Module:
  """`model` with each nnx.Linear that `targets` selects (`lora_targets`) replaced by a `LoRALinear` of that
  `rank` and `alpha` (in place; returns the model, a new one if the model itself is a Linear). Rank 0: the model
  unchanged. `targets`: regexes over the kernels' paths; the default adapts attention's query and value
  projections, as Hu et al. Raises ValueError when `targets` selects no Linear (naming those there are), or
  selects a weight matrix that is no nnx.Linear's (a mixture of experts' expert weights, an embedding, a
  convolution...): LoRA cannot adapt it, and leaving it out silently would train less than asked."""
  if rank == 0:
    return model
  paths = lora_targets(model, targets)
  linears = [freezing.path_name(p) for p, m in nnx.iter_modules(model) if type(m) is nnx.Linear]
  if not paths:
    raise ValueError(f"LoRA targets {tuple(targets)} match no Linear layer's kernel path; the model's Linear "
                     f"layers: {', '.join(linears) or 'none'}")
  match, inside = freezing.matches(targets), tuple(f"{name}/" for name in linears)
  weights = nnx.to_flat_state(nnx.state(model, nnx.Param))
  others = [name for name in (freezing.path_name(path) for path, param in weights
                              if param.ndim >= 2 and path[-1] not in _NOT_MATRICES
                              and not isinstance(param, nnx.LoRAParam))
            if match(name) and not name.startswith(inside)]
  if others:
    raise ValueError(f"LoRA targets {tuple(targets)} select {', '.join(others)}, which no Linear layer holds "
                     f"(LoRA adapts only nnx.Linear kernels); narrow the patterns to Linear layers: "
                     f"{', '.join(linears)}")
  for path in paths:
    model = _replace(model, path, lambda linear: LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """`model` with every `LoRALinear` replaced by a plain nnx.Linear holding W + (alpha / r) A B (in place;
  returns the model): the structure and parameter paths of the model before `apply_lora`, its function unchanged
  up to float32 rounding. A model without LoRA layers is returned as it is."""
  for path in [p for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]:
    model = _replace(model, path, lambda layer: layer.merged())
  return model


def from_config(model: nnx.Module, group, rngs: nnx.Rngs) -> nnx.Module:
  """`apply_lora` with the `train.lora` config group's rank, alpha and targets; UserError (naming
  train.lora.targets) when they select no Linear layer."""
  try:
    return apply_lora(model, rank=group.rank, alpha=group.alpha, targets=tuple(group.targets), rngs=rngs)
  except ValueError as e:
    raise UserError(f"train.lora.targets: {e}") from None
