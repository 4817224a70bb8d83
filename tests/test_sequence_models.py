"""Transformer and LSTM/GRU families: attention, causality, layouts, caches, parameter counts."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.models import (
  LSTMConfig,
  RecurrentClassifier,
  RecurrentLM,
  TransformerClassifier,
  TransformerConfig,
  TransformerLM,
  count_params,
)
from jaxmodels.models.recurrent import recurrent_param_count, zero_carry
from jaxmodels.models.transformer import (
  Attention,
  attention,
  rotary,
  scan_to_unrolled,
  transformer_param_count,
  unrolled_to_scan,
)

TINY = dict(d_model=32, num_heads=4, num_layers=2, d_ff=48, max_len=24, norm="rms", mlp="swiglu",
            positions="rotary", tie_embeddings=True, dropout=0.0, scan_layers=True, remat="none",
            attention_impl="auto", pooling="mean")
VOCAB = 17


def tiny(**kw):
  return TransformerConfig(**{**TINY, **kw})


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def reference_attention(attn: Attention, x_BTD, causal):
  """Plain einsum attention with the module's own projections."""
  B, T, D = x_BTD.shape
  N, H = attn.num_heads, attn.head_dim
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  q = rotary(attn.query(x_BTD).reshape(B, T, N, H), pos)
  k = rotary(attn.key(x_BTD).reshape(B, T, N, H), pos)
  v = attn.value(x_BTD).reshape(B, T, N, H)
  scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  if causal:
    scores_BNTS = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores_BNTS, -jnp.inf)
  out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores_BNTS, axis=-1), v)
  return attn.out(out.reshape(B, T, D))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_einsum_reference(causal, impl):
  attn = Attention(32, 4, causal=causal, rotary_positions=True, implementation=impl, dtype=jnp.float32,
                   param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 7, 32))
  out_MD, _ = attn(x_BTD.reshape(14, 32), jnp.broadcast_to(jnp.arange(7), (2, 7)))  # token rows, M = B x T
  np.testing.assert_allclose(out_MD.reshape(2, 7, 32), reference_attention(attn, x_BTD, causal), rtol=1e-5,
                             atol=1e-5)


def test_einsum_attention_agrees_with_jax_nn_under_a_mask():
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 5, 3, 8))
  mask_BNTS = jax.random.bernoulli(jax.random.key(3), 0.6, (2, 1, 5, 5)) | jnp.eye(5, dtype=bool)
  np.testing.assert_allclose(attention(q, k, v, "einsum", mask_BNTS=mask_BNTS),
                             jax.nn.dot_product_attention(q, k, v, mask=mask_BNTS), rtol=1e-5, atol=1e-6)


def assert_causal(model):
  a = tokens((2, 12))
  b = a.at[:, 7:].set((a[:, 7:] + 3) % VOCAB)
  la, lb = model(a), model(b)
  np.testing.assert_allclose(la[:, :7], lb[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(la[:, 7:], lb[:, 7:])


def test_transformer_lm_is_causal():
  assert_causal(TransformerLM(VOCAB, tiny(), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_lm_is_causal(cell):
  assert_causal(RecurrentLM(VOCAB, cell=cell, hidden_size=16, num_layers=2, rngs=nnx.Rngs(0)))


def test_scan_and_unrolled_give_same_outputs_and_convert_layouts():
  scanned = TransformerLM(VOCAB, tiny(positions="learned", norm="layer", mlp="gelu"), rngs=nnx.Rngs(0))
  unrolled = TransformerLM(VOCAB, tiny(positions="learned", norm="layer", mlp="gelu", scan_layers=False),
                           rngs=nnx.Rngs(1))
  t = tokens((2, 10))
  gd_s, p_s = nnx.split(scanned)
  gd_u, p_u = nnx.split(unrolled)
  as_unrolled = nnx.merge(gd_u, scan_to_unrolled(nnx.to_pure_dict(p_s)))
  np.testing.assert_allclose(as_unrolled(t), scanned(t), rtol=1e-5, atol=1e-5)
  back = unrolled_to_scan(scan_to_unrolled(nnx.to_pure_dict(p_s)))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.to_pure_dict(p_s))):
    np.testing.assert_array_equal(x, y)
  as_scanned = nnx.merge(gd_s, unrolled_to_scan(nnx.to_pure_dict(p_u)))
  np.testing.assert_allclose(as_scanned(t), unrolled(t), rtol=1e-5, atol=1e-5)


def test_remat_keeps_gradients():
  t = tokens((2, 8))

  def grads(m):
    model = TransformerLM(VOCAB, m, rngs=nnx.Rngs(0))
    return nnx.grad(lambda mod: mod(t).astype(jnp.float32).mean())(model)

  plain, remat = grads(tiny()), grads(tiny(remat="full"))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_fn", [
    lambda: TransformerLM(VOCAB, tiny(), rngs=nnx.Rngs(0)),
    lambda: TransformerLM(VOCAB, tiny(scan_layers=False, positions="learned"), rngs=nnx.Rngs(0)),
    lambda: RecurrentLM(VOCAB, LSTMConfig(hidden_size=16, num_layers=2), rngs=nnx.Rngs(0)),
], ids=["transformer-scan", "transformer-unrolled", "lstm"])
def test_cached_decoding_matches_full_forward(model_fn):
  model = model_fn()
  t = tokens((2, 11))
  full = model(t)
  cache = model.init_cache(2, 11)
  logits, cache = model.decode(t[:, :6], cache, 0)  # prefill
  steps = [logits]
  for i in range(6, 11):  # then one token at a time
    logits, cache = model.decode(t[:, i:i + 1], cache, i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(norm="layer", mlp="gelu"), dict(positions="learned"),
                                dict(tie_embeddings=False, num_layers=3)])
