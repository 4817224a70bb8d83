"""Transformer encoder-decoder (Vaswani et al. 2017, pre-norm): sequence-to-sequence over one vocabulary.

Built from `transformer.Stack`: a bidirectional encoder over the source (its
padding masked out of attention) and a causal decoder whose blocks add a
cross-attention branch (`Block(cross_attention=True)`, the same `Attention`
module) over the encoder's output. Training is teacher forcing: the decoder
reads the target shifted right behind a BOS token. Decoding (`init_cache`,
`decode`, `generate`) keeps the decoder's self-attention keys and values in a
KV cache written in place, and computes the cross-attention keys and values of
the source once per sequence. One token embedding serves source, target and
(tied) output head. Activations are pinned like the decoder-only model's
(`jaxmodels.parallel.constrain`, logical axes activation_*).

Shape suffixes: B batch, S source length, T target length, D d_model, V vocabulary, L layers, K kv heads,
H head size.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import axes, check_indices, check_length, check_slots, resolve
from jaxmodels.models.transformer import (
  BATCH,
  EMBED,
  LENGTH,
  VOCAB,
  Stack,
  check_stack_fields,
  lookup,
)
from jaxmodels.parallel.sharding import constrain

__all__ = ["EncoderDecoder", "EncoderDecoderConfig"]


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """An encoder and a decoder of `num_layers` blocks each; the fields mean what TransformerConfig's do.

  Raises ValueError naming the first bad field.
  """

  d_model: int = 128  # D
  num_heads: int = 4  # N query heads (self- and cross-attention)
  num_kv_heads: int | None = None  # K key/value heads (grouped-query attention); None: N
  num_layers: int = 2  # blocks of the encoder, and of the decoder
  d_ff: int = 512  # F
  max_len: int = 256  # longest source and longest target
  norm: str = "layer"  # layer | rms
  norm_eps: float = 1e-6
  mlp: str = "swiglu"  # gelu | swiglu
  positions: str = "rotary"  # rotary (self-attention only) | learned (a table each for encoder and decoder)
  rope_theta: float = 10000.0
  use_bias: bool = False
  tie_embeddings: bool = True  # output head = the shared token embedding, transposed
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    check_stack_fields(self)


class EncoderDecoder(nnx.Module):
  """(source_BS, decoder input_BT) int32 -> logits_BTV (the compute dtype), teacher-forced.

      EncoderDecoder(vocab_size, EncoderDecoderConfig(num_layers=2), rngs=nnx.Rngs(0))

  Raises ValueError (a bad field) or TypeError (a config of another family); calls raise ValueError for what
  the model cannot compute, naming the sizes: a source or target longer than `max_len` (rotary positions too), a
  decoding cache longer than `max_len` or a write past its slots, and, where the values are known (an eager
  call: `jaxmodels.models.layers.known`), a token id outside the vocabulary or a cache index past its slots.
  """

  Config = EncoderDecoderConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("seq2seq",)

  def __init__(self, vocab_size: int, config: EncoderDecoderConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(EncoderDecoderConfig, config, fields)
    d, rotary = c.d_model, c.positions == "rotary"
    self.embed = nnx.Embed(vocab_size, d, dtype=dtype, param_dtype=param_dtype,
                           embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    positions = lambda: nnx.Embed(c.max_len, d, dtype=dtype, param_dtype=param_dtype,
                                  embedding_metadata=axes(None, "embed"), rngs=rngs)
    self.encoder_pos = None if rotary else positions()
    self.decoder_pos = None if rotary else positions()
    stack = lambda causal, cross: Stack(c, causal=causal, rotary_positions=rotary, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs, cross_attention=cross)
    self.encoder, self.decoder = stack(False, False), stack(True, True)
    self.head = (None if c.tie_embeddings else
                 nnx.Linear(d, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                            kernel_metadata=axes("embed", "vocab"), rngs=rngs))
    self.embed_dropout = nnx.Dropout(c.dropout)
    self.max_len, self.vocab_size, self.dtype = c.max_len, vocab_size, dtype

  def _embed(self, tokens_BT, positions_BT, pos_embed, rngs):
    check_length(tokens_BT.shape[1], self.max_len)
    check_indices(tokens_BT, self.vocab_size, "token id")
    x_BTD = lookup(self.embed, tokens_BT, self.dtype)
    if pos_embed is not None:
      x_BTD = x_BTD + lookup(pos_embed, positions_BT, self.dtype)
    x_BTD = self.embed_dropout(x_BTD, deterministic=rngs is None, rngs=rngs)
    return constrain(x_BTD, (BATCH, LENGTH, EMBED))

  def encode(self, source_BS, source_mask_BS=None, rngs: nnx.Rngs | None = None):
    """memory_BSD: the encoder's output; `source_mask_BS` (bool, True = a real token) keeps padding out of
    attention (default: every token is real). Rows at padded positions are never read by the decoder."""
    B, S = source_BS.shape
    positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
    mask_B1SS = None if source_mask_BS is None else source_mask_BS.astype(bool)[:, None, None, :]
    memory_BSD, _ = self.encoder(self._embed(source_BS, positions_BS, self.encoder_pos, rngs), positions_BS,
                                 mask_B1SS, rngs=rngs)
    return memory_BSD

  def _decode(self, tokens_BT, positions_BT, mask_B1TS, cache, cache_index, cross, rngs):
    h_BTD, cache = self.decoder(self._embed(tokens_BT, positions_BT, self.decoder_pos, rngs), positions_BT,
                                mask_B1TS, cache, cache_index, rngs, cross=cross)
    B, T, D = h_BTD.shape
    h_MD = constrain(h_BTD.reshape(B * T, D).astype(self.dtype), (BATCH, EMBED))
    logits_MV = constrain(self.embed.attend(h_MD) if self.head is None else self.head(h_MD), (BATCH, VOCAB))
    return constrain(logits_MV.reshape(B, T, -1), (BATCH, LENGTH, VOCAB)), cache

  @staticmethod
  def _cross_mask(source_mask_BS, source_BS):
    if source_mask_BS is None:
      return jnp.ones((source_BS.shape[0], 1, 1, source_BS.shape[1]), bool)
    return source_mask_BS.astype(bool)[:, None, None, :]

  def __call__(self, source_BS, decoder_input_BT, *, source_mask_BS=None, train: bool = False,
               rngs: nnx.Rngs | None = None):
    """logits_BTV of the targets, teacher-forced: `decoder_input_BT` is the target shifted right (BOS first)."""
    rngs = rngs if train else None
    memory_BSD = self.encode(source_BS, source_mask_BS, rngs)
    B, T = decoder_input_BT.shape
    cross = {"memory_BSD": memory_BSD, "mask_B1TS": self._cross_mask(source_mask_BS, source_BS)}
    return self._decode(decoder_input_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), None, None, None, cross,
                        rngs)[0]

  def init_cache(self, source_BS, length: int, *, source_mask_BS=None) -> dict:
    """A decoding cache for `length` target tokens: the source encoded and its cross-attention keys and values
    ('cross_k', 'cross_v': (L, B, S, K, H)) computed once, an empty self-attention cache ('k', 'v':
    (L, B, length, K, H)) and the source's key mask 'cross_mask' (B, 1, 1, S). ValueError for a `length` above
    max_len (slot i holds target position i)."""
    check_length(length, self.max_len, "a cache")
    B = source_BS.shape[0]
    kv = self.decoder.cross_keys_values(self.encode(source_BS, source_mask_BS))
    d = self.decoder
    shape = (d.num_layers, B, length, d.num_kv_heads, d.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype), "cross_k": kv["k"],
            "cross_v": kv["v"], "cross_mask": self._cross_mask(source_mask_BS, source_BS)}

  def decode(self, tokens_BT, cache: dict, index):
    """Logits for the decoder tokens in cache slots index..index+T-1, each attending to the slots up to its own
    and to the whole (unpadded) source; returns (logits_BTV, the updated cache). ValueError (see the class) for a
    cache of more than max_len slots or tokens past its slots."""
    B, T = tokens_BT.shape
    check_length(cache["k"].shape[2], self.max_len, "a cache")
    check_slots(index, T, cache["k"].shape[2])
    slots_T = index + jnp.arange(T)
    causal_11TS = (jnp.arange(cache["k"].shape[2])[None, :] <= slots_T[:, None])[None, None]
    cross = {"k": cache["cross_k"], "v": cache["cross_v"], "mask_B1TS": cache["cross_mask"]}
    logits_BTV, kv = self._decode(tokens_BT, jnp.broadcast_to(slots_T, (B, T)), causal_11TS,
                                  {"k": cache["k"], "v": cache["v"]}, index, cross, None)
    return logits_BTV, {**cache, **kv}

  def generate(self, source_BS, length: int, bos_id: int, *, source_mask_BS=None):
    """Greedy decoding: tokens_BT (int32, `length` of them after BOS), one cached decoder step per token."""
    B = source_BS.shape[0]
    cache = self.init_cache(source_BS, length, source_mask_BS=source_mask_BS)

    def step(carry, i):
      token_B1, cache = carry
      logits_B1V, cache = self.decode(token_B1, cache, i)
      next_B = jnp.argmax(logits_B1V[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
      return (next_B[:, None], cache), next_B

    _, tokens_TB = jax.lax.scan(step, (jnp.full((B, 1), bos_id, jnp.int32), cache), jnp.arange(length))
    return tokens_TB.T
