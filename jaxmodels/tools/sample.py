"""Compiled text generation from a trained language model, for a batch of prompts at once.

The prompts are fed once (prefill), then one token per step inside a `jax.lax.while_loop`: the Transformer attends
to its KV cache, the LSTM carries its state. Prompts of different lengths share one batch, left-padded: the padding
has segment id 0 and each row's positions count its own tokens from 0 (`TransformerLM.decode`), so every row
decodes as it would alone. A model whose `decode` takes no segment ids (the LSTM) runs one batch per prompt
length instead.

Each token is drawn from softmax(logits / temperature) restricted to the top k (`top_k` > 0) and to the nucleus
(`top_p` < 1: the fewest likeliest tokens whose probabilities sum to at least p; Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration"); temperature 0 is greedy. Stop strings cut each completion before the
first of them (the cut is made on the text); the compiled loop ends before its `max_new_tokens` steps once every
row has produced the token ids of a stop string.

`sample(run, prompts)` (also `jaxmodels.sample`) does it all for a workdir or export: its tokenizer, its chat
template with `chat=True`, prefill and decode tokens/s.
"""

import dataclasses
import functools
import inspect
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.compress import quantization
from jaxmodels.data.chat import ChatTemplate
from jaxmodels.data.sft import CHAT_FILE
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.runs.export import load_trained_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["benchmark", "check_settings", "generate", "generate_batch", "load_chat", "load_language_model", "nucleus",
           "programs", "read_prompts", "sample", "Samples", "sample_token"]


def nucleus(logits_BV, top_p: float):
  """Whether each token is in its row's nucleus: the likeliest tokens whose probabilities, summed in decreasing
  order, first reach `top_p` (a token is kept when the mass of those likelier than it is below p)."""
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  order_BV = jnp.argsort(-probs_BV, axis=-1)
  sorted_BV = jnp.take_along_axis(probs_BV, order_BV, axis=-1)
  keep_sorted_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV < top_p
  return jnp.take_along_axis(keep_sorted_BV, jnp.argsort(order_BV, axis=-1), axis=-1)  # back to vocabulary order


def sample_token(logits_BV, key, temperature: float, top_k: int, top_p: float = 1.0):
  """One token per row: argmax at temperature 0, else a draw from softmax(logits / T) over the top k (k > 0) and
  the top-p nucleus (p < 1)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    logits_BV = jnp.where(nucleus(logits_BV, top_p), logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV).astype(jnp.int32)


def _left_padded(model) -> bool:
  """Whether the model's decode takes segment ids and positions (prompts of several lengths in one batch)."""
  return {"segment_ids_BT", "positions_BT"} <= set(inspect.signature(model.decode).parameters)


