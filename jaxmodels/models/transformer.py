"""Transformers: a decoder-only language model and an encoder classifier (and the blocks of the
encoder-decoder in `jaxmodels.models.encdec`, whose decoder blocks add cross-attention).

All are pre-norm stacks of attention + MLP blocks. Attention (`attention`)
computes its softmax in float32, by two einsums or through
`jax.nn.dot_product_attention` (`model.attention_impl`; `cudnn` gives flash
attention on NVIDIA GPUs). With `scan_layers` (the default) the blocks'
parameters are stacked on a leading layer axis and one `jax.lax.scan` runs
them, so compile time does not grow with depth; `scan_to_unrolled` /
`unrolled_to_scan` convert parameter trees between the two layouts.

Inside the stack, activations are token rows x_MD (M = B x T): every
projection is then a 2-D matmul, whose weight gradient XLA computes without
the transposing copies that the 3-D form costs it (on the CPU those copies took
over a quarter of a text_transformer step). Attention alone reshapes to heads.
The rows are batch-major, so splitting M over the batch's mesh axes gives each
device its own examples' tokens. Activations are pinned with
`jaxmodels.parallel.constrain` (logical axes `activation_batch`, `_embed`,
`_heads`, `_mlp`, `_vocab`) at the embedding output, every block boundary,
inside attention and the MLP, and at the logits.

Sequence parallelism (Megatron-LM's): the token rows of the residual stream,
norms, dropout and logits are ROWS = (`activation_batch`,
`activation_norm_length`), split over the tensor axis too by the default rules;
attention and the MLP pin their input rows whole within the tensor group
(an all-gather) and their output rows split (a reduce-scatter of the
row-parallel projection's partial sums). With batch-major rows, splitting M
further over `tensor` splits each device's sequences when the local batch
divides (the (B, T, ...) views then split B over SEQUENCES' axes), else it cuts
across sequences.

Context parallelism (`jaxmodels.parallel.context`): `activation_length` maps
to the `context` axis, so ROWS, the tensor-parallel regions' TOKENS and the
(B, T, ...) views split each sequence's tokens over it, and attention runs a
ring of key/value blocks over it (the tokens in its load-balanced order).

Shape suffixes: B batch, T query length, S key length, M = B x T token rows,
D d_model, N heads, H head dim, F d_ff, V vocabulary, L layers.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import (
  POSITIVE,
  POSITIVE_REAL,
  RATE,
  axes,
  check_indices,
  check_length,
  check_slots,
  choice,
  require,
  resolve,
)
from jaxmodels.parallel import context
from jaxmodels.parallel.sharding import constrain, per_shard

__all__ = ["Attention", "attention", "ATTENTION_IMPLS", "BATCH", "Block", "BOOL", "check_block_fields",
           "check_heads", "check_stack_fields", "EMBED", "FeedForward", "HEADS", "LENGTH", "lookup", "make_norm",
           "MLP_AXIS", "MLPS", "NORMS", "other_layer_layout", "POOLINGS", "POSITIONS", "REMAT_POLICIES", "rotary",
           "ROWS", "SEQUENCES", "scan_to_unrolled", "segment_mask", "segment_positions", "splash_attention",
           "SPLASH_BLOCKS", "Stack", "TOKENS", "transformer_param_count", "TransformerClassifier", "TransformerConfig",
           "TransformerLM", "unrolled_to_scan", "VOCAB"]

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, MLP_AXIS, VOCAB = "activation_heads", "activation_mlp", "activation_vocab"
ROWS = (BATCH, LENGTH, "activation_norm_length")  # the residual stream's token rows: over `context` and `tensor`
TOKENS = (BATCH, LENGTH)  # the token rows inside the tensor-parallel regions: a sequence split over `context` only
SEQUENCES = (BATCH, "activation_norm_length")  # the batch axis of (B, T, ...) views of the residual stream

NORMS = ("layer", "rms")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu")
POOLINGS = ("mean", "cls")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # splash attention's query / key blocks, largest first (TPU lanes: 128)
BOOL = (lambda v: isinstance(v, bool), "True or False")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A Transformer stack: the decoder LM, the sequence classifier (and, with `ViTConfig`, the ViT encoder).

  GPT-2 style: norm="layer", mlp="gelu", positions="learned", use_bias=True, tie_embeddings=True.
  Llama style: norm="rms", mlp="swiglu", positions="rotary", num_kv_heads < num_heads (grouped-query
  attention), tie_embeddings=False. `jaxmodels.models.presets` holds both at published sizes.
  Raises ValueError naming the first bad field.
  """

  d_model: int = 128  # D, the residual width
  num_heads: int = 4  # N query heads; head size H = d_model / num_heads
  num_kv_heads: int | None = None  # K key/value heads (grouped-query attention), dividing num_heads; None: N
  num_layers: int = 2  # L blocks
  d_ff: int = 512  # F, the MLP's hidden width
  max_len: int = 256  # longest sequence (the learned position table's rows): longer inputs are refused
  norm: str = "layer"  # layer (LayerNorm) | rms (RMSNorm), computed in float32
  norm_eps: float = 1e-6  # the norms' epsilon (GPT-2 1e-5, Llama 1e-5 or 1e-6)
  mlp: str = "swiglu"  # gelu (tanh approximation, as GPT-2) | swiglu (silu(x W_gate) * x W_up)
  positions: str = "rotary"  # rotary (RoFormer, on q and k) | learned (an embedding table of max_len rows)
  rope_theta: float = 10000.0  # rotary base wavelength (Llama 3: 500000)
  use_bias: bool = False  # biases on the attention and MLP projections (GPT-2, ViT)
  tie_embeddings: bool = True  # LM head = the token embedding, transposed
  dropout: float = 0.0  # on the embeddings and each residual branch, in training only
  scan_layers: bool = True  # stack the blocks and run one lax.scan (compile time flat in depth)
  remat: str = "none"  # recompute in the backward pass: none | dots | full
  attention_impl: str = "auto"  # auto | einsum | xla | cudnn | splash (TPU; see `attention`)
  pooling: str = "mean"  # classifiers: mean | cls (a learned class token)

  def __post_init__(self):
    check_stack_fields(self)
    choice(self, "pooling", POOLINGS)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


