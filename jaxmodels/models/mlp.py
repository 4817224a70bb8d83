"""Multi-layer perceptron over flattened inputs."""

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import RATE, SIZES, activation, require, resolve, tuples
from jaxmodels.parallel.sharding import constrain

__all__ = ["BATCH", "MLP", "MLPConfig"]

BATCH = ("activation_batch",)  # the batch axis of every activation (see jaxmodels.parallel.constrain)


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """A multi-layer perceptron; raises ValueError naming the first bad field."""

  hidden_sizes: tuple = (128,)  # width of each hidden layer
  activation: str = "relu"  # any jax.nn activation
  dropout: float = 0.0  # after each hidden layer, in training only

  def __post_init__(self):
    tuples(self, "hidden_sizes")
    require(self, "hidden_sizes", SIZES)
    require(self, "dropout", RATE)
    activation(self.activation)


class MLP(nnx.Module):
  """Flatten -> [Linear -> activation -> dropout] per hidden size -> Linear logits.

  Input `x_BS...` of any per-example shape `input_shape`; output `logits_BK`.
  Every layer's output is pinned to the batch's sharding under a mesh.

      MLP((8, 8, 1), 10, MLPConfig(hidden_sizes=(64,)), rngs=nnx.Rngs(0))
      MLP((8, 8, 1), 10, hidden_sizes=(64,), rngs=nnx.Rngs(0))
  """

  Config = MLPConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_outputs: int, config: MLPConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(MLPConfig, config, fields)
    sizes = [math.prod(input_shape), *c.hidden_sizes]
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_outputs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(c.dropout)
    self.act = activation(c.activation)
    self.dtype = dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    h_BD = constrain(x.reshape(x.shape[0], -1).astype(self.dtype), BATCH)
    for layer in self.hidden:
      h_BD = constrain(self.dropout(self.act(layer(h_BD)), deterministic=not train, rngs=rngs), BATCH)
    return constrain(self.out(h_BD), BATCH)
