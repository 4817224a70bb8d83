"""ResNet v1.5 image classifier (He et al. 2016; torchvision's layout): basic or bottleneck blocks, BatchNorm.

v1.5 puts a bottleneck block's stride on its 3x3 convolution (v1: on the first
1x1). Convolutions have no biases and pad as torchvision does (k // 2 each
side), so the spatial sizes and parameter counts equal torchvision's:
ResNet-18 11,689,512 and ResNet-50 25,557,032 parameters at 1,000 classes.
The `small` stem (one 3x3 stride-1 conv, no max pool) keeps 32x32 images at
full resolution into the first stage. BatchNorm computes in float32 with
torchvision's momentum (0.1, Flax's 0.9) and epsilon (1e-5); `axis_name` makes it
average batch statistics over a pmap axis. Every block's output is pinned to
the batch's sharding (`jaxmodels.parallel.constrain`).

Shape suffixes: B batch, H/W spatial, C channels, K classes.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import (
  POSITIVE,
  SIZES,
  axes,
  choice,
  require,
  resolve,
  tuples,
)
from jaxmodels.parallel.sharding import constrain

__all__ = ["BATCH", "Block", "BLOCKS", "ConvBN", "ResNet", "ResNetConfig", "STEMS"]

BATCH = ("activation_batch",)
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """ResNet depth and width; raises ValueError naming the first bad field. ResNet-18: the defaults."""

  stage_sizes: tuple = (2, 2, 2, 2)  # blocks per stage (ResNet-50: (3, 4, 6, 3) bottleneck blocks)
  block: str = "basic"  # basic (two 3x3 convs) | bottleneck (1x1, 3x3, 1x1 with 4x expansion)
  width: int = 64  # channels of the first stage, doubled at each later stage (which halves the resolution)
  stem: str = "imagenet"  # imagenet (7x7/2 conv + 3x3/2 max pool) | small (3x3/1 conv, for 32x32 images)

  def __post_init__(self):
    tuples(self, "stage_sizes")
    require(self, "stage_sizes", SIZES)
    require(self, "stage_sizes", (lambda v: len(v) > 0, "at least one stage"))
    choice(self, "block", BLOCKS)
    require(self, "width", POSITIVE)
    choice(self, "stem", STEMS)


class ConvBN(nnx.Module):
  """k x k convolution (no bias, torchvision's padding) -> BatchNorm (float32)."""

  def __init__(self, c_in, c_out, k, stride, *, axis_name, dtype, param_dtype, rngs):
    self.conv = nnx.Conv(c_in, c_out, (k, k), (stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False,
                         dtype=dtype, param_dtype=param_dtype,
                         kernel_metadata=axes(None, None, "conv_in", "conv_out"), rngs=rngs)
    self.norm = nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                              axis_name=axis_name, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x_BHWC, train):
    return self.norm(self.conv(x_BHWC), use_running_average=not train).astype(self.dtype)


class Block(nnx.Module):
  """A residual block: relu(convs(x) + shortcut(x)); the shortcut projects (1x1 conv + BN) when shapes change."""

  def __init__(self, c_in, width, stride, kind, **kw):
    c_out = width * (4 if kind == "bottleneck" else 1)
    if kind == "basic":
      self.convs = nnx.List([ConvBN(c_in, width, 3, stride, **kw), ConvBN(width, width, 3, 1, **kw)])
    else:  # v1.5: the stride on the 3x3
      self.convs = nnx.List([ConvBN(c_in, width, 1, 1, **kw), ConvBN(width, width, 3, stride, **kw),
                             ConvBN(width, c_out, 1, 1, **kw)])
    self.shortcut = ConvBN(c_in, c_out, 1, stride, **kw) if stride != 1 or c_in != c_out else None
    self.c_out = c_out

  def __call__(self, x_BHWC, train):
    h = x_BHWC
    for i, conv in enumerate(self.convs):
      h = conv(h, train)
      if i < len(self.convs) - 1:
        h = jax.nn.relu(h)
    skip = x_BHWC if self.shortcut is None else self.shortcut(x_BHWC, train)
    return constrain(jax.nn.relu(h + skip), BATCH)


class ResNet(nnx.Module):
  """Image classifier: x_BHWC -> stem -> residual stages -> global average pool -> logits_BK.

      ResNet((224, 224, 3), 1000, ResNetConfig(), rngs=nnx.Rngs(0))  # ResNet-18
      ResNet((32, 32, 3), 10, stem="small", rngs=nnx.Rngs(0))

  Raises ValueError for a bad field or an input that is not (H, W, C).
  """

  Config = ResNetConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_classes: int, config: ResNetConfig | None = None, *, axis_name=None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(ResNetConfig, config, fields)
    if len(input_shape) != 3:
      raise ValueError(f"ResNet reads images (H, W, C), got examples of shape {tuple(input_shape)}")
    kw = dict(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = ConvBN(input_shape[-1], c.width, 7 if c.stem == "imagenet" else 3, 2 if c.stem == "imagenet" else 1,
                       **kw)
    self.blocks = nnx.List()
    channels = c.width
    for stage, size in enumerate(c.stage_sizes):
      for i in range(size):
        block = Block(channels, c.width * 2 ** stage, 2 if stage > 0 and i == 0 else 1, c.block, **kw)
        self.blocks.append(block)
        channels = block.c_out
    self.head = nnx.Linear(channels, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.max_pool, self.dtype = c.stem == "imagenet", dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):  # pylint: disable=unused-argument
    h = jax.nn.relu(self.stem(constrain(x.astype(self.dtype), BATCH), train))
    if self.max_pool:
      h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      h = block(constrain(h, BATCH), train)
    pooled_BC = constrain(h.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype), BATCH)
    return constrain(self.head(pooled_BC), BATCH)