def check_block_fields(config):
  """ValueError naming the first bad field among the fields of every config that builds a `Stack` of `Block`s
  (TransformerConfig, EncoderDecoderConfig, ViTConfig)."""
  for name in ("d_model", "num_heads", "num_layers", "d_ff"):
    require(config, name, POSITIVE)
  for name in ("use_bias", "scan_layers"):
    require(config, name, BOOL)
  require(config, "norm_eps", POSITIVE_REAL)
  require(config, "dropout", RATE)
  choice(config, "norm", NORMS)
  choice(config, "mlp", MLPS)
  choice(config, "remat", REMAT_POLICIES)
  choice(config, "attention_impl", ATTENTION_IMPLS)


def check_stack_fields(config):
  """ValueError naming the first bad field among TransformerConfig's stack fields (shared with
  `EncoderDecoderConfig`)."""
  check_block_fields(config)
  require(config, "max_len", POSITIVE)
  require(config, "tie_embeddings", BOOL)
  require(config, "rope_theta", POSITIVE_REAL)
  choice(config, "positions", POSITIONS)
  check_heads(config.d_model, config.num_heads, config.num_kv_heads, config.positions == "rotary")


def check_heads(d_model, num_heads, num_kv_heads, rotary_positions):
  """ValueError unless the heads split d_model (into even sizes for rotary) and K divides N."""
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
  if num_kv_heads is not None and not (POSITIVE[0](num_kv_heads) and num_heads % num_kv_heads == 0):
    raise ValueError(f"num_kv_heads={num_kv_heads!r}: expected unset or a positive divisor of "
                     f"num_heads={num_heads}")
  if rotary_positions and (d_model // num_heads) % 2:
    raise ValueError(f"positions=rotary needs an even head size, but d_model / num_heads = "
                     f"{d_model // num_heads}")


def make_norm(kind, d, eps, param_dtype, rngs):
  """LayerNorm or RMSNorm, computing in float32 whatever the compute dtype."""
  if kind == "layer":
    return nnx.LayerNorm(d, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"),
                         bias_metadata=axes("embed"), rngs=rngs)
  return nnx.RMSNorm(d, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"),
                     rngs=rngs)


def rotary(x_BTNH, positions_BT, theta: float = 10000.0):
  """Rotary position embedding (RoFormer), in float32, on the two halves of the head dim (Llama's layout)."""
  h = x_BTNH.shape[-1] // 2
  freqs_H = 1.0 / (theta ** (jnp.arange(h, dtype=jnp.float32) / h))
  angles_BTH = positions_BT[..., None].astype(jnp.float32) * freqs_H
  sin, cos = jnp.sin(angles_BTH)[:, :, None, :], jnp.cos(angles_BTH)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, *, is_causal=False, interpret=False):
  """JAX's Pallas TPU splash-attention kernel (causal or full), forward and backward; (B, T, N, H) out.

  Per example and key/value head, the kernel's multi-query form serves that head's G = N / K query heads
  (grouped-query attention). Queries are scaled by H^-1/2 here (the kernel does not scale); the kernel's
  softmax accumulates in float32. Its blocks are the largest of SPLASH_BLOCKS dividing T and S: ValueError
  unless both are multiples of 128. The kernel lowers for TPUs only (a Mosaic custom call); `interpret` runs
  it in Pallas's interpreter on any backend (tests).
  """
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if T % SPLASH_BLOCKS[-1] or S % SPLASH_BLOCKS[-1]:
    raise ValueError(f"splash attention needs sequence lengths that are multiples of {SPLASH_BLOCKS[-1]}, got "
                     f"{T} queries and {S} keys: use attention_impl=xla (or einsum) for them")
  bq, bkv = (next(b for b in SPLASH_BLOCKS if n % b == 0) for n in (T, S))
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  head_mask = splash.CausalMask((T, S)) if is_causal else splash.FullMask((T, S))
  kernel = splash.make_splash_mqa_single_device(splash.MultiHeadMask([head_mask] * (N // K)), block_sizes=blocks,
                                                interpret=interpret)
  q_BKGTH = (q_BTNH * H ** -0.5).astype(q_BTNH.dtype).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  out_BKGTH = jax.vmap(jax.vmap(kernel))(q_BKGTH, k_BKSH, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, implementation: str = "auto", *, is_causal=False, mask_BNTS=None):
  """Softmax attention with a float32 softmax; K key/value heads serve N = K x G query heads (GQA).

  `mask_BNTS` (bool, True = attend) broadcasts over batch and heads (its N may be 1); with
  `is_causal` both apply. `implementation`:

  - `einsum`: two einsums, written here. jax.nn.dot_product_attention's XLA path
    (which reshapes to 5-D for grouped queries) ran forward + backward 2x slower
    on the CPU: 3.7 vs 1.8 ms for 12 x 64 tokens, 4 heads of 32.
  - `xla` / `cudnn`: jax.nn.dot_product_attention with that implementation.
  - `auto`: `einsum`, except on GPUs, where jax.nn.dot_product_attention picks
    (cuDNN flash attention where it supports the shapes and dtype).
  - `splash`: `splash_attention`, the Pallas TPU kernel (TPUs only; causal or full attention).

  cuDNN's and splash's kernels take no arbitrary mask here: with a mask (segments, padding, a KV cache),
  `cudnn` runs jax.nn's choice and `splash` the `xla` path instead.
  """
  if implementation == "splash":
    if mask_BNTS is None:  # each device runs the kernel on its examples and heads (never a split sequence)
      kernel = lambda q, k, v: splash_attention(q, k, v, is_causal=is_causal)
      return per_shard(kernel, [(BATCH, None, HEADS)] * 3)(q_BTNH, k_BSKH, v_BSKH)
    implementation = "xla"
  if implementation == "cudnn" and mask_BNTS is not None:
    implementation = "auto"
  if implementation == "auto" and jax.default_backend() == "gpu":
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BNTS, is_causal=is_causal)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BNTS, is_causal=is_causal,
                                        implementation=implementation)
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS * H ** -0.5
  if is_causal:
    causal_TS = jnp.tril(jnp.ones(scores_BKGTS.shape[-2:], bool))
    mask_BNTS = causal_TS[None, None] if mask_BNTS is None else mask_BNTS & causal_TS
  if mask_BNTS is not None:
    b, n = mask_BNTS.shape[:2]
    mask_BKGTS = mask_BNTS[:, :, None] if n == 1 else mask_BNTS.reshape(b, K, N // K, *mask_BNTS.shape[2:])
    scores_BKGTS = jnp.where(mask_BKGTS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH).reshape(B, T, N, H)


def segment_positions(segment_ids_BT):
  """Each token's index within its segment (packed document): positions restart where the id changes."""
  t_BT = jnp.broadcast_to(jnp.arange(segment_ids_BT.shape[1]), segment_ids_BT.shape)
  starts_BT = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return t_BT - jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)


