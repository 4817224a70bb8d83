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
from jaxmodels.models.moe import MoE, MoETerms, check_moe_fields, moe_block_kwargs, moe_period
from jaxmodels.models.rope import ROPE_SCALINGS, rope_frequencies
from jaxmodels.parallel import context, pipeline
from jaxmodels.parallel.sharding import constrain, per_shard
from jaxmodels.runtime.fence import fenced

__all__ = ["Attention", "attention", "ATTENTION_IMPLS", "BATCH", "Block", "BOOL", "check_block_fields",
           "check_heads", "check_stack_fields", "check_variant_fields", "EMBED", "FeedForward", "HEADS", "LENGTH",
           "lookup", "make_norm", "MLP_AXIS", "MLPS", "NORM_POSITIONS", "NORMS", "OPTIONAL_POSITIVE",
           "OPTIONAL_POSITIVE_REAL", "other_layer_layout", "POOLINGS", "POSITIONS", "QK_NORMS", "REMAT_POLICIES",
           "rotary", "ROWS", "SEQUENCES", "scan_to_unrolled", "segment_mask", "segment_positions", "splash_attention",
           "SPLASH_BLOCKS", "Stack", "TOKENS", "transformer_param_count", "TransformerClassifier", "TransformerConfig",
           "TransformerLM", "unrolled_to_scan", "VOCAB"]

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, MLP_AXIS, VOCAB = "activation_heads", "activation_mlp", "activation_vocab"
ROWS = (BATCH, LENGTH, "activation_norm_length")  # the residual stream's token rows: over `context` and `tensor`
TOKENS = (BATCH, LENGTH)  # the token rows inside the tensor-parallel regions: a sequence split over `context` only
SEQUENCES = (BATCH, "activation_norm_length")  # the batch axis of (B, T, ...) views of the residual stream

NORMS = ("layer", "rms")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu", "geglu")
POOLINGS = ("mean", "cls")
QK_NORMS = ("none", "head", "full")
NORM_POSITIONS = ("pre", "post", "sandwich")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # splash attention's query / key blocks, largest first (TPU lanes: 128)
BOOL = (lambda v: isinstance(v, bool), "True or False")
OPTIONAL_POSITIVE = (lambda v: v is None or POSITIVE[0](v), "unset or a positive integer")
OPTIONAL_POSITIVE_REAL = (lambda v: v is None or POSITIVE_REAL[0](v), "unset or a positive number")


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
  mlp: str = "swiglu"  # gelu (tanh approximation, GPT-2) | swiglu (silu(x W_gate) * x W_up) | geglu (Gemma)
  positions: str = "rotary"  # rotary (RoFormer, on q and k) | learned (an embedding table of max_len rows)
  rope_theta: float = 10000.0  # rotary base wavelength (Llama 3: 500000)
  use_bias: bool = False  # biases on the attention and MLP projections (GPT-2, ViT)
  tie_embeddings: bool = True  # LM head = the token embedding, transposed
  dropout: float = 0.0  # on the embeddings and each residual branch, in training only
  scan_layers: bool = True  # stack the blocks and run one lax.scan (compile time flat in depth)
  remat: str = "none"  # recompute in the backward pass: none | dots | full
  attention_impl: str = "auto"  # auto | einsum | xla | cudnn | splash (TPU; see `attention`)
  pooling: str = "mean"  # classifiers: mean | cls (a learned class token)
  # Architecture variants (Hugging Face interop): how released models depart from the GPT-2 and Llama layouts.
  # Each default leaves the model as it was; jaxmodels.hf maps config.json fields onto these.
  head_dim: int | None = None  # H, each head's size; None: d_model / num_heads (Qwen3 and Gemma set their own)
  rope_scaling: str = "none"  # none | linear | llama3 | yarn: rotary frequencies stretched for long contexts (rope.py)
  rope_factor: float = 1.0  # rope_scaling's context-extension factor (Llama 3.1: 8, Llama 3.2: 32)
  rope_original_max_len: int = 8192  # llama3, yarn: the context length the model was pretrained at
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_max_len / this are divided by factor
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
  rope_beta_fast: float = 32.0  # yarn: pairs making more rotations than this in rope_original_max_len are kept
  rope_beta_slow: float = 1.0  # yarn: pairs making fewer rotations than this are divided by factor
  rope_attention_factor: float | None = None  # yarn: the cos/sin scale; None: 0.1 ln(rope_factor) + 1
  sliding_window: int | None = None  # W: a query attends only to the W latest positions, itself included (Mistral)
  qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2); use_bias: on all
  qk_norm: str = "none"  # none | head (RMSNorm of each head's q and k: Qwen3) | full (of all heads at once: OLMo 2)
  # pre: x + f(norm(x)) (GPT-2, Llama) | post: x + norm(f(x)) (OLMo 2) | sandwich: x + norm2(f(norm(x))) (Gemma 2)
  norm_position: str = "pre"
  embed_scale: bool = False  # token embeddings times sqrt(d_model) (Gemma; the tied head uses the table unscaled)
  global_layer_every: int = 0  # with sliding_window: layers i with (i + 1) % this == 0 see every position (Gemma 2: 2)
  attn_logit_softcap: float | None = None  # attention scores c tanh(s / c) (Gemma 2: 50; runs the einsum path)
  final_logit_softcap: float | None = None  # logits c tanh(z / c) (Gemma 2: 30)
  attention_scale_dim: float | None = None  # scores / sqrt(this), not / sqrt(H) (Gemma 2's query_pre_attn_scalar)
  # Mixture of experts (jaxmodels.models.moe)
  num_experts: int = 0  # E expert MLPs (each of width d_ff) in each MoE block; 0: dense MLPs only
  experts_per_token: int = 2  # K experts each token visits (top-k routing), 1..E
  num_shared_experts: int = 0  # experts every token visits besides its K (DeepSeekMoE): one MLP of width S x d_ff
  moe_every: int = 1  # every n-th block is MoE (blocks n-1, 2n-1, ...), the others dense; divides num_layers
  router: str = "softmax"  # softmax (top-k, weights renormalized: Mixtral) | sigmoid (normalized: DeepSeek-V3)
  capacity_factor: float = 0.0  # 0: dropless; > 0: an expert takes at most ceil(factor x M x K / E) assignments
  aux_loss_weight: float = 0.01  # of the load-balancing loss (Switch Transformer) in the training objective
  z_loss_weight: float = 0.001  # of the router z-loss (ST-MoE) in the training objective

  def __post_init__(self):
    check_stack_fields(self)
    check_moe_fields(self)
    choice(self, "pooling", POOLINGS)
    check_variant_fields(self)

  def rope_scaling_args(self) -> tuple:
    """`rotary`'s `scaling`: rope_frequencies' keyword arguments for rope_scaling, as (name, value) pairs."""
    if self.rope_scaling == "none":
      return ()
    return (("scaling", self.rope_scaling), ("factor", self.rope_factor),
            ("original_max_len", self.rope_original_max_len), ("low_freq_factor", self.rope_low_freq_factor),
            ("high_freq_factor", self.rope_high_freq_factor), ("beta_fast", self.rope_beta_fast),
            ("beta_slow", self.rope_beta_slow), ("attention_factor", self.rope_attention_factor))

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


