"""Convolutional classifier; conv dimensionality follows the input (1-D signals, 2-D images)."""

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import (
  RATE,
  SIZES,
  activation,
  axes,
  choice,
  require,
  resolve,
  tuples,
)
from jaxmodels.parallel.sharding import constrain

__all__ = ["BATCH", "CNN", "CNNConfig", "NORMS", "POOLS"]

BATCH = ("activation_batch",)  # the batch axis of every activation (see jaxmodels.parallel.constrain)

POOLS = {"max": nnx.max_pool, "avg": nnx.avg_pool, "none": None}
NORMS = ("batch", "layer", "none")


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """A plain conv stack; raises ValueError naming the first bad field."""

  features: tuple = (32, 64)  # output channels of each conv layer
  kernel_sizes: tuple = (3, 3)  # one per conv layer, the same on every spatial axis
  strides: tuple = (1, 1)  # one per conv layer
  pool: str = "max"  # after each conv layer: max | avg | none (window 2, stride 2)
  norm: str = "layer"  # after each conv: batch | layer | none
  head_sizes: tuple = (128,)  # dense layers between the flattened features and the logits
  activation: str = "relu"  # any jax.nn activation
  dropout: float = 0.0  # after each dense head layer, in training only

  def __post_init__(self):
    tuples(self, "features", "kernel_sizes", "strides", "head_sizes")
    for name in ("features", "kernel_sizes", "strides", "head_sizes"):
      require(self, name, SIZES)
    choice(self, "pool", POOLS)
    choice(self, "norm", NORMS)
    require(self, "dropout", RATE)
    activation(self.activation)
    if not len(self.features) == len(self.kernel_sizes) == len(self.strides):
      raise ValueError(f"features, kernel_sizes and strides: need one entry per conv layer, got "
                       f"{len(self.features)}, {len(self.kernel_sizes)}, {len(self.strides)}")


class CNN(nnx.Module):
  """[Conv -> norm -> activation -> pool] per feature size -> flatten -> dense head -> logits_BK.

  `input_shape` is one example's shape, channels last: (L, C) for a signal,
  (H, W, C) for an image. Pooling (window and stride 2) is skipped on a layer
  whose spatial size has fallen below 2. Norms compute in float32; `axis_name`
  makes BatchNorm average its batch statistics across a pmap axis. Every
  layer's output is pinned to the batch's sharding under a mesh.

      CNN((8, 8, 1), 10, CNNConfig(features=(16, 32)), rngs=nnx.Rngs(0))
      CNN((8, 8, 1), 10, features=(16, 32), norm="batch", rngs=nnx.Rngs(0))
  """

  Config = CNNConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_outputs: int, config: CNNConfig | None = None, *, axis_name=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(CNNConfig, config, fields)
    features, kernel_sizes, strides, pool, norm = c.features, c.kernel_sizes, c.strides, c.pool, c.norm
    *spatial, channels = input_shape
    nd = len(spatial)
    self.convs, self.norms, self.pool_after = nnx.List(), nnx.List(), []
    for f, k, s in zip(features, kernel_sizes, strides):
      self.convs.append(nnx.Conv(channels, f, (k,) * nd, (s,) * nd, dtype=dtype, param_dtype=param_dtype,
                                 kernel_metadata=axes(*(None,) * nd, "conv_in", "conv_out"), rngs=rngs))
      if norm == "batch":
        self.norms.append(nnx.BatchNorm(f, dtype=jnp.float32, param_dtype=param_dtype, axis_name=axis_name,
                                        rngs=rngs))
      elif norm == "layer":
        self.norms.append(nnx.LayerNorm(f, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs))
      spatial = [-(-n // s) for n in spatial]  # SAME padding
      self.pool_after.append(POOLS[pool] is not None and min(spatial) >= 2)
      if self.pool_after[-1]:
        spatial = [n // 2 for n in spatial]
      channels = f
    sizes = [math.prod(spatial) * channels, *c.head_sizes]
    self.head = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_outputs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(c.dropout)
    self.act = activation(c.activation)
    self.pool_fn, self.norm_kind, self.nd, self.dtype = POOLS[pool], norm, nd, dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    h = constrain(x.astype(self.dtype), BATCH)  # (B, *spatial, C)
    window = (2,) * self.nd
    for i, conv in enumerate(self.convs):
      h = constrain(conv(h), BATCH)
      if self.norm_kind == "batch":
        h = self.norms[i](h, use_running_average=not train)
      elif self.norm_kind == "layer":
        h = self.norms[i](h)
      h = self.act(h.astype(self.dtype))
      if self.pool_after[i]:
        h = self.pool_fn(h, window, strides=window)
      h = constrain(h, BATCH)
    h_BD = h.reshape(h.shape[0], -1)
    for layer in self.head:
      h_BD = constrain(self.dropout(self.act(layer(h_BD)), deterministic=not train, rngs=rngs), BATCH)
    return constrain(self.out(h_BD), BATCH)