def segment_mask(q_segment_ids_BT, kv_segment_ids_BS):
  """mask_B1TS: a query attends only to keys of its own segment (document; 0 marks padding by convention)."""
  return (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])[:, None]


def lookup(embed: nnx.Embed, ids, dtype):
  """`embed(ids)`, from the whole table: under FSDP the table (split over `embed`) is all-gathered.

  Left to itself XLA may instead all-gather the ids of the whole batch, look up
  every token's slice of the table on every device and reshuffle the result.
  """
  table = constrain(embed.embedding[...], (None, None))  # unsplit: the whole table on every device
  return jnp.take(table, ids, axis=0).astype(dtype)


def _linear(a, b, names, use_bias, dtype, param_dtype, rngs):
  return nnx.Linear(a, b, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_metadata=axes(*names),
                    bias_metadata=axes(names[-1]), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with `num_kv_heads` key/value heads; with a KV cache it attends to the prefix too."""

  def __init__(self, d_model, num_heads, *, causal, rotary_positions, implementation, dtype, param_dtype, rngs,
               num_kv_heads=None, use_bias=False, rope_theta=10000.0):
    check_heads(d_model, num_heads, num_kv_heads, rotary_positions)
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    kv_width = self.num_kv_heads * self.head_dim
    linear = lambda a, b, names: _linear(a, b, names, use_bias, dtype, param_dtype, rngs)
    # Column-parallel projections into heads, row-parallel out of them (Megatron).
    self.query = linear(d_model, d_model, ("embed", "heads"))
    self.key = linear(d_model, kv_width, ("embed", "heads"))
    self.value = linear(d_model, kv_width, ("embed", "heads"))
    self.out = linear(d_model, d_model, ("heads", "embed"))
    self.causal, self.rotary_positions, self.rope_theta = causal, rotary_positions, rope_theta
    self.implementation = implementation

  def _split(self, y_MD, B, T, n):
    return constrain(y_MD.reshape(B, T, n, self.head_dim), (BATCH, LENGTH, HEADS))

  def _project_out(self, out_BTNH):
    B, T = out_BTNH.shape[:2]
    out_MD = self.out(constrain(out_BTNH.reshape(B * T, -1), (TOKENS, HEADS)))
    return constrain(out_MD, (ROWS, EMBED))  # sequence parallelism: a reduce-scatter

  def keys_values(self, x_MD, positions_BS):
    """(k_BSKH, v_BSKH) of the B x S token rows x_MD, rotary on the keys if this module uses it."""
    B, S = positions_BS.shape
    k_BSKH = self._split(self.key(x_MD), B, S, self.num_kv_heads)
    v_BSKH = self._split(self.value(x_MD), B, S, self.num_kv_heads)
    if self.rotary_positions:
      k_BSKH = rotary(k_BSKH, positions_BS, self.rope_theta)
    return k_BSKH, v_BSKH

  def __call__(self, x_MD, positions_BT, mask_B1TS=None, cache=None, cache_index=None, layer=0):
    """x_MD (token rows) -> out_MD; `mask_B1TS` restricts attention (segments, padding; with a cache: all of it).
    Under context parallelism (`jaxmodels.parallel.context`) `mask_B1TS` is instead None or the (B, T) segment
    ids, and the tokens come in its load-balanced order.

    With `cache` ({'k', 'v'}: every layer's (L, B, S, K, H)), this chunk's keys and values are written in place
    at (`layer`, slots `cache_index`..), and the queries attend to the layer's slots under `mask_B1TS`; returns
    (out_MD, the updated cache), or (out_MD, None) without a cache.
    """
    B, T = positions_BT.shape
    x_MD = constrain(x_MD, (TOKENS, EMBED))  # sequence parallelism: all-gather the tensor group's rows
    q_BTNH = self._split(self.query(x_MD), B, T, self.num_heads)
    if self.rotary_positions:
      q_BTNH = rotary(q_BTNH, positions_BT, self.rope_theta)
    k_BTKH, v_BTKH = self.keys_values(x_MD, positions_BT)
    if cache is None:
      if context.size() > 1:  # context parallelism: a ring of key/value blocks; mask_B1TS holds segment ids
        out_BTNH = context.attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal, segment_ids_BT=mask_B1TS)
      else:
        out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, self.implementation, is_causal=self.causal,
                             mask_BNTS=mask_B1TS)
      out_BTNH = constrain(out_BTNH, (BATCH, LENGTH, HEADS))
      new_cache = None
    else:  # decoding: write this chunk into the carried cache, attend where the caller's mask allows
      write = lambda c, u: jax.lax.dynamic_update_slice(c, u[None].astype(c.dtype), (layer, 0, cache_index, 0, 0))
      new_cache = {"k": write(cache["k"], k_BTKH), "v": write(cache["v"], v_BTKH)}
      out_BTNH = attention(q_BTNH, new_cache["k"][layer], new_cache["v"][layer], self.implementation,
                           mask_BNTS=mask_B1TS)
    return self._project_out(out_BTNH), new_cache

  def cross(self, x_MD, k_BSKH, v_BSKH, mask_B1TS=None):
    """Cross-attention: the B x T token rows x_MD query given keys and values (`keys_values` of another
    sequence, e.g. an encoder's output, computed once per sequence when decoding); returns out_MD."""
    B = k_BSKH.shape[0]
    x_MD = constrain(x_MD, (BATCH, EMBED))  # sequence parallelism: all-gather the tensor group's rows
    q_BTNH = self._split(self.query(x_MD), B, x_MD.shape[0] // B, self.num_heads)
    out_BTNH = constrain(attention(q_BTNH, k_BSKH, v_BSKH, self.implementation, mask_BNTS=mask_B1TS),
                         (BATCH, LENGTH, HEADS))
    return self._project_out(out_BTNH)


class FeedForward(nnx.Module):
  """GELU MLP (D -> F -> D) or SwiGLU (silu(x W_gate) * x W_up, then W_down)."""

  def __init__(self, d_model, d_ff, kind, *, dtype, param_dtype, rngs, use_bias=False):
    linear = lambda a, b, names: _linear(a, b, names, use_bias, dtype, param_dtype, rngs)
    self.up, self.down = linear(d_model, d_ff, ("embed", "mlp")), linear(d_ff, d_model, ("mlp", "embed"))
    self.gate = linear(d_model, d_ff, ("embed", "mlp")) if kind == "swiglu" else None

  def __call__(self, x_MD):
    x_MD = constrain(x_MD, (TOKENS, EMBED))  # sequence parallelism: all-gather the tensor group's rows
    hidden = lambda layer: constrain(layer(x_MD), (TOKENS, MLP_AXIS))
    h_MF = jax.nn.gelu(hidden(self.up)) if self.gate is None else jax.nn.silu(hidden(self.gate)) * hidden(self.up)
    return constrain(self.down(constrain(h_MF, (TOKENS, MLP_AXIS))), (ROWS, EMBED))  # SP: a reduce-scatter


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)), with dropout on each branch.

  With `cross_attention` (an encoder-decoder's decoder block) a cross-attention branch,
  x + cross_attn(norm(x), memory), sits between the two: the same `Attention` module, unmasked by causality
  and without rotary positions (queries and keys come from different sequences).
  """

  def __init__(self, d_model, num_heads, d_ff, *, causal, norm, mlp, rotary_positions, implementation,
               dropout, dtype, param_dtype, rngs, num_kv_heads=None, use_bias=False, norm_eps=1e-6,
               rope_theta=10000.0, cross_attention=False):
    self.attn_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs)
    attn = lambda causal, rotary_positions: Attention(
        d_model, num_heads, causal=causal, rotary_positions=rotary_positions, implementation=implementation,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, num_kv_heads=num_kv_heads, use_bias=use_bias,
        rope_theta=rope_theta)
    self.attn = attn(causal, rotary_positions)
    self.cross_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs) if cross_attention else None
    self.cross_attn = attn(False, False) if cross_attention else None
    self.mlp_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs)
    self.mlp = FeedForward(d_model, d_ff, mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias)
    self.dropout = nnx.Dropout(dropout)
    self.dtype = dtype

  def __call__(self, x_MD, positions_BT, mask_B1TS=None, cache=None, cache_index=None, rngs=None, layer=0,
               cross=None):
    """(x_MD, cache); `cross` (cross-attention blocks): {'mask_B1TS'} and either the memory's rows 'memory_MD'
    with its 'positions_BS' (keys and values projected here) or this layer's 'k', 'v' (B, S, K, H)."""
    deterministic = rngs is None
    h_MD, cache = self.attn(self.attn_norm(x_MD).astype(self.dtype), positions_BT, mask_B1TS, cache, cache_index,
                            layer)
    x_MD = constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED))
    if self.cross_attn is not None:
      if "k" in cross:
        k_BSKH, v_BSKH = cross["k"], cross["v"]
      else:
        k_BSKH, v_BSKH = self.cross_attn.keys_values(cross["memory_MD"], cross["positions_BS"])
      h_MD = self.cross_attn.cross(self.cross_norm(x_MD).astype(self.dtype), k_BSKH, v_BSKH, cross["mask_B1TS"])
      x_MD = constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED))
    h_MD = self.mlp(self.mlp_norm(x_MD).astype(self.dtype))
    return constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED)), cache


