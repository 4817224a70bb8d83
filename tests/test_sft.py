"""Instruction data (data.source=sft): packed rows give each example the logits it gets alone, the prompts carry no
loss, chat templates render as transformers renders them; tokens' document masking attends within documents;
batched sampling (temperature 0) equals one prompt at a time, top-p keeps the nucleus, stop strings cut."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from jaxmodels.data import load_dataset
from jaxmodels.data.chat import ChatTemplate, load_chat_template
from jaxmodels.data.sft import pack
from jaxmodels.data.tokenizers import from_file
from jaxmodels.models.forward import forward
from jaxmodels.models.transformer import TransformerLM
from jaxmodels.runtime.errors import UserError

CHATML = os.path.join(ROOT, "experiments", "data", "chatml.jinja")
# A template of the kind the Hub ships: special tokens, a system-prompt default, loop controls, raise_exception.
LLAMA_LIKE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
              "{% set messages = messages[1:] %}{% else %}{% set system = 'Be brief.' %}{% endif %}"
              "{{ '[SYS]' + system + '[/SYS]\\n' }}"
              "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
              "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
              "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}")
CHAT = [{"role": "user", "content": "Reverse abc."}, {"role": "assistant", "content": "cba"},
        {"role": "user", "content": " And xy? "}, {"role": "assistant", "content": "yx"}]


SHORT = "{% for m in messages %}{{ '<' + m['role'][0] + '>' + m['content'] + '|' }}{% endfor %}" \
        "{% if add_generation_prompt %}<a>{% endif %}"  # a compact template: several examples per row of 64


def right_padded(rows, length):
  """Token rows, each alone, padded on the right (causal: what follows a token does not change its logits)."""
  return np.stack([np.pad(r, (0, length - len(r))) for r in rows])


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def lm():
  """A small random float32 Transformer LM over bytes and an end-of-text id (257 tokens)."""
  return TransformerLM(257, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=64, rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def sft(tmp_path_factory, lm):
  """A packed byte-level dataset of pairs and conversations, and a small float32 Transformer."""
  directory = tmp_path_factory.mktemp("sft")
  (directory / "short.jinja").write_text(SHORT)
  path = directory / "data.jsonl"
  rng = np.random.default_rng(0)
  records = []
  for i in range(24):
    word = "".join(rng.choice(list("abcdefgh"), rng.integers(1, 9)))
    records.append({"prompt": f"rev {word}=", "response": word[::-1]} if i % 2 else
                   {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word.upper()}]})
  dataset = load_dataset("sft", path=write_jsonl(path, records), seq_len=64, tokenizer="byte",
                         chat_template=str(directory / "short.jinja"), seed=3)
  assert dataset.vocab_size == 257
  return dataset, lm


def test_packed_rows_give_each_example_its_own_logits(sft):
  """Every example of a packed row (several per row) gets the logits it gets alone, to 1e-5 in float32: attention
  stays within the example and RoPE restarts at its first token."""
  dataset, model = sft
  batch = dataset.train_batch(0, 4)
  assert (batch["segment_ids"].max(axis=1) >= 2).all()  # packed: several examples per row
  logits = np.asarray(forward(model, batch))
  places = [(r, np.flatnonzero(batch["segment_ids"][r] == k)) for r in range(4)
            for k in range(1, batch["segment_ids"][r].max() + 1)]
  alone = np.asarray(model(jnp.asarray(right_padded([batch["x"][r, where] for r, where in places], 64))))
  for i, (r, where) in enumerate(places):
    np.testing.assert_allclose(logits[r, where], alone[i, :len(where)], atol=1e-5, rtol=0)


def test_only_responses_carry_loss(sft):
  """The mask is 1 exactly on response targets: a pair's response and its end-of-text token, an assistant turn
  and its end-of-turn text; the prompts, user turns and padding carry none, and the loss ignores their targets."""
  dataset, model = sft
  batch = dataset.train_batch(1, 4)
  eot = dataset.vocab.eot
  for r in range(4):
    for k in range(1, batch["segment_ids"][r].max() + 1):
      where = np.flatnonzero(batch["segment_ids"][r] == k)
      text = bytes(int(t) for t in batch["x"][r, where] if t != eot).decode()
      targets = [int(t) for t in batch["y"][r, where][batch["mask"][r, where] == 1]]
      trained = bytes(t for t in targets if t != eot).decode()
      if text.startswith("rev "):
        word = text[4:text.index("=")]
        assert trained == word[::-1] and targets[-1] == eot
      else:
        word = text[3:text.index("|")]
        assert text.startswith("<u>") and trained == word.upper() + "|"
    assert batch["mask"][r][batch["segment_ids"][r] == 0].sum() == 0
  # a loss on the masked targets only: changing a prompt target changes nothing
  from jaxmodels.train.step import StepOptions, task_loss
  loss = task_loss(StepOptions(task="lm"))
  changed = dict(batch, y=np.where(batch["mask"] == 0, (batch["y"] + 1) % dataset.vocab_size, batch["y"]))
  key = jax.random.PRNGKey(0)
  assert float(loss(model, batch, key)[0]) == float(loss(model, changed, key)[0])
  assert float(loss(model, batch, key)[1]["count"]) == batch["mask"].sum()


def test_batches_are_a_function_of_seed_and_step(sft):
  """A batch depends on (seed, step) only; epochs reshuffle the packed rows; every row appears once per epoch."""
  dataset, _ = sft
  again = load_dataset("sft", path=dataset.source, seq_len=64, tokenizer="byte",
                       chat_template=os.path.join(os.path.dirname(dataset.source), "short.jinja"), seed=3)
  for step in (5, 0, 2):
    for k in ("x", "y", "mask", "segment_ids"):
      np.testing.assert_array_equal(dataset.train_batch(step, 2)[k], again.train_batch(step, 2)[k])
  R = len(dataset.train_rows)
  seen = np.concatenate([dataset.train_batch(s, 1)["x"] for s in range(R)])
  assert len({r.tobytes() for r in seen}) == R
  assert 0.5 < dataset.packing_efficiency() <= 1.0 and "packing efficiency" in dataset.describe()
  eval_rows = sum(int((b["mask"].sum(axis=1) > 0).sum()) for b in dataset.eval_batches(2))
  assert eval_rows == len(dataset.val_rows)


def test_pack_best_fit_decreasing():
  """Longest first, each into the fullest row that holds it; no row over capacity."""
  rows = pack(np.array([5, 3, 7, 2, 1, 6]), 8)
  assert rows == [[2, 4], [5, 3], [0, 1]]


def test_chat_template_renders_as_transformers():
  """The rendering (with and without the generation prompt, special tokens from tokenizer_config.json) equals
  transformers' apply_chat_template, and the pieces join to it with the assistant turns marked."""
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["Reverse abc. And xy? cba yx [INST] [/INST] [SYS] Be brief."] * 4,
                            tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                           show_progress=False,
                                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = LLAMA_LIKE
    fast.save_pretrained(d)
    ours = load_chat_template(d)
    for messages in (CHAT, CHAT[:3], [{"role": "system", "content": "S"}, *CHAT[:2]]):
      for gen in (False, True):
        assert ours.render(messages, gen) == fast.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=gen)
    # the ids a chat prompt samples from: our rendering, tokenized by the directory's tokenizer.json
    vocab = from_file(os.path.join(d, "tokenizer.json"))
    ids = fast.apply_chat_template(CHAT[:3], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert vocab.encode(ours.render(CHAT[:3], True)).tolist() == list(ids)
    # data.source=sft reads the same directory: its tokenizer and its template
    path = write_jsonl(pathlib.Path(d) / "chat.jsonl", [{"messages": CHAT}] * 4)
    dataset = load_dataset("sft", path=path, tokenizer_path=d, seq_len=64)
    assert dataset.template == ours and dataset.vocab_size == vocab.size
    assert load_dataset("sft", path=path, tokenizer_path=d, seq_len=64, vocab_size=vocab.size + 4).num_outputs == (
        vocab.size + 4)  # an imported model's padded vocabulary
  pieces = ours.pieces(CHAT)
  assert "".join(t for t, _ in pieces) == ours.render(CHAT)
  assert [t for t, r in pieces if r] == [" cba</s>", " yx</s>"]
  with pytest.raises(UserError, match="unknown role tool"):
    ours.render([{"role": "tool", "content": "x"}])
  assert ChatTemplate.from_json(ours.to_json()) == ours


def test_token_document_mask(tmp_path, lm):
  """data.document_mask: each end-of-text token starts a segment, and a token's logits are those of its document
  alone (from its end-of-text token); off by default (no segment ids, as nanoGPT)."""
  from jaxmodels.data.prepare import prepare
  docs = [tmp_path / f"{i}.txt" for i in range(40)]
  for i, f in enumerate(docs):
    f.write_text("abcdefgh"[i % 8] * (3 + i % 5) + " xyz" * (i % 3))
  prepare([str(f) for f in docs], str(tmp_path / "corpus"), tokenizer="byte", val_fraction=0.2, workers=0,
          progress=False)
  kw = dict(path=str(tmp_path / "corpus"), seq_len=32, seed=0)
  assert "segment_ids" not in load_dataset("tokens", **kw).train_batch(0, 2)
  dataset = load_dataset("tokens", **kw, document_mask=True)
  batch = dataset.train_batch(0, 2)
  eot = dataset.vocab.eot
  assert dataset.vocab_size == 257
  logits = np.asarray(forward(lm, batch))
  starts = [np.flatnonzero(batch["x"][r] == eot) for r in range(2)]
  assert all(len(s) >= 2 for s in starts)
  for r in range(2):
    np.testing.assert_array_equal(np.diff(batch["segment_ids"][r])[starts[r][starts[r] > 0] - 1], 1)
  # one whole document of each row, its end-of-text token first
  alone = np.asarray(lm(jnp.asarray(right_padded([batch["x"][r, s[0]:s[1]] for r, s in enumerate(starts)], 32))))
  for r, s in enumerate(starts):
    np.testing.assert_allclose(logits[r, s[0]:s[1]], alone[r, :s[1] - s[0]], atol=1e-5, rtol=0)
  assert "segment_ids" in next(iter(dataset.eval_batches(2)))


def test_sft_errors(tmp_path):
  """One line for messages without a chat template, a record of neither format, and a non-Transformer family."""
  path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"}]}] * 3)
  with pytest.raises(UserError, match="no chat template"):
    load_dataset("sft", path=path, tokenizer="byte")
  # a missing tokenizer is named, not taken for a missing chat template ("set data.tokenizer_path", which was set)
  with pytest.raises(UserError, match="data.tokenizer_path='nope' not found: expected a Hugging Face tokenizer"):
    load_dataset("sft", path=path, tokenizer_path="nope")
  with pytest.raises(UserError, match="tokenizer file not found: .*tokenizer.json"):
    load_dataset("sft", path=path, tokenizer_path=str(tmp_path))
  path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}])
  with pytest.raises(UserError, match="line 1: expected 'prompt' and 'response'"):
    load_dataset("sft", path=path, tokenizer="byte")
  from jaxmodels.config import default_config
  from jaxmodels.config.validate import validate
  c = default_config()
  c.data.source, c.data.path, c.model.family = "sft", path, "lstm"
  with pytest.raises(UserError, match="model.family=lstm with data.source=sft"):
    validate(c)


