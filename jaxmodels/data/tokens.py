"""Token corpora read from disk, memory-mapped: `data.source=tokens`.

`data.path` is a directory prepared by `jaxmodels prepare` (index.json, token
shards, tokenizer) or in nanoGPT's layout (`train.bin`, `val.bin`: flat uint16
ids, read as they are; `data.vocab_size` gives the vocabulary, since nanoGPT's
meta.pkl is a pickle and is not loaded). The files are `np.memmap`ed, never read
whole: a batch reads its windows' pages only, and each process reads only the
rows it feeds (`rows`), so a corpus of any size trains in little host memory.

Training windows start at `default_rng([seed, step]).integers(0, n - seq_len)`
(jaxmodels.data.windows, the same draw as `data.source=text`): a pure function
of (seed, step, row), so resume is exact with no iterator state. Evaluation
reads consecutive windows of the validation split, or `data.eval_windows` of
them evenly spaced, so the cost of evaluating a large corpus is known.

np.memmap needs a local file: shards on gs:// are refused with a message (copy
them to a local disk first, e.g. `gsutil -m cp -r`), rather than copied
silently onto a disk that may not hold them.
"""

import dataclasses
import json
import math
from typing import Iterator

import numpy as np
from etils import epath

from jaxmodels.data import tokenizers
from jaxmodels.data.arrays import ALL_ROWS, Rows
from jaxmodels.data.prepare import FORMAT, INDEX_FILE
from jaxmodels.data.tokenizers import VOCAB_FILE
from jaxmodels.data.windows import SequenceSource
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["ID_DTYPES", "INDEX_FIELDS", "load_index", "load_token_dataset", "load_tokenizer", "NANOGPT_FILES",
           "TokenDataset", "TokenStream"]

NANOGPT_FILES = ("train.bin", "val.bin")
ID_DTYPES = ("uint16", "uint32")  # what `jaxmodels prepare` writes


class TokenStream:
  """The ids of one split: `[file, start, count]` segments of flat id files, read as one sequence."""

  def __init__(self, directory: epath.Path, segments: list, dtype):
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.arrays = []
    for name, start, count in segments:
      path = directory / name
      if path.is_dir():
        raise UserError(f"{path} is a directory, not a token file")
      if not path.is_file():
        raise UserError(f"{path}: token file not found")
      if path.stat().length < (start + count) * self.dtype.itemsize:
        raise UserError(f"{path} holds {path.stat().length // self.dtype.itemsize} {self.dtype.name} ids, fewer "
                        f"than the {start + count} its index lists: truncated?")
      if count:
        try:
          self.arrays.append(np.memmap(path, self.dtype, mode="r", offset=start * self.dtype.itemsize,
                                       shape=(count,)))
        except OSError as e:
          raise UserError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
    self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
    self.windows_read = 0  # read() calls: a test counts that each process reads only its own rows

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, start: int, n: int) -> np.ndarray:
    """ids [start, start + n) as int32; only those pages of the files are touched."""
    self.windows_read += 1
    parts, i = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
    while n > 0:
      lo = start - int(self.offsets[i])
      piece = self.arrays[i][lo:lo + n]
      parts.append(piece)
      start, n, i = start + len(piece), n - len(piece), i + 1
    return np.concatenate(parts).astype(np.int32)


