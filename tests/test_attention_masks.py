"""Segment ids (packed documents) and padding masks: attention never crosses a document or reads padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import (
  TransformerClassifier,
  TransformerConfig,
  TransformerLM,
  presets,
)
from jaxmodels.models.transformer import attention, segment_mask, segment_positions

VOCAB = 29
LENGTHS = (5, 7)  # two documents packed into one row of 12


@pytest.mark.parametrize("impl", ["einsum", "xla", "cudnn"])  # cudnn takes no mask: it falls back to jax.nn's choice
@pytest.mark.parametrize("causal", [True, False])
def test_segment_masked_attention_equals_attention_over_each_document(impl, causal):
  q = jax.random.normal(jax.random.key(0), (2, 12, 4, 8))
  k, v = jax.random.normal(jax.random.key(1), (2, 2, 12, 2, 8))  # grouped: 2 key/value heads
  segments_BT = jnp.array([[1] * 5 + [2] * 7, [3] * 5 + [4] * 7])
  packed = attention(q, k, v, impl, is_causal=causal, mask_BNTS=segment_mask(segments_BT, segments_BT))
  start = 0
  for n in LENGTHS:
    doc = slice(start, start + n)
    alone = attention(q[:, doc], k[:, doc], v[:, doc], "einsum", is_causal=causal)
    np.testing.assert_allclose(packed[:, doc], alone, rtol=1e-5, atol=1e-6)
    start += n


def test_segment_positions_restart_at_each_document():
  ids = jnp.array([[1, 1, 1, 2, 2, 3], [0, 0, 5, 5, 5, 5]])
  np.testing.assert_array_equal(segment_positions(ids), [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])


@pytest.mark.parametrize("preset", ["gpt2", "llama-tiny"])  # learned positions + biases; rotary + GQA
def test_packed_language_model_equals_each_document_alone(preset):
  config = presets.config(preset, d_model=32, num_heads=4, d_ff=48, num_layers=2, max_len=16)
  model = TransformerLM(VOCAB, config, rngs=nnx.Rngs(0))
  docs = [jax.random.randint(jax.random.key(i), (1, n), 0, VOCAB) for i, n in enumerate(LENGTHS)]
  segments_BT = jnp.array([[1] * LENGTHS[0] + [2] * LENGTHS[1]])
  packed = model(jnp.concatenate(docs, axis=1), segment_ids_BT=segments_BT)
  alone = jnp.concatenate([model(d) for d in docs], axis=1)
  np.testing.assert_allclose(packed, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_padding_mask_equals_the_unpadded_sequence(pooling):
  config = TransformerConfig(d_model=32, num_heads=4, d_ff=48, max_len=16, pooling=pooling)
  model = TransformerClassifier((10, 3), 5, config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 3))
  padded = jnp.concatenate([x, jnp.full((2, 4, 3), 7.0)], axis=1)  # 4 steps of garbage padding
  mask_BL = jnp.arange(10)[None, :].repeat(2, 0) < 6
  np.testing.assert_allclose(model(padded, mask_BL=mask_BL), model(x), rtol=1e-4, atol=1e-5)
  assert not np.allclose(model(padded), model(x), atol=1e-3)  # without the mask the padding is read


@pytest.mark.parametrize("scan_layers", [True, False])
def test_batched_decoding_of_prompts_of_different_lengths(scan_layers):
  model = TransformerLM(VOCAB, presets.config("llama-tiny", d_model=32, num_heads=4, d_ff=48, num_layers=2,
                                              max_len=16, scan_layers=scan_layers), rngs=nnx.Rngs(0))
  rows = [jax.random.randint(jax.random.key(i), (n,), 0, VOCAB) for i, n in enumerate((3, 6))]
  continuation = jax.random.randint(jax.random.key(9), (2, 3), 0, VOCAB)
  pad = [6 - len(r) for r in rows]  # left-padded prompts: segment 0 for padding, 1 for tokens
  prompt_BT = jnp.stack([jnp.concatenate([jnp.zeros(p, jnp.int32), r]) for p, r in zip(pad, rows)])
  segments_BT = (jnp.arange(6)[None, :] >= jnp.array(pad)[:, None]).astype(jnp.int32)
  positions_BT = jnp.maximum(jnp.arange(6)[None, :] - jnp.array(pad)[:, None], 0)
  cache = model.init_cache(2, 9)
  logits, cache = model.decode(prompt_BT, cache, 0, segment_ids_BT=segments_BT, positions_BT=positions_BT)
  steps = [logits[:, -1:]]
  for i in range(3):
    logits, cache = model.decode(continuation[:, i:i + 1], cache, 6 + i,
                                 positions_BT=positions_BT[:, -1:] + 1 + i)
    steps.append(logits)
  decoded = jnp.concatenate(steps, axis=1)  # logits after the prompt and after each continuation token
  for b, r in enumerate(rows):
    full = model(jnp.concatenate([r, continuation[b]])[None])[0]
    np.testing.assert_allclose(decoded[b], full[len(r) - 1:], rtol=1e-4, atol=1e-5)