class Stack(nnx.Module):
  """`config.num_layers` blocks (stacked and scanned, or a list) followed by a final norm.

  `config` is any object with TransformerConfig's block fields (a `TransformerConfig`, a `ViTConfig`).
  """

  def __init__(self, config, *, causal, rotary_positions, dtype, param_dtype, rngs, cross_attention=False):
    c = config
    block_kwargs = dict(d_model=c.d_model, num_heads=c.num_heads, d_ff=c.d_ff, causal=causal, norm=c.norm,
                        mlp=c.mlp, rotary_positions=rotary_positions, implementation=c.attention_impl,
                        dropout=c.dropout, dtype=dtype, param_dtype=param_dtype,
                        num_kv_heads=getattr(c, "num_kv_heads", None), use_bias=c.use_bias, norm_eps=c.norm_eps,
                        rope_theta=getattr(c, "rope_theta", 10000.0), cross_attention=cross_attention)
    make = lambda r: Block(rngs=r, **block_kwargs)
    if c.scan_layers:
      stacked = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      self.blocks = nnx.split_rngs(splits=c.num_layers)(stacked)(rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(c.num_layers)])
    self.final_norm = make_norm(c.norm, c.d_model, c.norm_eps, param_dtype, rngs)
    self.num_layers, self.scan_layers, self.remat, self.dropout_rate = c.num_layers, c.scan_layers, c.remat, c.dropout
    self.num_kv_heads = getattr(c, "num_kv_heads", None) or c.num_heads
    self.head_dim = c.d_model // c.num_heads

  def __call__(self, x_BTD, positions_BT, mask_B1TS=None, cache=None, cache_index=None, rngs=None, cross=None):
    """Returns (normed output, new cache); `cache` holds per-layer arrays on a leading L axis.

    `cross` (a stack built with `cross_attention`): {'mask_B1TS'} and either 'memory_BSD' (the encoder's output,
    every layer projecting its own keys and values) or 'k', 'v' (L, B, S, K, H) from `cross_keys_values`.

    The cache is carried through the layers and each layer writes only its new (B, T, K, H) chunk, in place
    (`dynamic_update_slice` on the carried buffer): a decoding step never copies the whole cache (with the
    cache donated, a step's temporary memory is about one layer's keys and values; tests/test_sequence_models.py).
    """
    B, T, D = x_BTD.shape
    x_MD = constrain(x_BTD.reshape(B * T, D), (ROWS, EMBED))
    use_dropout = rngs is not None and self.dropout_rate > 0
    keys_L = jax.random.split(rngs.dropout(), self.num_layers) if use_dropout else None

    layer_kv, shared = None, None  # cross-attention inputs: per layer (scanned with the blocks) and common
    if cross is not None:
      shared = {"mask_B1TS": cross["mask_B1TS"]}
      if "k" in cross:
        layer_kv = {"k": cross["k"], "v": cross["v"]}
      else:
        memory_BSD = cross["memory_BSD"]
        shared["memory_MD"] = constrain(memory_BSD.reshape(-1, D), (BATCH, EMBED))
        shared["positions_BS"] = jnp.broadcast_to(jnp.arange(memory_BSD.shape[1]), memory_BSD.shape[:2])

    def apply(graphdef, state, x, cache, key, i, kv):
      block = nnx.merge(graphdef, state)
      return block(x, positions_BT, mask_B1TS, cache, cache_index, nnx.Rngs(dropout=key) if use_dropout else None,
                   layer=i, cross=None if shared is None else {**shared, **(kv or {})})

    if REMAT_POLICIES[self.remat] is not None:
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(carry, xs):
        state_l, key_l, i, kv_l = xs
        return apply(graphdef, state_l, *carry, key_l, i, kv_l), None

      (x_MD, new_cache), _ = jax.lax.scan(body, (x_MD, cache),
                                          (state, keys_L, jnp.arange(self.num_layers), layer_kv))
    else:
      new_cache = cache
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        x_MD, new_cache = apply(graphdef, state, x_MD, new_cache, None if keys_L is None else keys_L[i], i,
                                None if layer_kv is None else jax.tree.map(lambda a, i=i: a[i], layer_kv))
    return constrain(self.final_norm(x_MD).reshape(B, T, D), (SEQUENCES, LENGTH, EMBED)), new_cache


  def cross_keys_values(self, memory_BSD) -> dict:
    """Every layer's cross-attention keys and values of `memory_BSD`: {'k', 'v'} (L, B, S, K, H), computed once
    per sequence for decoding (`__call__`'s `cross`)."""
    B, S, D = memory_BSD.shape
    memory_MD = constrain(memory_BSD.reshape(B * S, D), (BATCH, EMBED))
    positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
    project = lambda block: block.cross_attn.keys_values(memory_MD, positions_BS)
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      _, (k, v) = jax.lax.scan(lambda _, state_l: (None, project(nnx.merge(graphdef, state_l))), None, state)
    else:
      k, v = (jnp.stack(a) for a in zip(*(project(block) for block in self.blocks)))
    return {"k": k, "v": v}