@dataclasses.dataclass
class TokenDataset(SequenceSource):
  """Memory-mapped train and validation ids; batches are {'x', 'y'} int32 of shape (B, seq_len)."""

  task = "lm"
  unit = "token"  # the eval metric bits_per_token

  train: TokenStream
  val: TokenStream
  vocab: object  # a tokenizer (jaxmodels.data.tokenizers)
  vocab_size: int  # the model's output count: the tokenizer's size, or data.vocab_size when larger (padding)
  seq_len: int
  seed: int
  eval_windows: int  # 0: the whole validation split
  source: str
  document_mask: bool = False  # batches carry segment_ids: attention stays within a document

  def segments(self, batch: dict) -> dict:
    """`batch` with `segment_ids` under `document_mask`: each end-of-text token starts the next document (it is
    that document's first token, as a BOS is), so a token attends only to its own document's earlier tokens."""
    if self.document_mask:
      batch["segment_ids"] = (1 + np.cumsum(batch["x"] == self.vocab.eot, axis=1)).astype(np.int32)
    return batch

  def describe(self) -> str:
    n = self.num_eval_windows()
    return (f"{self.source}: {len(self.train):,} train / {len(self.val):,} validation tokens "
            f"({self.train.dtype.name}, memory-mapped), {self.vocab.kind} vocabulary of {self.vocab.size:,}"
            f"{f' (model outputs {self.vocab_size:,})' if self.vocab_size != self.vocab.size else ''}, "
            f"{n:,} evaluation windows")

  def files(self) -> dict[str, str]:
    """Files the run keeps in its workdir: the tokenizer's self-contained spec, for sampling."""
    return {VOCAB_FILE: self.vocab.to_json()}

  def _check_ids(self, ids: np.ndarray) -> np.ndarray:
    if ids.size and ids.max() >= self.vocab_size:
      raise UserError(f"{self.source} holds token id {int(ids.max())}, beyond the vocabulary of {self.vocab_size} "
                      f"(set data.vocab_size to the corpus's vocabulary)")
    return ids

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` (indices into the global batch) of the global batch of random windows for `step`."""
    read = lambda starts: self._check_ids(np.stack([self.train.read(int(s), self.seq_len + 1) for s in starts]))
    return self.segments(self.random_windows(step, batch_size, rows, len(self.train), read))

  def num_eval_windows(self) -> int:
    n = math.ceil((len(self.val) - 1) / self.seq_len)
    return min(n, self.eval_windows) if self.eval_windows else n

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Validation windows, rows `rows` of each padded batch; the same batch count on every process.

    Window i starts at token i * stride * seq_len (stride 1 for the whole split, n // data.eval_windows
    otherwise); `mask` is 0 past the split's last target and on padding rows, so each target counts once.
    """
    L, n_val, k = self.seq_len, len(self.val), self.num_eval_windows()
    stride = math.ceil((n_val - 1) / L) // k
    for b in range(math.ceil(k / batch_size)):
      index = (b * batch_size + np.arange(batch_size))[rows]
      x, y = np.zeros((2, len(index), L), np.int32)
      mask = np.zeros((len(index), L), np.float32)
      for r, i in enumerate(index):
        if i < k:
          start = int(i) * stride * L
          window = self.val.read(start, min(L + 1, n_val - start))
          x[r, :len(window) - 1], y[r, :len(window) - 1] = window[:-1], window[1:]
          mask[r, :len(window) - 1] = 1
      yield self.segments({"x": self._check_ids(x), "y": self._check_ids(y), "mask": mask})


def _local_directory(path: str) -> epath.Path:
  if not path:
    raise UserError("data.source=tokens needs data.path: a directory from `jaxmodels prepare`, or nanoGPT's "
                    "train.bin and val.bin")
  if "://" in path:
    raise UserError(f"data.path={path}: token files are memory-mapped (np.memmap), which needs a local disk; copy "
                    f"them to one first (e.g. gsutil -m cp -r {path} /local/dir)")
  directory = storage.path(path)
  if directory.is_file():
    raise UserError(f"data.path={path} is a file, not a directory: data.source=tokens reads a directory from "
                    f"jaxmodels prepare, or one holding nanoGPT's {' and '.join(NANOGPT_FILES)}")
  if not directory.is_dir():
    raise UserError(f"data.path: directory not found: {path}")
  return directory


INDEX_FIELDS = {"format": str, "dtype": str, "vocab_size": int, "tokenizer": dict, "shards": list, "train": dict,
                "validation": dict}


def load_index(directory: epath.Path) -> dict:
  """The `jaxmodels prepare` index of `directory`; UserError for a file that is not JSON, lacks a field, names
  another format or a dtype that is not an unsigned integer, or lists a shard of the wrong size."""
  path = directory / INDEX_FILE
  try:
    index = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
    raise UserError(f"{path}: not a readable JSON index ({str(e).splitlines()[0]})") from None
  if not isinstance(index, dict):
    raise UserError(f"{path}: not a JSON object")
  if index.get("format") != FORMAT:
    raise UserError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r} (written by jaxmodels prepare)")
  for field, kind in INDEX_FIELDS.items():
    if not isinstance(index.get(field), kind):
      raise UserError(f"{path}: field {field!r} missing or not a {kind.__name__} (rerun jaxmodels prepare)")
  if index["dtype"] not in ID_DTYPES:
    raise UserError(f"{path}: dtype {index['dtype']!r}, expected one of {', '.join(ID_DTYPES)}")
  itemsize = np.dtype(index["dtype"]).itemsize
  for shard in index["shards"]:
    if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("tokens"), int)):
      raise UserError(f"{path}: shard {shard!r} is not a {{'file': name, 'tokens': count}} (rerun jaxmodels prepare)")
    file = directory / shard["file"]
    if file.is_file() and file.stat().length != shard["tokens"] * itemsize:
      raise UserError(f"{file}: {file.stat().length} bytes, but {path} lists {shard['tokens']} {index['dtype']} "
                      f"ids ({shard['tokens'] * itemsize} bytes): truncated or rewritten; rerun jaxmodels prepare")
  return index


def load_tokenizer(directory: epath.Path, spec: dict):
  """The tokenizer an index names: a file beside the shards, or an inline spec (char, byte)."""
  if "file" in spec:
    return tokenizers.from_file(str(directory / spec["file"]), spec["kind"])
  return tokenizers.from_spec(spec)


def load_token_dataset(*, path: str, seed: int, seq_len: int, vocab_size: int, eval_windows: int,
                       document_mask: bool = False) -> TokenDataset:
  """`data.source=tokens`: the corpus in directory `path` in windows of `seq_len`, `vocab_size` outputs (0: the
  prepared corpus's; required for nanoGPT's files), `eval_windows` validation windows (0: all); `seed` draws the
  training windows; `document_mask` adds `segment_ids` at the end-of-text tokens. Raises UserError for a missing
  or malformed directory, a file of the wrong size, a vocabulary that does not hold the corpus's ids, splits
  shorter than one window, or `document_mask` on a corpus whose tokenizer has no end-of-text token."""
  directory = _local_directory(path)
  if (directory / INDEX_FILE).is_file():
    index = load_index(directory)
    tok = load_tokenizer(directory, index["tokenizer"])
    if vocab_size and vocab_size < index["vocab_size"]:
      raise UserError(f"data.vocab_size={vocab_size} is below the corpus's vocabulary of {index['vocab_size']} "
                      f"({path}/{INDEX_FILE}); 0 takes the corpus's")
    vocab_size, dtype = max(vocab_size, index["vocab_size"]), index["dtype"]
    train = TokenStream(directory, index["train"]["segments"], dtype)
    val = TokenStream(directory, index["validation"]["segments"], dtype)
  elif all((directory / name).is_file() for name in NANOGPT_FILES):
    if not vocab_size:
      raise UserError(f"{path} holds nanoGPT's train.bin/val.bin: set data.vocab_size to its vocabulary size "
                      f"(meta.pkl's vocab_size; 50257 for GPT-2 BPE), since pickles are not loaded")
    tok = tokenizers.IdTokenizer(vocab_size)
    streams = []
    for name in NANOGPT_FILES:
      length = (directory / name).stat().length
      if length % 2:  # flat uint16 ids: an odd size is a damaged file, and its last byte would be dropped
        raise UserError(f"{directory / name}: {length} bytes, an odd size for nanoGPT's uint16 ids (2 bytes each): "
                        f"truncated or not nanoGPT's format")
      streams.append(TokenStream(directory, [[name, 0, length // 2]], np.uint16))
    train, val = streams
  else:
    raise UserError(f"{path} holds neither {INDEX_FILE} (jaxmodels prepare) nor {' and '.join(NANOGPT_FILES)} "
                    f"(nanoGPT)")
  for name, stream in (("training", train), ("validation", val)):
    if len(stream) < seq_len + 1:
      raise UserError(f"the {name} split of {path} has {len(stream)} tokens, shorter than one window of "
                      f"data.seq_len + 1 = {seq_len + 1}")
  if document_mask and tok.eot is None:
    raise UserError(f"data.document_mask=True but {path} has no tokenizer with an end-of-text token (nanoGPT's "
                    f"raw ids): documents cannot be told apart; prepare the corpus with jaxmodels prepare")
  return TokenDataset(train, val, tok, vocab_size, seq_len, seed, eval_windows, path, document_mask)
