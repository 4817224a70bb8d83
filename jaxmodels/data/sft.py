"""Instruction and chat data, packed: `data.source=sft`.

`data.path` is a JSON Lines file (local or gs://), one example per line, either

    {"prompt": "Translate to French: cat", "response": " chat"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A prompt/response pair is its two texts as they are, the tokenizer's end-of-text token after the response. A
conversation is rendered with the chat template (`data.chat_template`, else the tokenizer directory's own;
jaxmodels.data.chat), as `transformers`' `apply_chat_template` renders it. The loss falls on the responses only
(each assistant message with its end-of-turn text; a pair's response and end-of-text): the prompts, system and user
turns carry none. Each piece is tokenized on its own, as a prompt is when sampling, so a response's first token is
the one the model must produce after the prompt.

The tokenizer is `data.tokenizer_path` (a Hugging Face tokenizer directory holding `tokenizer.json`, e.g. the
directory a model was imported from, or a tokenizer file as `jaxmodels prepare --tokenizer` takes), else
`data.tokenizer` (char: the training examples' characters, or byte), with one end-of-text id appended.

Packing: the examples (each `n` tokens trains on `n - 1` positions; one longer than `data.seq_len + 1` keeps its
first `seq_len + 1` tokens, and one left with no response target is dropped) are packed into rows of `seq_len`
by best-fit decreasing (longest first, each into the fullest row it fits). Each row carries `segment_ids` (the
k-th example of the row is k, padding 0), so the Transformer attends only within an example and its positions
(RoPE or learned) restart at each example's first token (jaxmodels.models.transformer.segment_positions); a
batch's `mask` is 1 on response targets, 0 on prompts and padding. The last `data.val_fraction` of the examples
validate. The packing is done once (the examples shuffled by `train.seed` first); training batch `step` takes
global rows `step * batch_size ...` of the epoch's permutation of the rows (`default_rng([seed, epoch])`), a pure
function of (seed, step), so resume is exact with no iterator state.

Written here rather than with grain's packing iterators (`grain.experimental.FirstFitPackIterDataset`): they pack
a stream as it is read and keep iterator state, where a batch here is reached at any step directly.
"""

import bisect
import dataclasses
import json
import math
from typing import Iterator

import numpy as np

from jaxmodels.data import tokenizers
from jaxmodels.data.arrays import ALL_ROWS, Rows, existing_file
from jaxmodels.data.chat import ChatTemplate, directory_template, load_chat_template
from jaxmodels.data.tokenizers import VOCAB_FILE, Vocab
from jaxmodels.data.windows import SequenceSource
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CHAT_FILE", "Examples", "load_sft_dataset", "pack", "read_jsonl", "SFTDataset", "tokenize_examples"]

CHAT_FILE = "chat_template.json"  # a run's chat template and special tokens, in its workdir (for sample --chat)