class TransformerLM(nnx.Module):
  """Decoder-only language model: tokens_BT (int32) -> logits_BTV (the compute dtype).

      TransformerLM(vocab_size, TransformerConfig(d_model=256, num_layers=4), rngs=nnx.Rngs(0))
      TransformerLM(vocab_size, num_layers=4, rngs=nnx.Rngs(0))  # fields as keyword arguments

  Raises ValueError (a bad field) or TypeError (a config of another family); calls raise ValueError for
  what the model cannot compute, naming the sizes: a sequence longer than `max_len` (with rotary positions
  too), a cache longer than `max_len` or a write past its slots, and, where the values are known (an eager
  call, not inside jax.jit or scan: `jaxmodels.models.layers.known`), a token id outside the vocabulary, a
  position outside [0, max_len) or a cache index past its slots.
  """

  Config = TransformerConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("lm",)

  def __init__(self, vocab_size: int, config: TransformerConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(TransformerConfig, config, fields)
    d = c.d_model
    self.embed = nnx.Embed(vocab_size, d, dtype=dtype, param_dtype=param_dtype,
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    self.pos_embed = (nnx.Embed(c.max_len, d, dtype=dtype, param_dtype=param_dtype,
                                embedding_metadata=axes(None, "embed"), rngs=rngs)
                      if c.positions == "learned" else None)
    self.stack = Stack(c, causal=True, rotary_positions=c.positions == "rotary", dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.head = (None if c.tie_embeddings else
                 nnx.Linear(d, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                            kernel_metadata=axes("embed", "vocab"), rngs=rngs))
    self.embed_dropout = nnx.Dropout(c.dropout)
    self.max_len, self.vocab_size, self.dtype = c.max_len, vocab_size, dtype

  def _forward(self, tokens_BT, positions_BT, mask_B1TS, cache, cache_index, rngs):
    x_BTD = lookup(self.embed, tokens_BT, self.dtype)
    if self.pos_embed is not None:
      x_BTD = x_BTD + lookup(self.pos_embed, positions_BT, self.dtype)
    x_BTD = self.embed_dropout(x_BTD, deterministic=rngs is None, rngs=rngs)
    x_BTD = constrain(x_BTD, (SEQUENCES, LENGTH, EMBED))  # the stack's (sequence-parallel) rows, see Stack
    h_BTD, cache = self.stack(x_BTD, positions_BT, mask_B1TS, cache, cache_index, rngs)
    B, T, D = h_BTD.shape
    h_MD = constrain(h_BTD.reshape(B * T, D).astype(self.dtype), (ROWS, EMBED))  # a 2-D head matmul
    # Sequence-parallel logits: split by rows (vocabulary whole) where ROWS take `tensor`, else by vocabulary.
    logits_MV = constrain(self.embed.attend(h_MD) if self.head is None else self.head(h_MD), (ROWS, VOCAB))
    return constrain(logits_MV.reshape(B, T, -1), (SEQUENCES, LENGTH, VOCAB)), cache

  def __call__(self, tokens_BT, *, segment_ids_BT=None, positions_BT=None, train: bool = False,
               rngs: nnx.Rngs | None = None):
    """logits_BTV. `segment_ids_BT` (int) packs documents in a row: a token attends only to earlier tokens of
    its own segment, and positions restart at each segment's first token. `positions_BT` (int): the tokens'
    positions, if not those.

    Under context parallelism (an `activation_sharding` splitting `activation_length`), the tokens (and segment
    ids) come in `jaxmodels.parallel.context.load_balance` order with their `positions_BT`, and so do the
    logits: the train and eval steps arrange it (`jaxmodels.models.forward.context_order`). ValueError without
    `positions_BT` there.
    """
    B, T = tokens_BT.shape
    check_length(T, self.max_len)
    check_indices(tokens_BT, self.vocab_size, "token id")
    if context.size() > 1:  # the ring attends by segment ids and the chunks' places, never a (T, T) mask
      if positions_BT is None:
        raise ValueError("under context parallelism the tokens come in context.load_balance order with their "
                         "positions_BT (the train and eval steps arrange it: models.forward.context_order)")
      mask_B1TS = segment_ids_BT
    elif segment_ids_BT is None:
      mask_B1TS = None
    else:
      mask_B1TS = segment_mask(segment_ids_BT, segment_ids_BT)
    if positions_BT is None:
      positions_BT = (jnp.broadcast_to(jnp.arange(T), (B, T)) if segment_ids_BT is None
                      else segment_positions(segment_ids_BT))
    return self._forward(tokens_BT, positions_BT, mask_B1TS, None, None, rngs if train else None)[0]

  def init_cache(self, batch_size: int, length: int) -> dict:
    """An empty KV cache for `length` slots: 'k', 'v' (L, B, S, K, H) and each slot's 'segment_ids' (B, S).
    ValueError for a `length` above max_len (slot i holds position i)."""
    check_length(length, self.max_len, "a cache")
    s = self.stack
    shape = (s.num_layers, batch_size, length, s.num_kv_heads, s.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "segment_ids": jnp.zeros((batch_size, length), jnp.int32)}

  def decode(self, tokens_BT, cache: dict, index, *, segment_ids_BT=None, positions_BT=None):
    """Logits for the tokens in cache slots index..index+T-1, attending to the filled slots; returns (logits, cache).

    Each query attends to slots up to its own that hold its segment id (default 1 for every token). Batched
    prompts of different lengths: left-pad them with segment id 0 and pass `positions_BT` counting each row's
    real tokens from 0 (default: the slot index), so every row decodes as if it were alone.
    ValueError (see the class) for a cache of more than max_len slots, tokens past its slots, and known token ids
    or positions out of range.
    """
    if context.size() > 1:
      raise ValueError("decoding under context parallelism is not supported: decode without a context axis")
    B, T = tokens_BT.shape
    S = cache["segment_ids"].shape[1]
    check_length(S, self.max_len, "a cache")
    check_slots(index, T, S)
    check_indices(tokens_BT, self.vocab_size, "token id")
    if positions_BT is not None:
      check_indices(positions_BT, self.max_len, "position")
    slots_T = index + jnp.arange(T)
    segment_ids_BT = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    positions_BT = jnp.broadcast_to(slots_T, (B, T)) if positions_BT is None else positions_BT
    kv_segment_ids_BS = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids_BT, index, 1)
    causal_TS = jnp.arange(kv_segment_ids_BS.shape[1])[None, :] <= slots_T[:, None]
    mask_B1TS = segment_mask(segment_ids_BT, kv_segment_ids_BS) & causal_TS
    logits_BTV, kv = self._forward(tokens_BT, positions_BT, mask_B1TS, {"k": cache["k"], "v": cache["v"]}, index,
                                   None)
    return logits_BTV, {**kv, "segment_ids": kv_segment_ids_BS}


class TransformerClassifier(nnx.Module):
  """Bidirectional encoder over a sequence: x_BLF (features) -> logits_BK, by CLS or mean pooling.

  `input_shape` is one example's shape: (L, ...) with everything after L
  flattened into features (digit rows: (8, 8, 1) -> 8 steps of 8 features).
  Raises ValueError if the sequence (plus a class token) exceeds `max_len`.
  """

  Config = TransformerConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_classes: int, config: TransformerConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(TransformerConfig, config, fields)
    d, length = c.d_model, input_shape[0] + (c.pooling == "cls")
    check_length(length, c.max_len)
    self.proj = nnx.Linear(math.prod(input_shape[1:]), d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, d), param_dtype)) if c.pooling == "cls" else None
    self.pos_embed = (nnx.Embed(c.max_len, d, dtype=dtype, param_dtype=param_dtype,
                                embedding_metadata=axes(None, "embed"), rngs=rngs)
                      if c.positions == "learned" else None)
    self.stack = Stack(c, causal=False, rotary_positions=c.positions == "rotary", dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(d, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.max_len, self.dtype = c.max_len, dtype

  def __call__(self, x, *, mask_BL=None, train: bool = False, rngs: nnx.Rngs | None = None):
    """logits_BK; `mask_BL` (bool, True = a real step) leaves padding out of attention and mean pooling.
    ValueError for a sequence (plus a class token) longer than max_len."""
    B, L = x.shape[:2]
    check_length(L + (self.cls is not None), self.max_len)
    x_BLD = constrain(self.proj(constrain(x.reshape(B, L, -1).astype(self.dtype), (BATCH,))),
                      (BATCH, LENGTH, EMBED))
    if self.cls is not None:
      x_BLD = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(self.dtype), (B, 1, x_BLD.shape[-1])),
                               x_BLD], axis=1)
    positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    if self.pos_embed is not None:
      x_BLD = x_BLD + lookup(self.pos_embed, positions_BL, self.dtype)
    x_BLD = constrain(x_BLD, (BATCH, LENGTH, EMBED))
    mask_B1LL = None  # (B, 1, 1, L): broadcast over heads and queries
    if mask_BL is not None:
      if self.cls is not None:  # the class token is always real
        mask_BL = jnp.concatenate([jnp.ones((B, 1), bool), mask_BL.astype(bool)], axis=1)
      mask_B1LL = mask_BL[:, None, None, :]  # keys: every step attends to the real ones only
    h_BLD, _ = self.stack(x_BLD, positions_BL, mask_B1LL, rngs=rngs if train else None)
    if self.cls is not None:
      pooled_BD = h_BLD[:, 0]
    elif mask_BL is None:
      pooled_BD = h_BLD.mean(axis=1)
    else:
      weights_BL = mask_BL.astype(h_BLD.dtype)
      pooled_BD = jnp.einsum("bld,bl->bd", h_BLD, weights_BL) / weights_BL.sum(axis=1, keepdims=True)
    return constrain(self.out(constrain(pooled_BD, (BATCH, EMBED)).astype(self.dtype)), (BATCH,))


