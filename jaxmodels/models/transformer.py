"""Transformers: a decoder-only language model and an encoder classifier.

Both are pre-norm stacks of attention + MLP blocks. Attention (`attention`)
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

Shape suffixes: B batch, T query length, S key length, M = B x T token rows,
D d_model, N heads, H head dim, F d_ff, V vocabulary, L layers.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.errors import UserError
from jaxmodels.models.layers import axes
from jaxmodels.parallel.sharding import constrain

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, MLP_AXIS, VOCAB = "activation_heads", "activation_mlp", "activation_vocab"

NORMS = ("layer", "rms")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def _check(name, value, allowed):
  if value not in allowed:
    raise UserError(f"model.{name}={value!r}: expected one of {', '.join(allowed)}")


def make_norm(kind, d, param_dtype, rngs):
  """LayerNorm or RMSNorm, computing in float32 whatever the compute dtype."""
  _check("norm", kind, NORMS)
  if kind == "layer":
    return nnx.LayerNorm(d, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"),
                         bias_metadata=axes("embed"), rngs=rngs)
  return nnx.RMSNorm(d, dtype=jnp.float32, param_dtype=param_dtype, scale_metadata=axes("embed"), rngs=rngs)


def rotary(x_BTNH, positions_BT):
  """Rotary position embedding (RoFormer), in float32, on the two halves of the head dim."""
  h = x_BTNH.shape[-1] // 2
  freqs_H = 1.0 / (10000.0 ** (jnp.arange(h, dtype=jnp.float32) / h))
  angles_BTH = positions_BT[..., None].astype(jnp.float32) * freqs_H
  sin, cos = jnp.sin(angles_BTH)[:, :, None, :], jnp.cos(angles_BTH)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def attention(q_BTNH, k_BSNH, v_BSNH, implementation: str = "auto", *, is_causal=False, mask_BNTS=None):
  """Softmax attention with a float32 softmax. `implementation`:

  - `einsum`: two einsums, written here. jax.nn.dot_product_attention's XLA path
    (which reshapes to 5-D for grouped queries) ran forward + backward 2x slower
    on the CPU: 3.7 vs 1.8 ms for 12 x 64 tokens, 4 heads of 32.
  - `xla` / `cudnn`: jax.nn.dot_product_attention with that implementation.
  - `auto`: `einsum`, except on GPUs, where jax.nn.dot_product_attention picks
    (cuDNN flash attention where it supports the shapes and dtype).
  """
  _check("attention_impl", implementation, ATTENTION_IMPLS)
  if implementation == "auto" and jax.default_backend() == "gpu":
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS, is_causal=is_causal)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS, is_causal=is_causal,
                                        implementation=implementation)
  scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
  scores_BNTS = scores_BNTS * q_BTNH.shape[-1] ** -0.5
  if is_causal:
    mask_BNTS = jnp.tril(jnp.ones(scores_BNTS.shape[-2:], bool))
  if mask_BNTS is not None:
    scores_BNTS = jnp.where(mask_BNTS, scores_BNTS, jnp.finfo(jnp.float32).min)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v_BSNH.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)


def lookup(embed: nnx.Embed, ids, dtype):
  """`embed(ids)`, from the whole table: under FSDP the table (split over `embed`) is all-gathered.

  Left to itself XLA may instead all-gather the ids of the whole batch, look up
  every token's slice of the table on every device and reshuffle the result.
  """
  table = constrain(embed.embedding[...], (None, None))  # unsplit: the whole table on every device
  return jnp.take(table, ids, axis=0).astype(dtype)


class Attention(nnx.Module):
  """Multi-head self-attention; with a KV cache it attends to the cached prefix too."""

  def __init__(self, d_model, num_heads, *, causal, rotary_positions, implementation, dtype, param_dtype,
               rngs):
    if d_model % num_heads:
      raise UserError(f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}")
    linear = lambda names: nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                      kernel_metadata=axes(*names), rngs=rngs)
    # Column-parallel projections into heads, row-parallel out of them (Megatron).
    self.query, self.key, self.value = (linear(("embed", "heads")) for _ in range(3))
    self.out = linear(("heads", "embed"))
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    self.causal, self.rotary_positions = causal, rotary_positions
    self.implementation = implementation

  def __call__(self, x_MD, positions_BT, cache=None, cache_index=None):
    B, T = positions_BT.shape
    split = lambda y: constrain(y.reshape(B, T, self.num_heads, self.head_dim), (BATCH, LENGTH, HEADS))
    q_BTNH, k_BTNH, v_BTNH = split(self.query(x_MD)), split(self.key(x_MD)), split(self.value(x_MD))
    if self.rotary_positions:
      q_BTNH, k_BTNH = rotary(q_BTNH, positions_BT), rotary(k_BTNH, positions_BT)
    if cache is None:
      out_BTNH = constrain(attention(q_BTNH, k_BTNH, v_BTNH, self.implementation, is_causal=self.causal),
                           (BATCH, LENGTH, HEADS))
      new_cache = None
    else:  # decoding: write this chunk at cache_index, attend to every filled position <= own
      k_BSNH = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTNH.astype(cache["k"].dtype), cache_index, 1)
      v_BSNH = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTNH.astype(cache["v"].dtype), cache_index, 1)
      key_pos_S = jnp.arange(k_BSNH.shape[1])
      mask_BNTS = (key_pos_S[None, :] <= positions_BT[0][:, None])[None, None]
      # cuDNN's kernels take no arbitrary mask: decoding leaves cudnn to jax.nn's own choice
      impl = "auto" if self.implementation == "cudnn" else self.implementation
      out_BTNH = attention(q_BTNH, k_BSNH, v_BSNH, impl, mask_BNTS=mask_BNTS)
      new_cache = {"k": k_BSNH, "v": v_BSNH}
    out_MD = self.out(constrain(out_BTNH.reshape(B * T, -1), (BATCH, HEADS)))
    return constrain(out_MD, (BATCH, EMBED)), new_cache


class FeedForward(nnx.Module):
  """GELU MLP (D -> F -> D) or SwiGLU (silu(x W1) * x W3, then W2)."""

  def __init__(self, d_model, d_ff, kind, *, dtype, param_dtype, rngs):
    _check("mlp", kind, MLPS)
    linear = lambda a, b, names: nnx.Linear(a, b, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                            kernel_metadata=axes(*names), rngs=rngs)
    self.up, self.down = linear(d_model, d_ff, ("embed", "mlp")), linear(d_ff, d_model, ("mlp", "embed"))
    self.gate = linear(d_model, d_ff, ("embed", "mlp")) if kind == "swiglu" else None

  def __call__(self, x_MD):
    hidden = lambda layer: constrain(layer(x_MD), (BATCH, MLP_AXIS))
    h_MF = jax.nn.gelu(hidden(self.up)) if self.gate is None else jax.nn.silu(hidden(self.gate)) * hidden(self.up)
    return constrain(self.down(constrain(h_MF, (BATCH, MLP_AXIS))), (BATCH, EMBED))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)), with dropout on each branch."""

  def __init__(self, d_model, num_heads, d_ff, *, causal, norm, mlp, rotary_positions, implementation,
               dropout, dtype, param_dtype, rngs):
    self.attn_norm = make_norm(norm, d_model, param_dtype, rngs)
    self.attn = Attention(d_model, num_heads, causal=causal, rotary_positions=rotary_positions,
                          implementation=implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = make_norm(norm, d_model, param_dtype, rngs)
    self.mlp = FeedForward(d_model, d_ff, mlp, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.dtype = dtype

  def __call__(self, x_MD, positions_BT, cache=None, cache_index=None, rngs=None):
    deterministic = rngs is None
    h_MD, cache = self.attn(self.attn_norm(x_MD).astype(self.dtype), positions_BT, cache, cache_index)
    x_MD = constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (BATCH, EMBED))
    h_MD = self.mlp(self.mlp_norm(x_MD).astype(self.dtype))
    return constrain(x_MD + self.dropout(h_MD, deterministic=deterministic, rngs=rngs), (BATCH, EMBED)), cache


class Stack(nnx.Module):
  """`num_layers` blocks (stacked and scanned, or a list) followed by a final norm."""

  def __init__(self, num_layers, *, scan_layers, remat, dropout, **block_kwargs):
    _check("remat", remat, REMAT_POLICIES)
    rngs = block_kwargs.pop("rngs")
    make = lambda r: Block(dropout=dropout, rngs=r, **block_kwargs)
    if scan_layers:
      stacked = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      self.blocks = nnx.split_rngs(splits=num_layers)(stacked)(rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(num_layers)])
    self.final_norm = make_norm(block_kwargs["norm"], block_kwargs["d_model"], block_kwargs["param_dtype"],
                                rngs)
    self.num_layers, self.scan_layers, self.remat, self.dropout_rate = num_layers, scan_layers, remat, dropout
    self.num_heads = block_kwargs["num_heads"]
    self.head_dim = block_kwargs["d_model"] // self.num_heads

  def __call__(self, x_BTD, positions_BT, cache=None, cache_index=None, rngs=None):
    """Returns (normed output, new cache); `cache` holds per-layer arrays on a leading L axis."""
    B, T, D = x_BTD.shape
    x_MD = constrain(x_BTD.reshape(B * T, D), (BATCH, EMBED))
    use_dropout = rngs is not None and self.dropout_rate > 0
    keys_L = jax.random.split(rngs.dropout(), self.num_layers) if use_dropout else None

    def apply(graphdef, state, x, layer_cache, key):
      block = nnx.merge(graphdef, state)
      return block(x, positions_BT, layer_cache, cache_index, nnx.Rngs(dropout=key) if use_dropout else None)

    if REMAT_POLICIES[self.remat] is not None:
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, xs):
        state_l, cache_l, key_l = xs
        return apply(graphdef, state_l, x, cache_l, key_l)

      x_MD, new_cache = jax.lax.scan(body, x_MD, (state, cache, keys_L))
    else:
      caches = []
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        layer = lambda tree: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # pylint: disable=cell-var-from-loop
        x_MD, c = apply(graphdef, state, x_MD, layer(cache), layer(keys_L))
        caches.append(c)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
    return constrain(self.final_norm(x_MD).reshape(B, T, D), (BATCH, LENGTH, EMBED)), new_cache


