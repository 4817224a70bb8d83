"""`count_params`: how many parameters a model (or any tree of arrays) holds; `count_active_params`: how many of
them one token uses (mixtures of experts)."""

import math

import jax
from flax import nnx

from jaxmodels.models.moe import MoE

__all__ = ["count_active_params", "count_params"]


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


def count_active_params(module: nnx.Module) -> int:
  """The parameters one token uses: all of `module`'s (`count_params`), less, in each mixture-of-experts layer
  (`jaxmodels.models.moe.MoE`), the experts it does not visit: (E - K) / E of the expert weights for top-K of E
  experts (the active-parameter count of Mixtral, Jiang et al. 2024, and OLMoE). Equals `count_params` for
  a model without MoE layers; works on abstract modules (`nnx.eval_shape`)."""
  total = count_params(module)
  for _, layer in nnx.iter_modules(module):
    if isinstance(layer, MoE):
      experts = sum(math.prod(p.get_value().shape) for p in (layer.up, layer.gate, layer.down) if p is not None)
      total -= experts * (layer.num_experts - layer.k) // layer.num_experts
  return total