def test_batched_greedy_equals_one_prompt_at_a_time(lm):
  """Prompts of different lengths in one left-padded batch, temperature 0, decode exactly the tokens each decodes
  alone; the timing counts the real prompt tokens."""
  from jaxmodels.tools.sample import generate, generate_batch
  prompts = [np.arange(3, 8), np.array([9, 200, 4]), np.arange(40, 45)]
  batched, timing = generate_batch(lm, prompts, 12, temperature=0.0)
  for p, row in zip(prompts, batched):
    np.testing.assert_array_equal(row, generate(lm, p, 12, temperature=0.0))
  assert timing["prompt_tokens"] == 13 and timing["new_tokens"] == 36 and timing["decode_tokens_per_sec"] > 0


def test_top_p_keeps_exactly_the_nucleus():
  """On probabilities 0.05, 0.5, 0.15, 0.3 (shuffled order), top-p keeps the fewest likeliest tokens reaching p;
  draws at that p land in the nucleus only, and in all of it."""
  from jaxmodels.tools.sample import nucleus, sample_token
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  for p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.9, [1, 2, 3]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
    assert np.flatnonzero(np.asarray(nucleus(logits, p))[0]).tolist() == kept
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0, 0.7))(keys)
  assert set(np.asarray(draws).ravel().tolist()) == {1, 3}