def programs(model: nnx.Module, prompt_len: int, length: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids=()):
  """(state, prefill, decode): the compiled halves of `generate_batch` for prompts left-padded to `prompt_len`.

  prefill(state, prompt_BP, lengths_B) -> (last logits_BV, cache): the whole batch in one call; `lengths_B` (int32)
  are the rows' real token counts (each row's padding is on the left). A model whose decode takes no segment ids
  must get rows of length `prompt_len` only.
  decode(state, logits_BV, cache, lengths_B, key) -> (tokens (B, length) int32, steps int32): up to `length` steps
  in one `lax.while_loop`, the cache (a Transformer's KV cache, written one position per step in place; an LSTM's
  carries) carried through the loop, so no step copies it. `stop_ids` (sequences of token ids): the loop ends
  after `steps` < `length` steps once every row's new tokens hold one of them; tokens past `steps` are 0.
  """
  P = prompt_len
  if not (hasattr(model, "init_cache") and hasattr(model, "decode")):  # a module of your own (docs/models.md)
    raise UserError(f"{type(model).__name__} has no init_cache(batch, length) and decode(tokens, cache, index): "
                    f"it cannot sample")
  max_len = getattr(model, "max_len", None)
  if max_len is not None and P + length > max_len:
    raise UserError(f"prompt ({P} tokens) + length ({length}) exceeds the model's max_len={max_len}")
  graphdef, state = nnx.split(model)
  padded = _left_padded(model)

  def call(model, tokens_BT, cache, index, positions_BT):
    if not padded:
      return model.decode(tokens_BT, cache, index)
    B, T = tokens_BT.shape
    segments_BT = (positions_BT >= 0).astype(jnp.int32)  # 0: left padding
    return model.decode(tokens_BT, cache, index, segment_ids_BT=segments_BT, positions_BT=jnp.maximum(positions_BT, 0))

  @jax.jit
  def prefill(state, prompt_BP, lengths_B):
    model = nnx.merge(graphdef, state)
    positions_BP = jnp.arange(P)[None, :] - (P - lengths_B)[:, None]  # negative on the padding
    logits_BPV, cache = call(model, prompt_BP, model.init_cache(prompt_BP.shape[0], P + length), 0, positions_BP)
    return logits_BPV[:, -1], cache

  # The stop sequences right-aligned in a window of the last W tokens: -1 pads them (no token id), and matches any.
  W = max(map(len, stop_ids), default=1)
  stops_SW = jnp.asarray([[-1] * (W - len(ids)) + list(ids) for ids in stop_ids] or [[-1] * W], jnp.int32)

  @jax.jit
  def decode(state, logits_BV, cache, lengths_B, key):
    model = nnx.merge(graphdef, state)
    B = logits_BV.shape[0]

    def running(carry):
      i, done_B = carry[0], carry[-1]
      return (i < length) & ~jnp.all(done_B)

    def step(carry):
      i, logits_BV, cache, key, tokens_BN, window_BW, done_B = carry
      key, sub = jax.random.split(key)
      token_B = sample_token(logits_BV, sub, temperature, top_k, top_p)
      logits_B1V, cache = call(model, token_B[:, None], cache, P + i, (lengths_B + i)[:, None])
      window_BW = jnp.concatenate([window_BW[:, 1:], token_B[:, None]], axis=1)
      hit_BSW = (window_BW[:, None, :] == stops_SW[None]) | (stops_SW[None] < 0)
      done_B = done_B | (jnp.any(jnp.all(hit_BSW, axis=-1), axis=-1) if stop_ids else False)
      tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], i, axis=1)
      return i + 1, logits_B1V[:, -1], cache, key, tokens_BN, window_BW, done_B

    # the window starts with -2, which no stop sequence holds: only new tokens match
    carry = (jnp.int32(0), logits_BV, cache, key, jnp.zeros((B, length), jnp.int32),
             jnp.full((B, W), -2, jnp.int32), jnp.zeros((B,), bool))
    steps, _, _, _, tokens_BN, _, _ = jax.lax.while_loop(running, step, carry)
    return tokens_BN, steps

  return state, prefill, decode


def generate_batch(model: nnx.Module, prompts: list, length: int, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, stop_ids=()) -> tuple[np.ndarray, dict]:
  """(tokens (len(prompts), N) int32, timing) for the 1-D id arrays `prompts`: one compiled prefill and one
  compiled decode loop per batch (one batch, left-padded; per prompt length for a model that cannot pad).

  N = `length`, or fewer where every row produced one of the token id sequences `stop_ids` (`programs`): the
  most steps a batch ran; a row's tokens after its batch's steps are 0.
  timing: prefill_s and decode_s (the compiled calls, timed after compiling), prompt_tokens (real, not padding),
  new_tokens (those decoded), decode_steps (N), row_steps (each row's batch's steps: its real tokens),
  prefill_tokens_per_sec and decode_tokens_per_sec. UserError for an empty prompt.
  """
  if any(len(p) == 0 for p in prompts):
    raise UserError("a prompt encodes to no tokens: every prompt needs at least one")
  lengths = np.array([len(p) for p in prompts], np.int32)
  groups = [np.arange(len(prompts))] if _left_padded(model) else [np.flatnonzero(lengths == n)
                                                                  for n in np.unique(lengths)]
  out, row_steps = np.zeros((len(prompts), length), np.int32), [0] * len(prompts)
  prefill_s = decode_s = 0.0
  new_tokens = steps = 0
  for g in groups:
    P = int(lengths[g].max())
    prompt_BP = jnp.asarray(np.stack([np.pad(prompts[i], (P - len(prompts[i]), 0)) for i in g]), jnp.int32)
    lengths_B, key = jnp.asarray(lengths[g]), jax.random.PRNGKey(seed)
    state, prefill, decode = programs(model, P, length, temperature, top_k, top_p, stop_ids)
    # Compiled by a first, untimed call of each: an ahead-of-time compiled executable (`.lower().compile()`)
    # refuses arrays in other layouts than it chose (a PTQ export's packed int4 weights), which jit's dispatch
    # converts.
    jax.block_until_ready(decode(state, *prefill(state, prompt_BP, lengths_B), lengths_B, key))
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(state, prompt_BP, lengths_B))
    t1 = time.perf_counter()
    tokens, n = jax.block_until_ready(decode(state, logits, cache, lengths_B, key))
    prefill_s, decode_s = prefill_s + t1 - t0, decode_s + time.perf_counter() - t1
    out[g], n = np.asarray(tokens), int(n)
    new_tokens, steps = new_tokens + len(g) * n, max(steps, n)
    for i in g:
      row_steps[i] = n
  timing = {"prefill_s": prefill_s, "decode_s": decode_s, "prompt_tokens": int(lengths.sum()),
            "new_tokens": new_tokens, "decode_steps": steps, "row_steps": row_steps,
            "prefill_tokens_per_sec": int(lengths.sum()) / prefill_s, "decode_tokens_per_sec": new_tokens / decode_s}
  return out[:, :steps], timing


