"""`count_params`: how many parameters a model (or any tree of arrays) holds."""

import math

import jax
from flax import nnx

__all__ = ["count_params"]


def count_params(module_or_state, kind=nnx.Param) -> int:
  """The number of scalars in a model's parameters.

      count_params(TransformerLM(50257, presets.config("gpt2"), rngs=nnx.Rngs(0)))  # 124,439,808

  `module_or_state` is an `nnx.Module` (its variables of `kind`, an nnx filter: parameters by default, not
  batch statistics, RNG state or caches), an abstract one (`nnx.eval_shape`), or any pytree of arrays or
  `jax.ShapeDtypeStruct`s (an `nnx.State`, a params dict, a checkpoint's tree), every leaf of which counts.
  A tied embedding counts once.
  """
  tree = nnx.state(module_or_state, kind) if isinstance(module_or_state, nnx.Module) else module_or_state
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