def test_stop_strings_cut_the_output(lm):
  """A completion ends before the first stop string; the tokens stay whole; several prompts decode as one batch."""
  from jaxmodels.data.tokenizers import Vocab
  from jaxmodels.tools.sample import sample
  vocab = Vocab("byte")
  whole = sample((lm, vocab), ["ab", "xyz1"], max_new_tokens=12, temperature=0.0)
  text = whole.completions[0]
  stop = text[4:6]
  cut = sample((lm, vocab), ["ab", "xyz1"], max_new_tokens=12, temperature=0.0, stop=[stop, "\x00never"])
  assert cut.completions[0] == text[:text.index(stop)] and len(cut.completions[0]) < len(text)
  np.testing.assert_array_equal(cut.tokens, whole.tokens)
  with pytest.raises(UserError, match="top_p"):
    sample((lm, vocab), ["ab"], top_p=0.0)
  with pytest.raises(UserError, match=r"stop strings \['a', ''\]: expected non-empty strings"):  # used to cut all
    sample((lm, vocab), ["ab"], stop=["a", ""])


def test_stop_strings_end_the_decoding_loop_once_every_row_has_one(lm):
  """The loop ran every step and the stop strings cut the text after it; now it ends once each row has produced
  a stop string's tokens, with the same completions."""
  from jaxmodels.data.tokenizers import Vocab
  from jaxmodels.tools.sample import sample
  vocab = Vocab("char", "".join(chr(0x100 + i) for i in range(256)))  # ids 1..256, each one character
  prompts = ["ab", "xyz1", "q"]
  whole = sample((lm, vocab), prompts, max_new_tokens=16, temperature=0.0)
  assert whole.timing["decode_steps"] == 16 and whole.tokens.shape == (3, 16)
  stops = [text[3:5] for text in whole.completions]  # each row stops by its 5th token
  cut = sample((lm, vocab), prompts, max_new_tokens=16, temperature=0.0, stop=stops)
  steps = cut.timing["decode_steps"]
  assert steps < 16 and cut.tokens.shape == (3, steps) and cut.timing["new_tokens"] == 3 * steps
  cut_at = lambda text, stops: text[:min(i for s in stops if (i := text.find(s)) >= 0)]  # the cut of the text
  assert cut.completions == [cut_at(text, stops) for text in whole.completions]
  np.testing.assert_array_equal(cut.tokens, whole.tokens[:, :steps])
  assert not any(stops[0] in text for text in whole.completions[1:])  # rows 1 and 2 never stop: every step runs
  one = sample((lm, vocab), prompts, max_new_tokens=16, temperature=0.0, stop=stops[:1])
  assert one.timing["decode_steps"] == 16 and one.completions == [cut_at(whole.completions[0], stops[:1]),
                                                                  *whole.completions[1:]]


