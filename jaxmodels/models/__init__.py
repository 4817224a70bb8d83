"""Flax NNX model families. Research code imports them directly:

    from jaxmodels.models import CNN, MLP

Every module takes a compute `dtype` and a `param_dtype` and is called as
`model(x, train=..., rngs=...)`, where `rngs` (an `nnx.Rngs` with a `dropout`
stream) is needed only when training with dropout. `build_model` makes one
from the `model.*` config group.
"""

import jax.numpy as jnp
from flax import nnx

from jaxmodels.errors import UserError
from jaxmodels.models.cnn import CNN
from jaxmodels.models.mlp import MLP


def build_model(model_config, input_shape, num_outputs: int, rngs: nnx.Rngs) -> nnx.Module:
  """The module named by `model.family`, sized for `input_shape` and `num_outputs`."""
  m = model_config
  common = dict(activation_name=m.activation, dropout=m.dropout, dtype=jnp.dtype(m.dtype),
                param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
  if m.family == "mlp":
    return MLP(input_shape, tuple(m.hidden_sizes), num_outputs, **common)
  if m.family == "cnn":
    return CNN(input_shape, tuple(m.features), tuple(m.kernel_sizes), tuple(m.strides), num_outputs,
               head_sizes=tuple(m.head_sizes), pool=m.pool, norm=m.norm, **common)
  raise UserError(f"model.family={m.family!r} is not a known family")


__all__ = ["CNN", "MLP", "build_model"]
