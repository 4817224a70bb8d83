"""An MLP-Mixer (Tolstikhin et al., 2021), written as your own module would be: `model.family=
experiments.modules.mixer:Mixer` trains it (experiments/digits_mixer.py). The protocol is on docs/models.md.

Images x_BHWC -> non-overlapping patches (a strided conv) -> `depth` blocks, each an MLP across the patches
(token mixing) and an MLP across the channels, with LayerNorm and residuals -> mean over patches -> logits_BK.
"""

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class MixerConfig:
  """Every field has a default and becomes a `model.*` key: --config.model.depth=4."""
  patch: int = 2  # square patch side, dividing the image height and width
  hidden: int = 64  # channels of each patch token
  depth: int = 2  # mixer blocks
  token_mlp: int = 32  # hidden size of the MLP across patches
  channel_mlp: int = 128  # hidden size of the MLP across channels
  dropout: float = 0.0  # before the head; a key of the built-in families too, with the same default

  def __post_init__(self):
    for name in ("patch", "hidden", "depth", "token_mlp", "channel_mlp"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")


class MixerBlock(nnx.Module):
  """x_BPD + token MLP over P (patches), then + channel MLP over D."""

  def __init__(self, patches: int, c: MixerConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1, self.norm2 = nnx.LayerNorm(c.hidden, **kw), nnx.LayerNorm(c.hidden, **kw)
    self.token1, self.token2 = nnx.Linear(patches, c.token_mlp, **kw), nnx.Linear(c.token_mlp, patches, **kw)
    self.channel1 = nnx.Linear(c.hidden, c.channel_mlp, **kw)
    self.channel2 = nnx.Linear(c.channel_mlp, c.hidden, **kw)

  def __call__(self, x_BPD):
    y_BDP = self.norm1(x_BPD).swapaxes(1, 2)
    x_BPD = x_BPD + self.token2(nnx.gelu(self.token1(y_BDP))).swapaxes(1, 2)
    return x_BPD + self.channel2(nnx.gelu(self.channel1(self.norm2(x_BPD))))


class Mixer(nnx.Module):
  """Image classifier: x_BHWC -> logits_BK. Raises ValueError if `patch` does not divide the image."""

  Config = MixerConfig  # the fields are the run's model.* keys
  tasks = ("classify",)  # array data: classify, binary, multilabel, regress

  def __init__(self, input_shape, num_outputs: int, config: MixerConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    h, w, channels = input_shape
    p = config.patch
    if h % p or w % p:
      raise ValueError(f"patch={p} does not divide the {h}x{w} images")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Conv(channels, config.hidden, (p, p), strides=(p, p), padding="VALID", **kw)
    self.patches = (h // p) * (w // p)
    self.blocks = nnx.List([MixerBlock(self.patches, config, **kw) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.hidden, **kw)
    self.dropout = nnx.Dropout(config.dropout)
    self.head = nnx.Linear(config.hidden, num_outputs, **kw)

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    x_BPD = self.embed(x)
    x_BPD = x_BPD.reshape(x_BPD.shape[0], self.patches, x_BPD.shape[-1])
    for block in self.blocks:
      x_BPD = block(x_BPD)
    pooled_BD = self.norm(x_BPD).mean(axis=1)
    return self.head(self.dropout(pooled_BD, deterministic=not train, rngs=rngs))

  def flops_per_example(self, input_shape) -> float:  # pylint: disable=unused-argument
    """Training FLOPs of one example (MFU): 6 x its multiply-accumulates (2 forward, 4 backward)."""
    size = lambda layer: math.prod(layer.kernel.shape)
    d = self.norm.scale.shape[0]
    macs = self.patches * size(self.embed) + size(self.head)
    for b in self.blocks:
      macs += d * (size(b.token1) + size(b.token2)) + self.patches * (size(b.channel1) + size(b.channel2))
    return 6.0 * macs