def generate(model: nnx.Module, prompt_ids: np.ndarray, length: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
  """`length` new token ids continuing `prompt_ids` (1-D): `generate_batch` of one prompt."""
  return generate_batch(model, [np.asarray(prompt_ids)], length, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed)[0][0]


def benchmark(model: nnx.Module, prompt_ids: np.ndarray, length: int, *, temperature: float = 1.0,
              top_k: int = 0, repeats: int = 5) -> dict:
  """Prefill and decode throughput of `generate`'s programs (batch 1): the median of `repeats` timed calls each,
  after a compiling call. Returns prefill_tokens_per_sec (prompt tokens), decode_tokens_per_sec (new tokens) and
  the medians in seconds."""
  prompt_1P = jnp.asarray(prompt_ids, jnp.int32)[None]
  lengths_1 = jnp.asarray([prompt_1P.shape[1]], jnp.int32)
  state, prefill, decode = programs(model, prompt_1P.shape[1], length, temperature, top_k)
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(decode(state, *prefill(state, prompt_1P, lengths_1), lengths_1, key))
  prefill_s, decode_s = [], []  # no stop sequences: every call runs `length` steps
  for _ in range(repeats):
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(state, prompt_1P, lengths_1))
    t1 = time.perf_counter()
    jax.block_until_ready(decode(state, logits, cache, lengths_1, key))
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


def load_chat(workdir: str) -> ChatTemplate:
  """The chat template a run trained with (its `chat_template.json`, written by data.source=sft); UserError if it
  has none."""
  path = storage.path(workdir) / CHAT_FILE
  if not path.is_file():
    raise UserError(f"{path} not found: the run of {workdir} trained without a chat template (data.source=sft with "
                    f"data.chat_template or a tokenizer directory that has one)")
  return ChatTemplate.from_json(path.read_text(encoding="utf-8"))


def read_prompts(path: str) -> list:
  """The prompts of a file (local or gs://): a `.jsonl` file holds one JSON value a line, a string or an object
  with `prompt` (a string) or `messages` (a chat); any other file one prompt a line. Blank lines are skipped.
  UserError for a file that is missing or holds no prompt, or a JSON line of another shape."""
  p = storage.path(path)
  if not p.is_file():
    raise UserError(f"prompt file not found: {path}")
  prompts = []
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    if not p.name.endswith(".jsonl"):
      prompts.append(line)
      continue
    try:
      value = json.loads(line)
    except ValueError as e:
      raise UserError(f"{path} line {n}: not JSON ({e})") from None
    value = value.get("messages", value.get("prompt")) if isinstance(value, dict) else value
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))):
      raise UserError(f"{path} line {n}: expected a string, or an object with 'prompt' (a string) or 'messages' "
                      f"(a list of {{'role', 'content'}})")
    prompts.append(value)
  if not prompts:
    raise UserError(f"{path} holds no prompt")
  return prompts


