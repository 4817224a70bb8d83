"""Compiled text generation from a trained language-model run.

The prompt is fed once (prefill), then one token per step inside a
`jax.lax.scan`: the Transformer attends to its KV cache, the LSTM carries its
state. Temperature 0 is greedy decoding; top-k keeps the k likeliest tokens.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.compress import quantization
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.runs.export import load_trained_model
from jaxmodels.runtime.errors import UserError

__all__ = ["benchmark", "generate", "load_language_model", "programs", "sample_token"]


def sample_token(logits_BV, key, temperature: float, top_k: int):
  """One token per row: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV).astype(jnp.int32)


def programs(model: nnx.Module, prompt_len: int, length: int, temperature: float = 1.0, top_k: int = 0):
  """(state, prefill, decode): the compiled halves of `generate` for prompts of `prompt_len` tokens.

  prefill(state, prompt_1P) -> (last logits_1V, cache): the whole prompt in one call.
  decode(state, logits_1V, cache, key) -> tokens (length,) int32: `length` steps in one `lax.scan`, the
  cache (a Transformer's KV cache, written one position per step in place; an LSTM's carries) carried
  through the loop, so no step copies it.
  """
  P = prompt_len
  if not (hasattr(model, "init_cache") and hasattr(model, "decode")):  # a module of your own (docs/models.md)
    raise UserError(f"{type(model).__name__} has no init_cache(batch, length) and decode(tokens, cache, index): "
                    f"it cannot sample")
  max_len = getattr(model, "max_len", None)
  if max_len is not None and P + length > max_len:
    raise UserError(f"prompt ({P} tokens) + length ({length}) exceeds the model's max_len={max_len}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, prompt_1P):
    model = nnx.merge(graphdef, state)
    logits_1PV, cache = model.decode(prompt_1P, model.init_cache(1, P + length), 0)
    return logits_1PV[:, -1], cache

  @jax.jit
  def decode(state, logits_1V, cache, key):
    model = nnx.merge(graphdef, state)

    def step(carry, i):
      logits_1V, cache, key = carry
      key, sub = jax.random.split(key)
      token_1 = sample_token(logits_1V, sub, temperature, top_k)
      logits_11V, cache = model.decode(token_1[:, None], cache, P + i)
      return (logits_11V[:, -1], cache, key), token_1[0]

    _, tokens = jax.lax.scan(step, (logits_1V, cache, key), jnp.arange(length))
    return tokens

  return state, prefill, decode


def generate(model: nnx.Module, prompt_ids: np.ndarray, length: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> np.ndarray:
  """`length` new token ids continuing `prompt_ids` (1-D): one compiled prefill, then one compiled decode loop."""
  prompt_1P = jnp.asarray(prompt_ids, jnp.int32)[None]
  state, prefill, decode = programs(model, prompt_1P.shape[1], length, temperature, top_k)
  return np.asarray(decode(state, *prefill(state, prompt_1P), jax.random.PRNGKey(seed)))


def benchmark(model: nnx.Module, prompt_ids: np.ndarray, length: int, *, temperature: float = 1.0,
              top_k: int = 0, repeats: int = 5) -> dict:
  """Prefill and decode throughput of `generate`'s programs (batch 1): the median of `repeats` timed calls each,
  after a compiling call. Returns prefill_tokens_per_sec (prompt tokens), decode_tokens_per_sec (new tokens) and
  the medians in seconds."""
  prompt_1P = jnp.asarray(prompt_ids, jnp.int32)[None]
  state, prefill, decode = programs(model, prompt_1P.shape[1], length, temperature, top_k)
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(decode(state, *prefill(state, prompt_1P), key))
  prefill_s, decode_s = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(state, prompt_1P))
    t1 = time.perf_counter()
    jax.block_until_ready(decode(state, logits, cache, key))
    prefill_s.append(t1 - t0)
    decode_s.append(time.perf_counter() - t1)
  p, d = statistics.median(prefill_s), statistics.median(decode_s)
  return {"prefill_s": p, "decode_s": d, "prefill_tokens_per_sec": prompt_1P.shape[1] / p,
          "decode_tokens_per_sec": length / d}


def load_language_model(workdir: str) -> tuple[nnx.Module, Vocab]:
  """The model of a language-model run at its newest checkpoint (or of an export or compressed export), decoding
  as quantized as it was trained or compressed, and its vocabulary."""
  vocab = Vocab.load(workdir)
  model = load_trained_model(workdir)
  spec = quantization.spec_of(workdir)
  return (quantization.for_decoding(model, spec) if spec else model), vocab