def test_transformer_param_count_formula(kw):
  m = tiny(**kw)
  assert count_params(TransformerLM(VOCAB, m, rngs=nnx.Rngs(0))) == transformer_param_count(m, VOCAB)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_param_count_formula(cell):
  lm = RecurrentLM(VOCAB, cell=cell, hidden_size=16, num_layers=3, rngs=nnx.Rngs(0))
  assert count_params(lm.rnn) == recurrent_param_count(cell, 16, 16, 3)


def test_classifiers_shapes_pooling_and_bidirectional():
  x = jnp.ones((3, 8, 8, 1))
  for pooling in ("cls", "mean"):
    model = TransformerClassifier((8, 8, 1), 10, tiny(pooling=pooling), rngs=nnx.Rngs(0))
    assert model(x).shape == (3, 10)
  bi = RecurrentClassifier((8, 8, 1), 10, LSTMConfig("gru", 16, 2, bidirectional=True), rngs=nnx.Rngs(0))
  assert bi(x).shape == (3, 10) and bi.out.kernel.shape == (32, 10)
  # Bidirectional: the output depends on the first row through the backward direction too.
  uni = RecurrentClassifier((8, 8, 1), 10, LSTMConfig("lstm", 16, 1, pooling="last"), rngs=nnx.Rngs(0))
  assert uni(x).shape == (3, 10)


def test_bfloat16_compute_float32_params_and_norms():
  model = TransformerLM(VOCAB, tiny(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  assert model(tokens((2, 8))).dtype == jnp.bfloat16
  h = jax.random.normal(jax.random.key(0), (2, 8, 32)).astype(jnp.bfloat16)
  assert model.stack.final_norm(h).dtype == jnp.float32  # norms compute in float32
  lstm = RecurrentLM(VOCAB, hidden_size=16, num_layers=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert lstm(tokens((2, 8))).dtype == jnp.bfloat16


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decoding_writes_the_kv_cache_in_place(scan_layers):
  # Re-stacking each layer's updated cache cost a full copy per token: 6.5 MB (scanned) and 4.7 MB (unrolled) of
  # temporaries for this 4.2 MB cache. Written in place, a step needs about one layer's keys and values (1.1 MB).
  model = TransformerLM(VOCAB, tiny(num_layers=4, max_len=1024, scan_layers=scan_layers), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2, 1024)
  step = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s).decode(t, c, i), donate_argnums=2)
  memory = step.lower(state, jnp.zeros((2, 1), jnp.int32), cache, 5).compile().memory_analysis()
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  assert memory.alias_size_in_bytes == cache_bytes  # the new cache lives in the donated one
  assert memory.temp_size_in_bytes < 0.4 * cache_bytes, (memory.temp_size_in_bytes, cache_bytes)


def stepwise_reference(model, x_BTF):
  """The previous formulation of a RecurrentStack: each cell's own __call__ (input projection included) per step."""
  rnn = model.rnn
  for i, cell in enumerate(rnn.forward):
    def run(cell, x_BTF, reverse):
      carry = zero_carry(rnn.cell, x_BTF.shape[0], rnn.hidden_size, rnn.dtype)
      _, y_TBH = jax.lax.scan(cell, carry, jnp.swapaxes(x_BTF, 0, 1), reverse=reverse)
      return jnp.swapaxes(y_TBH, 0, 1)
    y_BTH = run(cell, x_BTF, False)
    if rnn.backward is not None:
      y_BTH = jnp.concatenate([y_BTH, run(rnn.backward[i], x_BTF, True)], axis=-1)
    x_BTF = y_BTH
  return x_BTF


def scan_dots(fn, *args) -> list[int]:
  """The number of dot_generals inside each lax.scan body of fn's program (nested scans included)."""
  counts = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        body = eqn.params["jaxpr"].jaxpr
        counts.append(sum(e.primitive.name == "dot_general" for e in body.eqns))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_input_projection_is_hoisted_out_of_the_scan(cell):
  model = RecurrentClassifier((8, 5), 3, LSTMConfig(cell, 16, 2, bidirectional=True), rngs=nnx.Rngs(0))
  x_BTF = jax.random.normal(jax.random.key(1), (4, 8, 5))
  # Parameter names and shapes are the cells' own, as older checkpoints hold them.
  gates = {"lstm": 4, "gru": 3}[cell]
  shapes = {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(nnx.state(model.rnn, nnx.Param))}
  bias = "dense_h/bias" if cell == "lstm" else "dense_i/bias"
  assert shapes == {f"{d}/{i}/{name}": shape for d in ("forward", "backward") for i in (0, 1) for name, shape in
                    [("dense_i/kernel", (5 if i == 0 else 32, gates * 16)), ("dense_h/kernel", (16, gates * 16)),
                     (bias, (gates * 16,))]}
  # Equal to the per-step formulation, forward and gradients.
  np.testing.assert_allclose(model.rnn(x_BTF)[0], stepwise_reference(model, x_BTF), rtol=1e-5, atol=1e-6)
  graphdef, params = nnx.split(model)
  grad = lambda f: jax.grad(lambda p: jnp.sum(f(nnx.merge(graphdef, p), x_BTF) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(lambda m, x: m.rnn(x)[0])), jax.tree.leaves(grad(stepwise_reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Only the recurrent matmul stays inside each time loop (4 scans: 2 layers x 2 directions).
  assert scan_dots(lambda x: model.rnn(x)[0], x_BTF) == [1] * 4
