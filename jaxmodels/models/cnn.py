"""Convolutional classifier; conv dimensionality follows the input (1-D signals, 2-D images)."""

import math

import jax.numpy as jnp
from flax import nnx

from jaxmodels.errors import UserError
from jaxmodels.models.layers import activation, axes
from jaxmodels.parallel.sharding import constrain

BATCH = ("activation_batch",)  # the batch axis of every activation (see jaxmodels.parallel.constrain)

POOLS = {"max": nnx.max_pool, "avg": nnx.avg_pool, "none": None}
NORMS = ("batch", "layer", "none")


class CNN(nnx.Module):
  """[Conv -> norm -> activation -> pool] per feature size -> flatten -> dense head -> logits.

  `input_shape` is one example's shape, channels last: (L, C) for a signal,
  (H, W, C) for an image. Pooling (window and stride 2) is skipped on a layer
  whose spatial size has fallen below 2. Norms compute in float32; `axis_name`
  makes BatchNorm average its batch statistics across a pmap axis. Every
  layer's output is pinned to the batch's sharding under a mesh.
  """

  def __init__(self, input_shape, features, kernel_sizes, strides, num_outputs, *, head_sizes=(),
               pool="max", norm="batch", activation_name="relu", dropout=0.0, axis_name=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not len(features) == len(kernel_sizes) == len(strides):
      raise UserError(f"model.features, model.kernel_sizes and model.strides need one entry per conv "
                      f"layer, got {len(features)}, {len(kernel_sizes)}, {len(strides)}")
    if pool not in POOLS:
      raise UserError(f"model.pool={pool!r}: expected one of {', '.join(POOLS)}")
    if norm not in NORMS:
      raise UserError(f"model.norm={norm!r}: expected one of {', '.join(NORMS)}")
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
    sizes = [math.prod(spatial) * channels, *head_sizes]
    self.head = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_outputs, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.act = activation(activation_name)
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