def _stack_kwargs(m, *, causal, dtype, param_dtype, rngs):
  _check("positions", m["positions"], POSITIONS)
  _check("attention_impl", m["attention_impl"], ATTENTION_IMPLS)
  return dict(num_layers=m["num_layers"], scan_layers=m["scan_layers"], remat=m["remat"], dropout=m["dropout"],
              d_model=m["d_model"], num_heads=m["num_heads"], d_ff=m["d_ff"], causal=causal, norm=m["norm"],
              mlp=m["mlp"], rotary_positions=m["positions"] == "rotary", implementation=m["attention_impl"],
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TransformerLM(nnx.Module):
  """Decoder-only language model: tokens_BT -> logits_BTV.

  `m` is the `model.*` config group (or a dict with the same keys): d_model,
  num_heads, num_layers, d_ff, max_len, norm, mlp, positions, tie_embeddings,
  dropout, scan_layers, remat, attention_impl.
  """

  def __init__(self, vocab_size, m, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = m["d_model"]
    self.embed = nnx.Embed(vocab_size, d, dtype=dtype, param_dtype=param_dtype,
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    self.pos_embed = (nnx.Embed(m["max_len"], d, dtype=dtype, param_dtype=param_dtype,
                                embedding_metadata=axes(None, "embed"), rngs=rngs)
                      if m["positions"] == "learned" else None)
    self.stack = Stack(**_stack_kwargs(m, causal=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.head = (None if m["tie_embeddings"] else
                 nnx.Linear(d, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                            kernel_metadata=axes("embed", "vocab"), rngs=rngs))
    self.embed_dropout = nnx.Dropout(m["dropout"])
    self.max_len, self.dtype = m["max_len"], dtype

  def _forward(self, tokens_BT, positions_BT, cache, cache_index, rngs):
    x_BTD = lookup(self.embed, tokens_BT, self.dtype)
    if self.pos_embed is not None:
      x_BTD = x_BTD + lookup(self.pos_embed, positions_BT, self.dtype)
    x_BTD = self.embed_dropout(x_BTD, deterministic=rngs is None, rngs=rngs)
    x_BTD = constrain(x_BTD, (BATCH, LENGTH, EMBED))
    h_BTD, cache = self.stack(x_BTD, positions_BT, cache, cache_index, rngs)
    B, T, D = h_BTD.shape
    h_MD = constrain(h_BTD.reshape(B * T, D).astype(self.dtype), (BATCH, EMBED))  # a 2-D head matmul
    logits_MV = constrain(self.embed.attend(h_MD) if self.head is None else self.head(h_MD), (BATCH, VOCAB))
    return constrain(logits_MV.reshape(B, T, -1), (BATCH, LENGTH, VOCAB)), cache

  def __call__(self, tokens_BT, *, train: bool = False, rngs: nnx.Rngs | None = None):
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return self._forward(tokens_BT, positions_BT, None, None, rngs if train else None)[0]

  def init_cache(self, batch_size: int, length: int) -> dict:
    """An empty KV cache for `length` positions: {'k', 'v'} of shape (L, B, S, N, H)."""
    s = self.stack
    shape = (s.num_layers, batch_size, length, s.num_heads, s.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  def decode(self, tokens_BT, cache: dict, index):
    """Logits for tokens at positions index..index+T-1, attending to the cache; returns (logits, cache)."""
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(index + jnp.arange(T), (B, T))
    return self._forward(tokens_BT, positions_BT, cache, index, None)


class TransformerClassifier(nnx.Module):
  """Bidirectional encoder over a sequence: x_BLF (features) -> logits_BK, by CLS or mean pooling.

  `input_shape` is one example's shape: (L, ...) with everything after L
  flattened into features (digit rows: (8, 8, 1) -> 8 steps of 8 features).
  """

  def __init__(self, input_shape, num_classes, m, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    _check("pooling", m["pooling"], ("cls", "mean"))
    d, length = m["d_model"], input_shape[0] + (m["pooling"] == "cls")
    if length > m["max_len"]:
      raise UserError(f"sequence length {length} exceeds model.max_len={m['max_len']}")
    self.proj = nnx.Linear(math.prod(input_shape[1:]), d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, d), param_dtype)) if m["pooling"] == "cls" else None
    self.pos_embed = (nnx.Embed(m["max_len"], d, dtype=dtype, param_dtype=param_dtype,
                                embedding_metadata=axes(None, "embed"), rngs=rngs)
                      if m["positions"] == "learned" else None)
    self.stack = Stack(**_stack_kwargs(m, causal=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.out = nnx.Linear(d, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    B, L = x.shape[:2]
    x_BLD = constrain(self.proj(constrain(x.reshape(B, L, -1).astype(self.dtype), (BATCH,))),
                      (BATCH, LENGTH, EMBED))
    if self.cls is not None:
      x_BLD = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(self.dtype), (B, 1, x_BLD.shape[-1])),
                               x_BLD], axis=1)
    positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    if self.pos_embed is not None:
      x_BLD = x_BLD + lookup(self.pos_embed, positions_BL, self.dtype)
    x_BLD = constrain(x_BLD, (BATCH, LENGTH, EMBED))
    h_BLD, _ = self.stack(x_BLD, positions_BL, rngs=rngs if train else None)
    pooled_BD = constrain(h_BLD[:, 0] if self.cls is not None else h_BLD.mean(axis=1), (BATCH, EMBED))
    return constrain(self.out(pooled_BD.astype(self.dtype)), (BATCH,))


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


def transformer_param_count(m, vocab_size: int) -> int:
  """Parameters of TransformerLM from its config, by formula (checked against the module in tests).

  Per layer: 4 D^2 attention projections (no biases), 2 D F (gelu) or 3 D F
  (swiglu) MLP, two norms (2 D for LayerNorm, D for RMSNorm). Plus V D token
  embedding, max_len D learned positions, a final norm, and D V for an untied head.
  """
  d, f = m["d_model"], m["d_ff"]
  norm = 2 * d if m["norm"] == "layer" else d
  per_layer = 4 * d * d + (3 if m["mlp"] == "swiglu" else 2) * d * f + 2 * norm
  total = vocab_size * d + m["num_layers"] * per_layer + norm
  if m["positions"] == "learned":
    total += m["max_len"] * d
  if not m["tie_embeddings"]:
    total += d * vocab_size
  return total