def _is_stack(tree) -> bool:
  return isinstance(tree, dict) and "blocks" in tree and "final_norm" in tree


def _map_stacks(fn, tree):
  """Applies `fn` to every Stack subtree of a pure pytree (params, or optimizer state mirroring them)."""
  return jax.tree.map(lambda t: fn(t) if _is_stack(t) else t, tree, is_leaf=_is_stack)


def scan_to_unrolled(tree):
  """Scanned layout (blocks stacked on a leading layer axis) -> unrolled ('blocks': {0: ..., 1: ...})."""
  def convert(stack):
    num_layers = jax.tree.leaves(stack["blocks"])[0].shape[0]
    blocks = {i: jax.tree.map(lambda a, i=i: a[i], stack["blocks"]) for i in range(num_layers)}
    return {**stack, "blocks": blocks}
  return _map_stacks(convert, tree)


def unrolled_to_scan(tree):
  """Unrolled layout -> scanned layout. Works on parameter trees and on optimizer states."""
  def convert(stack):
    layers = [stack["blocks"][i] for i in sorted(stack["blocks"])]
    return {**stack, "blocks": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
  return _map_stacks(convert, tree)


def other_layer_layout(tree):
  """The same tree in the other layer layout (scanned <-> unrolled), or None if it holds no Stack."""
  stacks = [t for t in jax.tree.leaves(tree, is_leaf=_is_stack) if _is_stack(t)]
  if not stacks:
    return None
  unrolled = all(isinstance(k, int) for k in stacks[0]["blocks"])
  return unrolled_to_scan(tree) if unrolled else scan_to_unrolled(tree)


def transformer_param_count(config: TransformerConfig, vocab_size: int) -> int:
  """Parameters of TransformerLM from its config, by formula (checked against the module in tests).

  Per layer: 2 D^2 + 2 D K H attention projections (K H = D without GQA), 2 D F (gelu)
  or 3 D F (swiglu) MLP, their biases if any, two norms (2 D for LayerNorm, D for
  RMSNorm). Plus V D token embedding, max_len D learned positions, a final norm,
  and D V for an untied head.
  """
  c = config
  d, f, kv = c.d_model, c.d_ff, c.kv_heads * (c.d_model // c.num_heads)
  norm = 2 * d if c.norm == "layer" else d
  mlp_mats = 3 if c.mlp == "swiglu" else 2
  per_layer = 2 * d * d + 2 * d * kv + mlp_mats * d * f + 2 * norm
  if c.use_bias:
    per_layer += 2 * d + 2 * kv + (mlp_mats - 1) * f + d
  total = vocab_size * d + c.num_layers * per_layer + norm
  if c.positions == "learned":
    total += c.max_len * d
  if not c.tie_embeddings:
    total += d * vocab_size
  return total