@dataclasses.dataclass(frozen=True)
class Samples:
  """What `sample` returns: each prompt's text as fed to the model, its completion (cut at the first stop string),
  the completions' token ids (uncut: `max_new_tokens` each, or the fewer steps decoding ran where every row
  produced a stop string's tokens) and `generate_batch`'s timing."""

  prompts: list[str]
  completions: list[str]
  tokens: np.ndarray  # int32 (len(prompts), timing["decode_steps"] <= max_new_tokens)
  timing: dict


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float = 1.0,
                   vocab_size: int | None = None) -> None:
  """UserError unless max_new_tokens > 0, temperature finite and >= 0, 0 <= top_k (<= `vocab_size` when given)
  and top_p in (0, 1]."""
  if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
    raise UserError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
  if not (np.isfinite(temperature) and temperature >= 0) or top_k < 0 or not 0 < top_p <= 1:
    raise UserError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: expected a finite temperature >= 0, "
                    f"top_k >= 0 and top_p in (0, 1]")
  if vocab_size is not None and top_k > vocab_size:
    raise UserError(f"top_k={top_k} exceeds the vocabulary of {vocab_size} tokens")


def _cut(text: str, stop) -> str:
  """`text` up to the first occurrence of any stop string."""
  return text[:min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))]


def _cut_is_final(text: str, stop) -> bool:
  """Whether `text` holds a stop string and no text after it could move its cut earlier: no stop string begins
  before the cut and runs past the end (stops "CDEF" and "D": a loop that ended at "..CD" cuts before "C" if "EF"
  follow)."""
  end = len(_cut(text, stop))
  return end < len(text) and not any(s.startswith(text[j:]) for s in stop
                                     for j in range(max(0, len(text) - len(s) + 1), end))


def sample(run, prompts: list, *, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, stop=(), chat: bool = False) -> Samples:
  """Completions of `prompts` (strings; with `chat`, each a user message; or chat message lists) by the language
  model `run` (a workdir or export path; or a `(model, tokenizer)` pair, a tokenizer of jaxmodels.data.tokenizers)
  in one batch: `max_new_tokens` each, drawn with `temperature` (0: greedy), `top_k` (0: all), `top_p` (1: all)
  from `seed`, cut at the first of the `stop` strings. Chat prompts are rendered with the run's chat template
  (`load_chat`) and its generation prompt, as `transformers`' `apply_chat_template(..., add_generation_prompt=True)`.

  UserError for bad settings (an empty stop string included), a chat prompt and a run without a chat template, or
  prompts + max_new_tokens beyond the model's max_len.
  Example: `jaxmodels.sample("runs/sft", ["Reverse lemon."], chat=True, temperature=0)`.
  """
  check_settings(max_new_tokens, temperature, top_k, top_p)
  if not prompts:
    raise UserError("no prompts given")
  if any(not s for s in stop):  # found at 0 in every text: it would cut every completion to nothing
    raise UserError(f"stop strings {list(stop)!r}: expected non-empty strings")
  model, vocab = load_language_model(run) if isinstance(run, str) else run
  check_settings(max_new_tokens, temperature, top_k, top_p, vocab.size)
  chats = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]
  if any(not isinstance(p, str) for p in chats):
    if not isinstance(run, str):
      raise UserError("chat prompts need a run path (its chat template)")
    template = load_chat(run)
    chats = [p if isinstance(p, str) else template.render(p, add_generation_prompt=True) for p in chats]
  run_batch = functools.partial(generate_batch, model, [vocab.encode(p) for p in chats], max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  tokens, timing = run_batch(stop_ids=tuple(tuple(int(i) for i in vocab.encode(s)) for s in stop))
  texts = [vocab.decode(t[:n]) for t, n in zip(tokens, timing["row_steps"])]  # past a batch's steps: 0s, no text
  if not all(n == max_new_tokens or _cut_is_final(text, stop) for text, n in zip(texts, timing["row_steps"])):
    # A tokenizer whose decoding of a stop string's ids in context is not that string (a SentencePiece space), or
    # a stop string begun before the cut the loop ended at and not finished: every step again, so the completions
    # are those of the whole loop.
    tokens, timing = run_batch()
    texts = [vocab.decode(t) for t in tokens]
  return Samples(chats, [_cut(text, stop) for text in texts], tokens, timing)