def read_jsonl(path: str, what: str = "an example") -> list[dict]:
  """The objects of a JSON Lines file (blank lines skipped); UserError naming the line that is not UTF-8 text or
  not a JSON object. Lines end at a byte line end (\\n, \\r\\n), never at U+2028 or U+0085, which JSON strings
  may hold raw (str.splitlines cut such a line in two)."""
  file = existing_file(path, "a JSON Lines file")
  records = []
  for n, raw in enumerate(file.read_bytes().splitlines(), 1):
    try:
      line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte order mark some editors write first
    except UnicodeDecodeError as e:  # was a traceback from reading the whole file as text
      raise UserError(f"{path} line {n}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise UserError(f"{path} line {n}: not JSON ({e})") from None
    if not isinstance(record, dict):
      raise UserError(f"{path} line {n}: expected a JSON object holding {what}, got {type(record).__name__}")
    records.append(record)
  if not records:
    raise UserError(f"{path} holds no examples")
  return records


def _example(record: dict, where: str, template: ChatTemplate | None) -> tuple[list[tuple[str, bool]], bool]:
  """One JSONL record as (its (text, is_response) pieces, whether the end-of-text token follows)."""
  if "messages" in record:
    messages = record["messages"]
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)):
      raise UserError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}}")
    if template is None:
      raise UserError(f"{where} holds messages but there is no chat template: set data.tokenizer_path to a Hugging "
                      f"Face tokenizer directory that has one, or data.chat_template to a Jinja file")
    return template.pieces(messages), False
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    return [(record["prompt"], False), (record["response"], True)], True
  raise UserError(f"{where}: expected 'prompt' and 'response' strings or a 'messages' list, got keys "
                  f"{sorted(record)}")


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenized examples, flat: example i is tokens[offsets[i]:offsets[i + 1]], `response` 1 on its response
  tokens. `truncated` and `dropped` count the examples cut to `seq_len + 1` tokens and left out."""

  tokens: np.ndarray  # int32 (N,)
  response: np.ndarray  # float32 (N,)
  offsets: np.ndarray  # int64 (examples + 1,)
  truncated: int = 0
  dropped: int = 0

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    """Positions each example trains on: its tokens minus one."""
    return np.diff(self.offsets) - 1

  def row(self, members, seq_len: int) -> dict[str, np.ndarray]:
    """One packed row of `seq_len`: examples `members` in order; {'x', 'y', 'mask', 'segment_ids'}."""
    x, y, segment_ids = np.zeros((3, seq_len), np.int32)
    mask = np.zeros(seq_len, np.float32)
    at = 0
    for k, i in enumerate(members, 1):
      lo, hi = self.offsets[i], self.offsets[i + 1]
      n = hi - lo - 1
      x[at:at + n], y[at:at + n] = self.tokens[lo:hi - 1], self.tokens[lo + 1:hi]
      mask[at:at + n], segment_ids[at:at + n] = self.response[lo + 1:hi], k
      at += n
    return {"x": x, "y": y, "mask": mask, "segment_ids": segment_ids}


def tokenize_examples(examples: list[tuple[list[tuple[str, bool]], bool]], tok, seq_len: int) -> Examples:
  """Examples given as (pieces, end): the (text, is_response) pieces tokenized one by one, then with `end` the
  tokenizer's end-of-text id (`tok.eot`, where it has one) as a response token; cut to `seq_len + 1` tokens;
  those left with no response target are left out (counted in `dropped`)."""
  texts = [text for pieces, _ in examples for text, _ in pieces]
  encoded = iter(tok.encode_batch(texts) if texts else [])
  tokens, response, offsets, truncated, dropped = [], [], [0], 0, 0
  for pieces, end in examples:
    ids, resp = [], []
    for _, is_response in pieces:
      piece = list(next(encoded))
      ids += piece
      resp += [float(is_response)] * len(piece)
    if end and tok.eot is not None:
      ids.append(tok.eot)
      resp.append(1.0)
    if len(ids) > seq_len + 1:
      ids, resp, truncated = ids[:seq_len + 1], resp[:seq_len + 1], truncated + 1
    if len(ids) < 2 or not any(resp[1:]):
      dropped += 1
      continue
    tokens += ids
    response += resp
    offsets.append(len(tokens))
  return Examples(np.asarray(tokens, np.int32), np.asarray(response, np.float32), np.asarray(offsets, np.int64),
                  truncated, dropped)


def pack(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None) -> list[list[int]]:
  """Example indices grouped into rows of at most `capacity` positions, best-fit decreasing: longest first (ties in
  `order`, default index order), each into the row with the least room that still holds it."""
  order = np.arange(len(lengths)) if order is None else order
  rows, free = [], []  # free: sorted (room left, row index) of the rows not yet full
  for i in sorted(order.tolist(), key=lambda i: -lengths[i]):
    n = int(lengths[i])
    j = bisect.bisect_left(free, (n, -1))
    room, r = free.pop(j) if j < len(free) else (capacity, len(rows))
    if r == len(rows):
      rows.append([])
    rows[r].append(i)
    if room > n:
      bisect.insort(free, (room - n, r))
  return rows


@dataclasses.dataclass
class SFTDataset(SequenceSource):
  """Packed instruction examples; batches are {'x', 'y', 'segment_ids'} int32 and 'mask' float32, (B, seq_len)."""

  task = "lm"
  unit = "token"  # the eval metric bits_per_token (of response tokens)

  train: Examples
  val: Examples
  vocab: object  # a tokenizer (jaxmodels.data.tokenizers)
  template: ChatTemplate | None
  vocab_size: int  # the model's output count: the tokenizer's size, or data.vocab_size when larger (an imported
  # model's padded vocabulary)
  seq_len: int
  seed: int
  source: str

  def __post_init__(self):
    shuffled = np.random.default_rng(self.seed).permutation(len(self.train))
    self.train_rows = pack(self.train.lengths, self.seq_len, shuffled)
    self.val_rows = pack(self.val.lengths, self.seq_len)
    self._order = (-1, None)

  def packing_efficiency(self) -> float:
    """The fraction of the training rows' positions that hold an example (not padding)."""
    return float(self.train.lengths.sum()) / (len(self.train_rows) * self.seq_len)

  def describe(self) -> str:
    t = self.train
    loss = float(t.response.sum() - t.response[t.offsets[:-1]].sum()) / float(t.lengths.sum())
    cut, left = t.truncated + self.val.truncated, t.dropped + self.val.dropped
    cut = f", {cut} cut to data.seq_len + 1 tokens" if cut else ""
    left = f", {left} without a response target left out" if left else ""
    return (f"{self.source}: {len(t):,} train / {len(self.val):,} validation examples{cut}{left}, packed into "
            f"{len(self.train_rows):,} rows of {self.seq_len}: packing efficiency {self.packing_efficiency():.1%} "
            f"(non-padding), {loss:.1%} of the positions train (responses); {self.vocab.kind} vocabulary of "
            f"{self.vocab.size:,}{', chat template' if self.template else ''}")

  def files(self) -> dict[str, str]:
    """Files the run keeps in its workdir: the tokenizer's spec and the chat template, for sampling."""
    return {VOCAB_FILE: self.vocab.to_json(), **({CHAT_FILE: self.template.to_json()} if self.template else {})}

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """The permutation of the training rows in epoch `epoch` (the newest kept: batches come in step order)."""
    if self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows)))
    return self._order[1]

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` of global batch `step`: packed rows step * batch_size ... of the epochs' row permutations."""
    g = (step * batch_size + np.arange(batch_size))[rows]
    R = len(self.train_rows)
    picked = [self.train_rows[self._epoch_order(int(i) // R)[int(i) % R]] for i in g]
    return _stack([self.train.row(m, self.seq_len) for m in picked])

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The validation rows in order, rows `rows` of each batch; padding rows' mask is 0."""
    for b in range(math.ceil(len(self.val_rows) / batch_size)):
      index = (b * batch_size + np.arange(batch_size))[rows]
      yield _stack([self.val.row(self.val_rows[i] if i < len(self.val_rows) else [], self.seq_len) for i in index])


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in ("x", "y", "mask", "segment_ids")}


def _tokenizer(tokenizer: str, tokenizer_path: str, texts: list[str]):
  """The tokenizer of `data.tokenizer_path` (a directory's tokenizer.json, or a file), else a `Vocab` of
  `data.tokenizer` over `texts`, with an end-of-text id."""
  if tokenizer_path:
    p = storage.path(tokenizer_path)
    if not p.exists():
      raise UserError(f"data.tokenizer_path={tokenizer_path!r} not found: expected a Hugging Face tokenizer "
                      f"directory (its tokenizer.json) or a tokenizer file")
    return tokenizers.from_file(str(p / "tokenizer.json") if p.is_dir() else tokenizer_path)
  return dataclasses.replace(Vocab.build(tokenizer, "".join(texts)), with_eot=True)


def load_sft_dataset(*, path: str, seed: int, seq_len: int, val_fraction: float, tokenizer: str,
                     tokenizer_path: str, chat_template: str, vocab_size: int = 0) -> SFTDataset:
  """`data.source=sft` (the module docstring): the JSONL file `path`, its last `val_fraction` of examples
  validating, tokenized by `tokenizer_path` (else `tokenizer`), conversations rendered with `chat_template` (else
  the tokenizer directory's), packed into rows of `seq_len`; `seed` shuffles the packing and the rows;
  `vocab_size` model outputs (0: the tokenizer's size; larger pads them, as an imported model's may be). UserError
  for an unreadable file, a line that is neither format, messages without a chat template, splits with no
  example left, or a `vocab_size` below the tokenizer's."""
  if not path:
    raise UserError("data.source=sft needs data.path: a JSON Lines file of {'prompt', 'response'} or "
                    "{'messages'} examples")
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
  records = read_jsonl(path)
  # a tokenizer file is read first, so that a missing one is named, not taken for a missing chat template
  tok = _tokenizer(tokenizer, tokenizer_path, []) if tokenizer_path else None
  template = (load_chat_template(chat_template) if chat_template else
              directory_template(tokenizer_path) if tokenizer_path else None)
  examples = [_example(record, f"{path} line {n}", template) for n, record in enumerate(records, 1)]
  split = len(records) - max(1, int(len(records) * val_fraction))
  if split < 1:
    raise UserError(f"{path} holds {len(records)} example(s): too few to keep data.val_fraction={val_fraction} "
                    f"for validation and train on the rest")
  tok = tok or _tokenizer(tokenizer, tokenizer_path, [t for pieces, _ in examples[:split] for t, _ in pieces])
  train, val = tokenize_examples(examples[:split], tok, seq_len), tokenize_examples(examples[split:], tok, seq_len)
  for name, examples in (("training", train), ("validation", val)):
    if not len(examples):
      raise UserError(f"the {name} split of {path} has no example with a response token to train on")
  if vocab_size and vocab_size < tok.size:
    raise UserError(f"data.vocab_size={vocab_size} is below the tokenizer's {tok.size} ids; 0 takes the tokenizer's")
  return SFTDataset(train, val, tok, template, max(vocab_size, tok.size), seq_len, seed, path)

