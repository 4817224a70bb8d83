"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token or mean pooling, learned positions.

The encoder is `transformer.Stack`, the same pre-norm blocks as the language
model (bidirectional, no rotary). `input_shape` fixes the number of patches,
hence the position table: ViT-B/16 at 224x224 has 14 x 14 = 196 patches + 1
class token and 86,567,656 parameters with a 1,000-class head. Activations are
pinned like the Transformer's (`jaxmodels.parallel.constrain`).

Shape suffixes: B batch, H/W spatial, C channels, P patches (+ class token), D width, K classes.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import POSITIVE, axes, choice, require, resolve
from jaxmodels.models.transformer import (
  BATCH,
  EMBED,
  LENGTH,
  POOLINGS,
  Stack,
  check_block_fields,
  check_heads,
  lookup,
)
from jaxmodels.parallel.sharding import constrain

__all__ = ["ViT", "ViTConfig"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT encoder fields; the defaults are the CLI's `model.*` defaults, the presets (`vit-s16`, `vit-b16`) the
  paper's (gelu MLP, biases, class token). Raises ValueError naming the first bad field."""

  patch_size: int = 4  # square patches, each one token; must divide the image's height and width
  d_model: int = 128  # D
  num_heads: int = 4
  num_layers: int = 2
  d_ff: int = 512
  norm: str = "layer"  # layer | rms
  norm_eps: float = 1e-6
  mlp: str = "swiglu"  # gelu | swiglu
  use_bias: bool = False  # biases on the attention and MLP projections
  pooling: str = "mean"  # cls (a learned class token) | mean (over patches)
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    require(self, "patch_size", POSITIVE)
    check_block_fields(self)
    choice(self, "pooling", POOLINGS)
    check_heads(self.d_model, self.num_heads, None, False)


class ViT(nnx.Module):
  """Image classifier: x_BHWC -> patches -> Transformer encoder -> class token or mean -> logits_BK.

      ViT((224, 224, 3), 1000, presets.config("vit-b16"), rngs=nnx.Rngs(0))
      ViT((32, 32, 3), 10, patch_size=4, d_model=192, rngs=nnx.Rngs(0))

  Raises ValueError for a bad field, or a patch size that does not divide the image; a call raises ValueError for
  images of another shape than `input_shape` (the position table holds its patches only).
  """

  Config = ViTConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_classes: int, config: ViTConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(ViTConfig, config, fields)
    if len(input_shape) != 3:
      raise ValueError(f"ViT reads images (H, W, C), got examples of shape {tuple(input_shape)}")
    height, width, channels = input_shape
    if height % c.patch_size or width % c.patch_size:
      raise ValueError(f"patch_size={c.patch_size} does not divide the {height}x{width} images")
    p, d = c.patch_size, c.d_model
    self.patch_embed = nnx.Conv(channels, d, (p, p), (p, p), padding="VALID", dtype=dtype, param_dtype=param_dtype,
                                kernel_metadata=axes(None, None, "conv_in", "embed"), bias_metadata=axes("embed"),
                                rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, d), param_dtype)) if c.pooling == "cls" else None
    num_tokens = (height // p) * (width // p) + (c.pooling == "cls")
    self.pos_embed = nnx.Embed(num_tokens, d, dtype=dtype, param_dtype=param_dtype,
                               embedding_metadata=axes(None, "embed"), rngs=rngs)
    self.stack = Stack(c, causal=False, rotary_positions=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head = nnx.Linear(d, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_shape, self.dtype = tuple(input_shape), dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    B = x.shape[0]
    if tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(f"images of shape {tuple(x.shape[1:])}: this ViT was built for {self.input_shape} "
                       f"({self.pos_embed.num_embeddings} position rows)")
    patches_BhwD = self.patch_embed(constrain(x.astype(self.dtype), (BATCH,)))
    x_BPD = patches_BhwD.reshape(B, -1, patches_BhwD.shape[-1])
    if self.cls is not None:
      x_BPD = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(self.dtype), (B, 1, x_BPD.shape[-1])),
                               x_BPD], axis=1)
    positions_BP = jnp.broadcast_to(jnp.arange(x_BPD.shape[1]), x_BPD.shape[:2])
    x_BPD = constrain(x_BPD + lookup(self.pos_embed, positions_BP, self.dtype), (BATCH, LENGTH, EMBED))
    h_BPD, _ = self.stack(x_BPD, positions_BP, rngs=rngs if train else None)
    pooled_BD = constrain(h_BPD[:, 0] if self.cls is not None else h_BPD.mean(axis=1), (BATCH, EMBED))
    return constrain(self.head(pooled_BD.astype(self.dtype)), (BATCH,))