def check_variant_fields(config):
  """ValueError naming the first bad one of TransformerConfig's architecture-variant fields."""
  choice(config, "rope_scaling", ROPE_SCALINGS)
  choice(config, "qk_norm", QK_NORMS)
  choice(config, "norm_position", NORM_POSITIONS)
  require(config, "qkv_bias", BOOL)
  require(config, "embed_scale", BOOL)
  require(config, "rope_original_max_len", POSITIVE)
  for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow"):
    require(config, name, POSITIVE_REAL)
  for name in ("head_dim", "sliding_window"):
    require(config, name, OPTIONAL_POSITIVE)
  for name in ("rope_attention_factor", "attn_logit_softcap", "final_logit_softcap", "attention_scale_dim"):
    require(config, name, OPTIONAL_POSITIVE_REAL)
  require(config, "global_layer_every", (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                         "a non-negative integer"))
  if config.rope_scaling == "llama3" and config.rope_high_freq_factor <= config.rope_low_freq_factor:
    raise ValueError(f"rope_high_freq_factor={config.rope_high_freq_factor} must exceed rope_low_freq_factor="
                     f"{config.rope_low_freq_factor} (rope_scaling=llama3 blends the wavelengths between)")


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
  check_heads(config.d_model, config.num_heads, config.num_kv_heads, config.positions == "rotary",
              getattr(config, "head_dim", None))


def check_heads(d_model, num_heads, num_kv_heads, rotary_positions, head_dim=None):
  """ValueError unless the heads split d_model (or have their own `head_dim`; even for rotary) and K divides N."""
  if head_dim is None and d_model % num_heads:
    raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
  head_dim = head_dim or d_model // num_heads
  if num_kv_heads is not None and not (POSITIVE[0](num_kv_heads) and num_heads % num_kv_heads == 0):
    raise ValueError(f"num_kv_heads={num_kv_heads!r}: expected unset or a positive divisor of "
                     f"num_heads={num_heads}")
  if rotary_positions and head_dim % 2:
    raise ValueError(f"positions=rotary needs an even head size, but the heads have {head_dim}")


def make_norm(kind, d, eps, param_dtype, rngs):
  """LayerNorm or RMSNorm, computing in float32 whatever the compute dtype."""
  if kind == "layer":
    return nnx.LayerNorm(d, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"),
                         bias_metadata=axes("embed"), rngs=rngs)
  return nnx.RMSNorm(d, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"),
                     rngs=rngs)


