"""Multi-layer perceptron over flattened inputs."""

import math

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import activation
from jaxmodels.parallel.sharding import constrain

BATCH = ("activation_batch",)  # the batch axis of every activation (see jaxmodels.parallel.constrain)


class MLP(nnx.Module):
  """Flatten -> [Linear -> activation -> dropout] per hidden size -> Linear logits.

  Input `x_BS...` of any per-example shape `input_shape`; output `logits_BK`.
  Every layer's output is pinned to the batch's sharding under a mesh.
  """

  def __init__(self, input_shape, hidden_sizes, num_outputs, *, activation_name="relu", dropout=0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    sizes = [math.prod(input_shape), *hidden_sizes]
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_outputs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.act = activation(activation_name)
    self.dtype = dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    h_BD = constrain(x.reshape(x.shape[0], -1).astype(self.dtype), BATCH)
    for layer in self.hidden:
      h_BD = constrain(self.dropout(self.act(layer(h_BD)), deterministic=not train, rngs=rngs), BATCH)
    return constrain(self.out(h_BD), BATCH)