def test_a_stop_string_begun_before_the_loop_ends_still_cuts_first(lm):
  """Stops "CDEF" and "D" of a completion "..CDEF..": the loop ends once "D" is decoded, but the cut after decoding
  every step is before "C", where the longer stop string begins; the early end must not cut after it."""
  from jaxmodels.data.tokenizers import Vocab
  from jaxmodels.tools.sample import sample
  vocab = Vocab("char", "".join(chr(0x100 + i) for i in range(256)))  # ids 1..256, each one character
  text = sample((lm, vocab), ["ab"], max_new_tokens=16, temperature=0.0).completions[0]
  j = next(j for j in range(1, 10) if text[j + 1] not in text[:j + 1] and text.find(text[j:j + 4]) == j)
  stops = [text[j:j + 4], text[j + 1]]
  cut = sample((lm, vocab), ["ab"], max_new_tokens=16, temperature=0.0, stop=stops)
  assert cut.completions == [text[:j]]


def test_a_model_that_cannot_pad_cuts_each_prompt_length_at_its_own_steps(lm, monkeypatch):
  """A model whose decode takes no positions (an LSTM) decodes each prompt length as its own batch; a batch that
  ended early has 0s past its steps. They were decoded as text (char vocabulary: U+FFFD), which hid a stop string
  begun before the cut, and the longest batch's steps decided whether to rerun."""
  from jaxmodels.data.tokenizers import Vocab
  from jaxmodels.tools import sample as sampling
  monkeypatch.setattr(sampling, "_left_padded", lambda _model: False)  # the Transformer as a model that cannot pad
  vocab = Vocab("char", "".join(chr(0x100 + i) for i in range(256)))
  prompts = ["ab", "xyz1"]
  first, second = sampling.sample((lm, vocab), prompts, max_new_tokens=16, temperature=0.0).completions
  j = next(j for j in range(1, 10) if first[j + 1] not in first[:j + 1] + second and first.find(first[j:j + 4]) == j)
  cut = sampling.sample((lm, vocab), prompts, max_new_tokens=16, temperature=0.0, stop=[first[j:j + 4], first[j + 1]])
  assert cut.completions == [first[:j], second]