def rotary(x_BTNH, positions_BT, theta: float = 10000.0, scaling: tuple = ()):
  """Rotary position embedding (RoFormer), in float32, on the two halves of the head dim (Llama's layout).

  `scaling`: `rope_frequencies`' keyword arguments after head_dim and theta, as (name, value) pairs (the
  context-extension scalings of `jaxmodels.models.rope`; `TransformerConfig.rope_scaling_args`); empty: the
  plain frequencies theta^(-2i/H).
  """
  freqs_H, factor = rope_frequencies(x_BTNH.shape[-1], theta, **dict(scaling))
  angles_BTH = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(freqs_H)
  sin, cos = jnp.sin(angles_BTH)[:, :, None, :] * factor, jnp.cos(angles_BTH)[:, :, None, :] * factor
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


def attention(q_BTNH, k_BSKH, v_BSKH, implementation: str = "auto", *, is_causal=False, mask_BNTS=None,
              softcap=None):
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
  `cudnn` runs jax.nn's choice and `splash` the `xla` path instead. `softcap` c (Gemma 2) bounds the scaled
  scores to c tanh(s / c) before the mask; only `einsum` computes it, so any implementation runs `einsum` then.
  """
  if softcap is not None:
    implementation = "einsum"
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
  if softcap is not None:
    scores_BKGTS = softcap * jnp.tanh(scores_BKGTS / softcap)
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
  """`embed(ids)`, the table left split as its parameter is: under FSDP (the table split over `embed`) XLA
  all-gathers the batch's ids (4 bytes a token), every device looks up all of them in its own columns of the
  table, and the rows then go to their devices (the caller pins them).

  Gathering the whole table instead (as this did before) cost, for Llama 3.2's 128,256 x 2,048 table on a v5e
  2x2 slice, a 0.5 GB bfloat16 copy per chip and, in the backward pass, a 1 GB float32 gradient of the whole
  table per chip before its reduce-scatter (docs/benchmarks.md); here the gradient is a scatter into the
  device's own columns. The rows are fenced (jaxmodels.runtime.fence) before the cast to `dtype`: on a TPU, XLA
  would otherwise convert the whole table to a bfloat16 compute dtype before the gather.
  """
  return fenced(jnp.take(embed.embedding[...], ids, axis=0)).astype(dtype)


def _linear(a, b, names, use_bias, dtype, param_dtype, rngs):
  return nnx.Linear(a, b, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_metadata=axes(*names),
                    bias_metadata=axes(names[-1]), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with `num_kv_heads` key/value heads; with a KV cache it attends to the prefix too.

  The architecture variants of TransformerConfig (its fields of the same names): `head_dim` apart from
  d_model / num_heads, `qkv_bias`, `qk_norm` (RMSNorm of q and k, per head or over all heads, before rotary),
  `rope_scaling` (`rotary`'s `scaling` pairs) and `sliding_window` (a mask: query slot t sees key slots s with
  t - W < s <= t, which with a KV cache or packed segments is the same as their positions).
  """

  def __init__(self, d_model, num_heads, *, causal, rotary_positions, implementation, dtype, param_dtype, rngs,
               num_kv_heads=None, use_bias=False, rope_theta=10000.0, head_dim=None, qkv_bias=False,
               qk_norm="none", norm_eps=1e-6, rope_scaling=(), sliding_window=None, global_layer_every=0,
               attn_logit_softcap=None, attention_scale_dim=None):
    check_heads(d_model, num_heads, num_kv_heads, rotary_positions, head_dim)
    self.num_heads, self.head_dim = num_heads, head_dim or d_model // num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    q_width, kv_width = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    linear = lambda a, b, names, bias=use_bias: _linear(a, b, names, bias, dtype, param_dtype, rngs)
    # Column-parallel projections into heads, row-parallel out of them (Megatron).
    self.query = linear(d_model, q_width, ("embed", "heads"), use_bias or qkv_bias)
    self.key = linear(d_model, kv_width, ("embed", "heads"), use_bias or qkv_bias)
    self.value = linear(d_model, kv_width, ("embed", "heads"), use_bias or qkv_bias)
    self.out = linear(q_width, d_model, ("heads", "embed"))
    norm = lambda d, name: nnx.RMSNorm(d, epsilon=norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                                       scale_metadata=axes(name), rngs=rngs)
    widths = {"head": (self.head_dim, self.head_dim, None), "full": (q_width, kv_width, "heads")}.get(qk_norm)
    self.query_norm = norm(widths[0], widths[2]) if widths else None
    self.key_norm = norm(widths[1], widths[2]) if widths else None
    self.qk_norm = qk_norm
    self.causal, self.rotary_positions, self.rope_theta = causal, rotary_positions, rope_theta
    self.rope_scaling, self.sliding_window = tuple(rope_scaling), sliding_window
    self.global_layer_every, self.softcap = global_layer_every, attn_logit_softcap
    # `attention` divides scores by sqrt(H): queries times sqrt(H / attention_scale_dim) divide them by sqrt(that)
    self.query_scale = None if attention_scale_dim is None else (self.head_dim / attention_scale_dim) ** 0.5
    self.implementation = implementation

  def _heads(self, y_MD, B, T, n, norm):
    """(B, T, n, H) heads of a projection, through `norm` (qk_norm) where there is one."""
    if self.qk_norm == "full":
      y_MD = norm(y_MD).astype(y_MD.dtype)
    y_BTNH = self._split(y_MD, B, T, n)
    return norm(y_BTNH).astype(y_MD.dtype) if self.qk_norm == "head" else y_BTNH

  def _window(self, mask_B1TS, q_slots_T, num_keys, layer):
    """`mask_B1TS` narrowed to the sliding window (unchanged without one, or in a global layer)."""
    if self.sliding_window is None:
      return mask_B1TS
    window_TS = q_slots_T[:, None] - jnp.arange(num_keys)[None, :] < self.sliding_window
    if self.global_layer_every:  # `layer` may be traced (scan): a mask of all True in the global layers
      window_TS = window_TS | ((layer + 1) % self.global_layer_every == 0)
    return window_TS[None, None] if mask_B1TS is None else mask_B1TS & window_TS

  def _split(self, y_MD, B, T, n):
    return constrain(y_MD.reshape(B, T, n, self.head_dim), (BATCH, LENGTH, HEADS))

  def _project_out(self, out_BTNH):
    B, T = out_BTNH.shape[:2]
    out_MD = self.out(constrain(out_BTNH.reshape(B * T, -1), (TOKENS, HEADS)))
    return constrain(out_MD, (ROWS, EMBED))  # sequence parallelism: a reduce-scatter

  def keys_values(self, x_MD, positions_BS):
    """(k_BSKH, v_BSKH) of the B x S token rows x_MD, rotary on the keys if this module uses it."""
    B, S = positions_BS.shape
    k_BSKH = self._heads(self.key(x_MD), B, S, self.num_kv_heads, self.key_norm)
    v_BSKH = self._split(self.value(x_MD), B, S, self.num_kv_heads)
    if self.rotary_positions:
      k_BSKH = rotary(k_BSKH, positions_BS, self.rope_theta, self.rope_scaling)
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
    q_BTNH = self._heads(self.query(x_MD), B, T, self.num_heads, self.query_norm)
    if self.rotary_positions:
      q_BTNH = rotary(q_BTNH, positions_BT, self.rope_theta, self.rope_scaling)
    if self.query_scale is not None:
      q_BTNH = q_BTNH * jnp.asarray(self.query_scale, q_BTNH.dtype)
    k_BTKH, v_BTKH = self.keys_values(x_MD, positions_BT)
    if cache is None:
      if context.size() > 1:  # context parallelism: a ring of key/value blocks; mask_B1TS holds segment ids
        out_BTNH = context.attention(q_BTNH, k_BTKH, v_BTKH, causal=self.causal, segment_ids_BT=mask_B1TS)
      else:
        out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, self.implementation, is_causal=self.causal,
                             mask_BNTS=self._window(mask_B1TS, jnp.arange(T), T, layer), softcap=self.softcap)
      out_BTNH = constrain(out_BTNH, (BATCH, LENGTH, HEADS))
      new_cache = None
    else:  # decoding: write this chunk into the carried cache, attend where the caller's mask allows
      write = lambda c, u: jax.lax.dynamic_update_slice(c, u[None].astype(c.dtype), (layer, 0, cache_index, 0, 0))
      new_cache = {"k": write(cache["k"], k_BTKH), "v": write(cache["v"], v_BTKH)}
      mask_B1TS = self._window(mask_B1TS, cache_index + jnp.arange(T), new_cache["k"].shape[2], layer)
      out_BTNH = attention(q_BTNH, new_cache["k"][layer], new_cache["v"][layer], self.implementation,
                           mask_BNTS=mask_B1TS, softcap=self.softcap)
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
  """GELU MLP (D -> F -> D), SwiGLU (silu(x W_gate) * x W_up, then W_down) or GeGLU (gelu(x W_gate) * x W_up,
  tanh-approximated GELU: Gemma)."""

  def __init__(self, d_model, d_ff, kind, *, dtype, param_dtype, rngs, use_bias=False):
    linear = lambda a, b, names: _linear(a, b, names, use_bias, dtype, param_dtype, rngs)
    self.up, self.down = linear(d_model, d_ff, ("embed", "mlp")), linear(d_ff, d_model, ("mlp", "embed"))
    self.gate = linear(d_model, d_ff, ("embed", "mlp")) if kind in ("swiglu", "geglu") else None
    self.gate_activation = jax.nn.gelu if kind == "geglu" else jax.nn.silu

  def __call__(self, x_MD):
    x_MD = constrain(x_MD, (TOKENS, EMBED))  # sequence parallelism: all-gather the tensor group's rows
    hidden = lambda layer: constrain(layer(x_MD), (TOKENS, MLP_AXIS))
    h_MF = (jax.nn.gelu(hidden(self.up)) if self.gate is None else
            self.gate_activation(hidden(self.gate)) * hidden(self.up))
    return constrain(self.down(constrain(h_MF, (TOKENS, MLP_AXIS))), (ROWS, EMBED))  # SP: a reduce-scatter


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)), with dropout on each branch.

  With `cross_attention` (an encoder-decoder's decoder block) a cross-attention branch,
  x + cross_attn(norm(x), memory), sits between the two: the same `Attention` module, unmasked by causality
  and without rotary positions (queries and keys come from different sequences).
  """

  def __init__(self, d_model, num_heads, d_ff, *, causal, norm, mlp, rotary_positions, implementation,
               dropout, dtype, param_dtype, rngs, num_kv_heads=None, use_bias=False, norm_eps=1e-6,
               rope_theta=10000.0, cross_attention=False, norm_position="pre", moe=None, shared_d_ff=0,
               **variants):
    self.attn_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs)
    attn = lambda causal, rotary_positions, **more: Attention(
        d_model, num_heads, causal=causal, rotary_positions=rotary_positions, implementation=implementation,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, num_kv_heads=num_kv_heads, use_bias=use_bias,
        rope_theta=rope_theta, norm_eps=norm_eps, **more)
    self.attn = attn(causal, rotary_positions, **variants)  # Attention's variant keywords (head_dim, ...)
    self.post_norm = norm_position == "post"  # x + norm(f(x)) (OLMo 2): the norms take the branches' outputs
    sandwich = norm_position == "sandwich"  # x + post_norm(f(norm(x))) (Gemma 2): a second norm on each branch
    self.post_attn_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs) if sandwich else None
    self.post_mlp_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs) if sandwich else None
    self.cross_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs) if cross_attention else None
    self.cross_attn = attn(False, False) if cross_attention else None
    self.mlp_norm = make_norm(norm, d_model, norm_eps, param_dtype, rngs)
    self.mlp = (FeedForward(d_model, d_ff, mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=use_bias)
                if moe is None else
                MoE(d_model, d_ff, kind=mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **moe))
    self.shared = (FeedForward(d_model, shared_d_ff, mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                   if shared_d_ff else None)  # shared experts: one MLP as wide as all of them
    self.dropout = nnx.Dropout(dropout)
    self.dtype = dtype

  def __call__(self, x_MD, positions_BT, mask_B1TS=None, cache=None, cache_index=None, rngs=None, layer=0,
               cross=None):
    """(x_MD, cache, MoE stats or None); `cross` (cross-attention blocks): {'mask_B1TS'} and either the memory's
    rows 'memory_MD' with its 'positions_BS' (keys and values projected here) or this layer's 'k', 'v' (B, S, K,
    H)."""
    deterministic = rngs is None
    if self.post_norm:
      h_MD, cache = self.attn(x_MD.astype(self.dtype), positions_BT, mask_B1TS, cache, cache_index, layer)
      x_MD = constrain(x_MD + self.dropout(self.attn_norm(h_MD).astype(self.dtype), deterministic=deterministic,
                                           rngs=rngs), (ROWS, EMBED))
      h_MD, stats = self._mlp(x_MD.astype(self.dtype))
      h_MD = self.mlp_norm(h_MD).astype(self.dtype)
      return constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED)), cache, stats
    h_MD, cache = self.attn(self.attn_norm(x_MD).astype(self.dtype), positions_BT, mask_B1TS, cache, cache_index,
                            layer)
    if self.post_attn_norm is not None:
      h_MD = self.post_attn_norm(h_MD).astype(self.dtype)
    x_MD = constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED))
    if self.cross_attn is not None:
      if "k" in cross:
        k_BSKH, v_BSKH = cross["k"], cross["v"]
      else:
        k_BSKH, v_BSKH = self.cross_attn.keys_values(cross["memory_MD"], cross["positions_BS"])
      h_MD = self.cross_attn.cross(self.cross_norm(x_MD).astype(self.dtype), k_BSKH, v_BSKH, cross["mask_B1TS"])
      x_MD = constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED))
    h_MD, stats = self._mlp(self.mlp_norm(x_MD).astype(self.dtype))
    if self.post_mlp_norm is not None:
      h_MD = self.post_mlp_norm(h_MD).astype(self.dtype)
    return constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (ROWS, EMBED)), cache, stats

  def _mlp(self, x_MD):
    """(the MLP branch's output, MoE stats or None): the dense MLP, or the MoE's routed experts plus its shared
    experts."""
    if not isinstance(self.mlp, MoE):
      return self.mlp(x_MD), None
    h_MD, stats = self.mlp(x_MD)
    return (h_MD if self.shared is None else h_MD + self.shared(x_MD)), stats


class Stack(nnx.Module):
  """`config.num_layers` blocks (stacked and scanned, or a list) followed by a final norm.

  `config` is any object with TransformerConfig's block fields (a `TransformerConfig`, a `ViTConfig`). With
  MoE fields (`num_experts` > 0), every `moe_every`-th block is MoE: the scan (or the list) then runs units of
  `moe_every` blocks, the last of each MoE (one unit per block for moe_every=1), so scanned units are alike.
  In training, the MoE blocks' auxiliary losses and load are kept in `moe_terms` for the objective
  (`jaxmodels.models.moe.pop_moe_terms`).
  Under a mesh with a `stage` axis (`jaxmodels.parallel.activation_sharding`) a `pipelined` stack (the
  Transformer LM's) runs its scanned layers as a micro-batch pipeline (`jaxmodels.parallel.pipeline`) when
  called without a cache; any other stack, an unscanned one or one with MoE blocks raises ValueError there.
  """

  def __init__(self, config, *, causal, rotary_positions, dtype, param_dtype, rngs, cross_attention=False,
               pipelined=False):
    c = config
    self.pipelined = pipelined  # runs as a pipeline over a `stage` mesh axis (jaxmodels.parallel.pipeline)
    self.casts = dtype is not None and jnp.dtype(dtype) != jnp.dtype(param_dtype)  # weights cast to compute
    block_kwargs = dict(d_model=c.d_model, num_heads=c.num_heads, d_ff=c.d_ff, causal=causal, norm=c.norm,
                        mlp=c.mlp, rotary_positions=rotary_positions, implementation=c.attention_impl,
                        dropout=c.dropout, dtype=dtype, param_dtype=param_dtype,
                        num_kv_heads=getattr(c, "num_kv_heads", None), use_bias=c.use_bias, norm_eps=c.norm_eps,
                        rope_theta=getattr(c, "rope_theta", 10000.0), cross_attention=cross_attention)
    if isinstance(c, TransformerConfig):  # the architecture variants (other configs have none)
      block_kwargs.update(head_dim=c.head_dim, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_position=c.norm_position,
                          rope_scaling=c.rope_scaling_args(), sliding_window=c.sliding_window,
                          global_layer_every=c.global_layer_every, attn_logit_softcap=c.attn_logit_softcap,
                          attention_scale_dim=c.attention_scale_dim)
    self.period, moe = moe_period(c), moe_block_kwargs(c)
    units = c.num_layers // max(self.period, 1)

    def make(r):  # one unit: a block, or `period` blocks the last of which is MoE
      if not self.period:
        return Block(rngs=r, **block_kwargs)
      blocks = [Block(rngs=r, **block_kwargs, **(moe if j == self.period - 1 else {})) for j in range(self.period)]
      return blocks[0] if self.period == 1 else nnx.List(blocks)

    if c.scan_layers:
      stacked = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      self.blocks = nnx.split_rngs(splits=units)(stacked)(rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(units)])
    self.units = units
    self.moe_loss_weights = (getattr(c, "aux_loss_weight", 0.0), getattr(c, "z_loss_weight", 0.0))
    self.final_norm = make_norm(c.norm, c.d_model, c.norm_eps, param_dtype, rngs)
    self.num_layers, self.scan_layers, self.remat, self.dropout_rate = c.num_layers, c.scan_layers, c.remat, c.dropout
    self.num_kv_heads = getattr(c, "num_kv_heads", None) or c.num_heads
    self.head_dim = getattr(c, "head_dim", None) or c.d_model // c.num_heads

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
    keys_U = jax.random.split(rngs.dropout(), self.units) if use_dropout else None

    layer_kv, shared = None, None  # cross-attention inputs: per layer (scanned with the blocks) and common
    if cross is not None:
      shared = {"mask_B1TS": cross["mask_B1TS"]}
      if "k" in cross:
        layer_kv = {"k": cross["k"], "v": cross["v"]}
      else:
        memory_BSD = cross["memory_BSD"]
        shared["memory_MD"] = constrain(memory_BSD.reshape(-1, D), (BATCH, EMBED))
        shared["positions_BS"] = jnp.broadcast_to(jnp.arange(memory_BSD.shape[1]), memory_BSD.shape[:2])

    def apply(graphdef, state, x, cache, key, i, kv, positions=positions_BT, mask=mask_B1TS):
      """One unit (see the class): (x, cache, MoE stats or None)."""
      # Scanned, the layer's weights go in fenced: each is cast to the compute dtype in its layer's iteration, not
      # the whole stack ahead of the loop (jaxmodels.runtime.fence; 0.45 GB a chip for Llama 3.2 1B on a v5e 2x2).
      unit = nnx.merge(graphdef, fenced(state) if self.scan_layers and self.casts else state)
      blocks, stats = (list(unit) if isinstance(unit, nnx.List) else [unit]), None
      for j, block in enumerate(blocks):
        key_j = key if len(blocks) == 1 or key is None else jax.random.fold_in(key, j)
        x, cache, block_stats = block(x, positions, mask, cache, cache_index,
                                      nnx.Rngs(dropout=key_j) if use_dropout else None, layer=i * len(blocks) + j,
                                      cross=None if shared is None else {**shared, **(kv or {})})
        stats = stats if block_stats is None else block_stats
      return x, cache, stats

    if REMAT_POLICIES[self.remat] is not None:
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))
    schedule = pipeline.active_schedule() if cache is None else None
    if schedule is not None:  # a `stage` mesh axis: the layers run as a micro-batch pipeline over it
      if not (self.pipelined and self.scan_layers) or self.period:
        raise ValueError(f"pipeline parallelism (mesh axis stage={schedule.stages}) runs the dense Transformer LM "
                         f"with scanned layers (model.scan_layers=True, model.num_experts=0) only")
      graphdef, state = nnx.split(self.blocks)

      def stage(layers_K, rows_MD, per_example, microbatch):
        def body(rows, xs):
          state_l, key_l, i = xs
          key_l = None if key_l is None else jax.random.fold_in(key_l, microbatch)  # a mask per micro-batch
          return apply(graphdef, state_l, rows, None, key_l, i, None, **per_example)[0], None
        return jax.lax.scan(body, rows_MD, layers_K)[0]

      per_example = {"positions": positions_BT, "mask": mask_B1TS}
      x_BTD = pipeline.pipeline(stage, (state, keys_U, jnp.arange(self.units)), x_MD.reshape(B, T, D),
                                per_example, schedule)
      return constrain(self.final_norm(x_BTD.reshape(B * T, D)).reshape(B, T, D), (ROWS, LENGTH, EMBED)), None
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(carry, xs):
        state_l, key_l, i, kv_l = xs
        x, cache, stats = apply(graphdef, state_l, *carry, key_l, i, kv_l)
        return (x, cache), stats

      (x_MD, new_cache), stats_U = jax.lax.scan(body, (x_MD, cache),
                                                (state, keys_U, jnp.arange(self.units), layer_kv))
    else:
      new_cache, unit_stats = cache, []
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        x_MD, new_cache, stats = apply(graphdef, state, x_MD, new_cache, None if keys_U is None else keys_U[i], i,
                                       None if layer_kv is None else jax.tree.map(lambda a, i=i: a[i], layer_kv))
        unit_stats.append(stats)
      stats_U = None if unit_stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *unit_stats)
    if stats_U is not None and rngs is not None:  # training: the MoE layers' mean losses and load
      stats = jax.tree.map(lambda a: a.mean(0), stats_U)
      penalty = self.moe_loss_weights[0] * stats["moe_aux_loss"] + self.moe_loss_weights[1] * stats["moe_z_loss"]
      self.moe_terms = MoETerms((penalty, stats))
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
                       param_dtype=param_dtype, rngs=rngs, pipelined=True)
    self.head = (None if c.tie_embeddings else
                 nnx.Linear(d, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                            kernel_metadata=axes("embed", "vocab"), rngs=rngs))
    self.embed_dropout = nnx.Dropout(c.dropout)
    self.max_len, self.vocab_size, self.dtype = c.max_len, vocab_size, dtype

  def _forward(self, tokens_BT, positions_BT, mask_B1TS, cache, cache_index, rngs, head_weights=False):
    x_BTD = lookup(self.embed, tokens_BT, self.dtype)
    if self.config.embed_scale:
      x_BTD = x_BTD * jnp.asarray(self.config.d_model ** 0.5, self.dtype)
    if self.pos_embed is not None:
      x_BTD = x_BTD + lookup(self.pos_embed, positions_BT, self.dtype)
    x_BTD = self.embed_dropout(x_BTD, deterministic=rngs is None, rngs=rngs)
    x_BTD = constrain(x_BTD, (SEQUENCES, LENGTH, EMBED))  # the stack's (sequence-parallel) rows, see Stack
    h_BTD, cache = self.stack(x_BTD, positions_BT, mask_B1TS, cache, cache_index, rngs)
    B, T, D = h_BTD.shape
    h_MD = constrain(h_BTD.reshape(B * T, D).astype(self.dtype), (ROWS, EMBED))  # a 2-D head matmul
    if head_weights:
      return h_MD, cache
    # Sequence-parallel logits: split by rows (vocabulary whole) where ROWS take `tensor`, else by vocabulary.
    logits_MV = constrain(self.embed.attend(h_MD) if self.head is None else self.head(h_MD), (ROWS, VOCAB))
    if self.config.final_logit_softcap is not None:
      cap = self.config.final_logit_softcap
      logits_MV = (cap * jnp.tanh(logits_MV.astype(jnp.float32) / cap)).astype(logits_MV.dtype)
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
    return self._forward(tokens_BT, *self._positions_mask(tokens_BT, segment_ids_BT, positions_BT), None, None,
                         rngs if train else None)[0]

  def _positions_mask(self, tokens_BT, segment_ids_BT, positions_BT):
    """(positions_BT, mask_B1TS or None) of a full-sequence call, after checking its length and token ids; under
    context parallelism the mask is the segment ids themselves (the ring attends by them and the chunks' places,
    never a (T, T) mask)."""
    B, T = tokens_BT.shape
    check_length(T, self.max_len)
    check_indices(tokens_BT, self.vocab_size, "token id")
    if positions_BT is not None:  # past max_len a learned table's lookup gave NaN rows, -1 its last row
      check_indices(positions_BT, self.max_len, "position")
    if context.size() > 1:
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
    return positions_BT, mask_B1TS

  def hidden_and_head(self, tokens_BT, *, segment_ids_BT=None, positions_BT=None, train: bool = False,
                      rngs: nnx.Rngs | None = None):
    """(h_MD, w, vocab_axis): the final hidden states of the token rows (M = B x T, the compute dtype) and the
    head's weights, so that the logits are h_MD @ w (`vocab_axis` 1, an untied (D, V) head) or h_MD @ w.T
    (`vocab_axis` 0, the tied (V, D) embedding table), without computing them: a loss can then make the logits
    a chunk at a time (jaxmodels.tasks.chunked). None, computing nothing, where the logits are more than that
    product (a final_logit_softcap, a head with LoRA adapters). `segment_ids_BT`, `positions_BT` and ValueError
    as `__call__`."""
    if self.config.final_logit_softcap is not None or getattr(self.head, "lora_a", None) is not None:
      return None
    h_MD, _ = self._forward(tokens_BT, *self._positions_mask(tokens_BT, segment_ids_BT, positions_BT), None, None,
                            rngs if train else None, head_weights=True)
    return (h_MD, self.embed.embedding[...], 0) if self.head is None else (h_MD, self.head.kernel[...], 1)

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


def transformer_param_count(config: TransformerConfig, vocab_size: int, active: bool = False) -> int:
  """Parameters of TransformerLM from its config, by formula (checked against the module in tests).

  Per layer: 2 D N H + 2 D K H attention projections (N H = K H = D without GQA or a head_dim of
  its own), 2 D F (gelu) or 3 D F (swiglu, geglu) MLP, their biases if any (or q, k, v biases alone with qkv_bias),
  q and k norms if any (2 H per head, N H + K H over all heads), two norms (four with norm_position=sandwich;
  2 D for LayerNorm, D for RMSNorm).
  Plus V D token embedding, max_len D learned positions, a final norm, and D V for an untied head. A MoE block
  (every `moe_every`-th with num_experts E > 0) has E expert MLPs (no biases), a D x E router and its shared
  experts' MLP; `active`: only the K experts a token visits count (`jaxmodels.models.params.count_active_params`).
  """
  c = config
  h = c.head_dim or c.d_model // c.num_heads
  d, f, q, kv = c.d_model, c.d_ff, c.num_heads * h, c.kv_heads * h
  norm = 2 * d if c.norm == "layer" else d
  mlp_mats = 2 if c.mlp == "gelu" else 3
  per_layer = 2 * d * q + 2 * d * kv + mlp_mats * d * f + (4 if c.norm_position == "sandwich" else 2) * norm
  per_layer += {"none": 0, "head": 2 * h, "full": q + kv}[c.qk_norm]
  if c.use_bias or c.qkv_bias:
    per_layer += q + 2 * kv
  if c.use_bias:
    per_layer += (mlp_mats - 1) * f + 2 * d
  total = vocab_size * d + c.num_layers * per_layer + norm
  if c.num_experts:
    experts = c.experts_per_token if active else c.num_experts
    moe_layers = c.num_layers // c.moe_every  # each: its experts and shared experts instead of one MLP, a router
    total += moe_layers * (mlp_mats * d * f * (experts + c.num_shared_experts - 1) + d * c.num_experts)
  if c.positions == "learned":
    total += c.max_len * d
  if not c.tie_embeddings:
    total += d * vocab_size
  return total
