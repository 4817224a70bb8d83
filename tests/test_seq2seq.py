"""The encoder-decoder (jaxmodels/models/encdec.py) and the copy/reverse tasks (jaxmodels/data/seq2seq.py):
cached greedy decoding equals full-forward argmax decoding, source padding changes no valid output, and a tiny
model learns to reverse, with the eval's teacher-forced exact match equal to greedy decoding's, before and after
`jaxmodels compress` (PTQ int8 with static input scales)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmodels.config import default_config
from jaxmodels.data.seq2seq import BOS, EOS, PAD, examples
from jaxmodels.models import EncoderDecoder, EncoderDecoderConfig
from jaxmodels.runtime.errors import UserError

TINY = EncoderDecoderConfig(d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=64, max_len=16)


def compiled(model, fn):
  """jax.jit of fn(model, *args) over the model's state (one compile per shape)."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: jitted(state, *args)


def test_data_is_a_pure_function_of_the_step_and_reverses():
  rng = lambda: np.random.default_rng([0, 7])
  a, b = examples("reverse", rng(), 4, 6, 9), examples("reverse", rng(), 4, 6, 9)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for i in range(4):
    n = int(a["source_mask"][i].sum())
    assert 3 <= n <= 6 and (a["x"][i, n:] == PAD).all() and a["x"][i, :n].min() > EOS
    np.testing.assert_array_equal(a["y"][i, :n], a["x"][i, :n][::-1])
    assert a["y"][i, n] == EOS and a["mask"][i].sum() == n + 1 and a["decoder_input"][i, 0] == BOS
    np.testing.assert_array_equal(a["decoder_input"][i, 1:], a["y"][i, :-1])


def test_cached_greedy_decoding_equals_full_forward_argmax():
  # An untied head: at initialisation a tied one predicts each input token again (BOS forever).
  model = EncoderDecoder(12, TINY, tie_embeddings=False, rngs=nnx.Rngs(1))
  batch = examples("reverse", np.random.default_rng(0), 3, 6, 12)
  source, mask = jnp.asarray(batch["x"]), jnp.asarray(batch["source_mask"])
  T = 7
  greedy = compiled(model, lambda m, s, sm: m.generate(s, T, BOS, source_mask_BS=sm))(source, mask)
  # Without a cache: the whole prefix through the decoder for every token (causal: later slots change nothing).
  forward = compiled(model, lambda m, s, sm, d: m(s, d, source_mask_BS=sm))
  decoder_input = np.full((3, T), PAD, np.int32)
  decoder_input[:, 0] = BOS
  for t in range(T):
    logits = forward(source, mask, jnp.asarray(decoder_input))
    token = np.asarray(jnp.argmax(logits[:, t], -1))
    if t + 1 < T:
      decoder_input[:, t + 1] = token
  np.testing.assert_array_equal(np.asarray(greedy)[:, :-1], decoder_input[:, 1:])
  np.testing.assert_array_equal(np.asarray(greedy)[:, -1], token)
  assert len(np.unique(np.asarray(greedy))) > 1  # not a constant sequence, which any bug could produce


def test_source_padding_changes_no_output():
  model = EncoderDecoder(12, TINY, scan_layers=False, rngs=nnx.Rngs(2))  # the unrolled layers' path
  batch = examples("copy", np.random.default_rng(1), 3, 6, 12)
  source, mask, decoder_input = batch["x"], batch["source_mask"], batch["decoder_input"]
  padded = np.concatenate([source, np.full((3, 5), 7, np.int32)], 1)  # junk after the end, masked out
  padded_mask = np.concatenate([mask, np.zeros((3, 5), bool)], 1)
  jitted = compiled(model, lambda m, s, sm, d: m(s, d, source_mask_BS=sm))
  forward = lambda s, m: np.asarray(jitted(jnp.asarray(s), jnp.ones(s.shape, bool) if m is None else jnp.asarray(m),
                                           jnp.asarray(decoder_input)))
  np.testing.assert_allclose(forward(padded, padded_mask), forward(source, mask), atol=1e-5)
  assert np.abs(forward(padded, None) - forward(source, mask)).max() > 1e-3  # unmasked, the junk would count


def test_model_learns_to_reverse_and_eval_exact_match_is_greedy_decodings(tmp_path):
  import jaxmodels
  from jaxmodels.compress import quantization
  from jaxmodels.runs.export import load_run_model
  from jaxmodels.tools import compress
  from jaxmodels.train.loop import train_and_evaluate

  c = default_config()
  c.data.update(source="reverse", seq_len=4, vocab_size=8)
  c.model.update(family="encdec", d_model=32, num_heads=2, d_ff=64, num_layers=1, positions="learned")
  c.train.update(steps=150, batch_size=32, learning_rate=1e-2, warmup_steps=10, log_every=50, eval_every=150,
                 eval_batch_size=512)
  run, out = str(tmp_path / "run"), str(tmp_path / "int8")
  metrics = train_and_evaluate(c, run)
  assert metrics["exact_match"] > 0.9, metrics
  report = compress.compress(run, "ptq", out, activations="static", repeats=1)
  assert report["after"]["exact_match"] > 0.9 and report["before"]["exact_match"] == metrics["exact_match"]
  held_out = examples("reverse", np.random.default_rng([0, 2**40]), 512, 4, 8)
  for model, exact_match in ((load_run_model(run), metrics["exact_match"]),
                             (quantization.for_decoding(jaxmodels.load_model(out), quantization.spec_of(out)),
                              report["after"]["exact_match"])):
    tokens = compiled(model, lambda m, s, sm: m.generate(s, 5, BOS, source_mask_BS=sm))(
        jnp.asarray(held_out["x"]), jnp.asarray(held_out["source_mask"]))
    right = (np.asarray(tokens) == held_out["y"]) | (held_out["mask"] == 0)
    assert right.all(axis=1).mean() == pytest.approx(exact_match)


def test_vocabulary_without_two_symbols_is_refused():
  from jaxmodels.data import load_dataset_from_config
  c = default_config()
  c.data.update(source="copy", vocab_size=4)
  with pytest.raises(UserError, match="data.vocab_size=4: data.source=copy needs at least 5"):
    load_dataset_from_config(c)
