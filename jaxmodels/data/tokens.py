"""Token corpora read from a local disk (memory-mapped) or a bucket (ranged reads): `data.source=tokens`.

`data.path` is a directory prepared by `jaxmodels prepare` (index.json, token
shards, tokenizer), local or `gs://`, or a local one in nanoGPT's layout
(`train.bin`, `val.bin`: flat uint16 ids, read as they are; `data.vocab_size`
gives the vocabulary, since nanoGPT's meta.pkl is a pickle and is not loaded).
Files are never read whole: local ones are `np.memmap`ed and a batch touches its
windows' pages only; shards in a bucket are read by byte ranges, one ranged GET
per window, all of a batch's windows requested concurrently (fsspec's
`cat_ranges` through jaxmodels.runtime.storage), and the loader thread
(`data.prefetch`) fetches the next batches while the step runs. Each process
reads only the rows it feeds (`rows`), so a corpus of any size trains in little
host memory and with no local copy.

Why ranged reads of the flat shards rather than ArrayRecord through grain: a
training window starts at any token, not at a record boundary, and the flat
shards give any window as one byte range of `(seq_len + 1) * itemsize` bytes,
so the same shards serve a local disk and a bucket with no second format to
write, and nanoGPT's files keep working as they are.

Training windows start at `default_rng([seed, step]).integers(0, n - seq_len)`
(jaxmodels.data.windows, the same draw as `data.source=text`): a pure function
of (seed, step, row), so resume is exact with no iterator state. Evaluation
reads consecutive windows of the validation split, or `data.eval_windows` of
them evenly spaced, so the cost of evaluating a large corpus is known.
"""

import dataclasses
import json
import math
import os
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
  """The ids of one split: `[file, start, count]` segments of flat id files, read as one sequence.

  Local files are memory-mapped; files behind a URL (gs://) are read by byte ranges, every window of a call to
  `read` fetched concurrently (storage.read_ranges). Either way only the windows asked for are read.
  """

  def __init__(self, directory: epath.Path, segments: list, dtype, sizes: dict[str, int]):
    """`sizes`: {file name: bytes} of the directory's files (storage.file_sizes), which every segment must be
    in and fit."""
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.remote = storage.is_remote(directory)
    self.arrays = []  # local: a memmap of each segment
    self.urls, self.byte_offsets = [], []  # remote: each segment's file and the byte offset of its first id
    counts = []
    for name, start, count in segments:
      path = directory / name
      if name not in sizes:
        raise UserError(f"{path} is a directory, not a token file" if path.is_dir() else
                        f"{path}: token file not found")
      length = sizes[name]
      if length < (start + count) * self.dtype.itemsize:
        raise UserError(f"{path} holds {length // self.dtype.itemsize} {self.dtype.name} ids, fewer "
                        f"than the {start + count} its index lists: truncated?")
      if not count:
        continue
      counts.append(count)
      if self.remote:
        self.urls.append(os.fspath(path))
        self.byte_offsets.append(start * self.dtype.itemsize)
        continue
      try:
        self.arrays.append(np.memmap(path, self.dtype, mode="r", offset=start * self.dtype.itemsize,
                                     shape=(count,)))
      except OSError as e:
        raise UserError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
    self.offsets = np.cumsum([0] + counts)
    # Windows and bytes read: a test counts that each process reads only its own rows; `jaxmodels bench data`
    # reports the bytes.
    self.windows_read = 0
    self.bytes_read = 0

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _pieces(self, start: int, n: int) -> list[tuple[int, int, int]]:
    """(segment, first id, end id) pieces of ids [start, start + n), ids counted within each segment."""
    pieces, i = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
    while n > 0:
      lo = start - int(self.offsets[i])
      take = min(n, int(self.offsets[i + 1]) - start)
      pieces.append((i, lo, lo + take))
      start, n, i = start + take, n - take, i + 1
    return pieces

  def read(self, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """ids [start, start + n) of each (start, n) of `spans`, as int32 arrays; only those ids are read (remote
    files: all the spans' byte ranges requested at once). UserError if a remote read fails."""
    pieces = [self._pieces(int(start), int(n)) for start, n in spans]
    flat = [piece for window in pieces for piece in window]
    size = self.dtype.itemsize
    if self.remote:
      data = storage.read_ranges([self.urls[i] for i, _, _ in flat],
                                 [self.byte_offsets[i] + lo * size for i, lo, _ in flat],
                                 [self.byte_offsets[i] + hi * size for i, _, hi in flat])
      arrays = iter([np.frombuffer(d, self.dtype) for d in data])
    else:
      arrays = iter([self.arrays[i][lo:hi] for i, lo, hi in flat])
    self.windows_read += len(spans)
    self.bytes_read += sum(hi - lo for _, lo, hi in flat) * size
    return [np.concatenate([next(arrays) for _ in window]).astype(np.int32) for window in pieces]


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
            f"({self.train.dtype.name}, {'ranged reads' if self.train.remote else 'memory-mapped'}), {self.vocab.kind} vocabulary of {self.vocab.size:,}"
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
    read = lambda starts: self._check_ids(np.stack(self.train.read([(s, self.seq_len + 1) for s in starts])))
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
      real = [(r, int(i) * stride * L) for r, i in enumerate(index) if i < k]
      windows = self.val.read([(start, min(L + 1, n_val - start)) for _, start in real])
      for (r, _), window in zip(real, windows):
        x[r, :len(window) - 1], y[r, :len(window) - 1] = window[:-1], window[1:]
        mask[r, :len(window) - 1] = 1
      yield self.segments({"x": self._check_ids(x), "y": self._check_ids(y), "mask": mask})


def _directory(path: str) -> epath.Path:
  if not path:
    raise UserError("data.source=tokens needs data.path: a directory from `jaxmodels prepare`, or nanoGPT's "
                    "train.bin and val.bin")
  directory = storage.path(path)
  try:
    is_file, is_dir = directory.is_file(), directory.is_dir()
  except storage.storage_errors() as e:
    raise UserError(f"data.path={path}: cannot reach the storage ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:200]})") from None
  if is_file:
    raise UserError(f"data.path={path} is a file, not a directory: data.source=tokens reads a directory from "
                    f"jaxmodels prepare, or one holding nanoGPT's {' and '.join(NANOGPT_FILES)}")
  if not is_dir:
    raise UserError(f"data.path: directory not found: {path}")
  return directory


INDEX_FIELDS = {"format": str, "dtype": str, "vocab_size": int, "tokenizer": dict, "shards": list, "train": dict,
                "validation": dict}


def load_index(directory: epath.Path, sizes: dict[str, int] | None = None) -> dict:
  """The `jaxmodels prepare` index of `directory`; UserError for a file that is not JSON, lacks a field, names
  another format or a dtype that is not an unsigned integer, or lists a shard of the wrong size. `sizes`: the
  directory's {file name: bytes} if already listed (storage.file_sizes)."""
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
  sizes = storage.file_sizes(directory) if sizes is None else sizes
  for shard in index["shards"]:
    if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("tokens"), int)):
      raise UserError(f"{path}: shard {shard!r} is not a {{'file': name, 'tokens': count}} (rerun jaxmodels prepare)")
    file = directory / shard["file"]
    if shard["file"] in sizes and sizes[shard["file"]] != shard["tokens"] * itemsize:
      raise UserError(f"{file}: {sizes[shard['file']]} bytes, but {path} lists {shard['tokens']} {index['dtype']} "
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
  directory = _directory(path)
  sizes = storage.file_sizes(directory)  # one listing, not a request per shard
  if INDEX_FILE in sizes:
    index = load_index(directory, sizes)
    tok = load_tokenizer(directory, index["tokenizer"])
    if vocab_size and vocab_size < index["vocab_size"]:
      raise UserError(f"data.vocab_size={vocab_size} is below the corpus's vocabulary of {index['vocab_size']} "
                      f"({path}/{INDEX_FILE}); 0 takes the corpus's")
    vocab_size, dtype = max(vocab_size, index["vocab_size"]), index["dtype"]
    train = TokenStream(directory, index["train"]["segments"], dtype, sizes)
    val = TokenStream(directory, index["validation"]["segments"], dtype, sizes)
  elif all(name in sizes for name in NANOGPT_FILES):
    if not vocab_size:
      raise UserError(f"{path} holds nanoGPT's train.bin/val.bin: set data.vocab_size to its vocabulary size "
                      f"(meta.pkl's vocab_size; 50257 for GPT-2 BPE), since pickles are not loaded")
    tok = tokenizers.IdTokenizer(vocab_size)
    streams = []
    for name in NANOGPT_FILES:
      length = sizes[name]
      if length % 2:  # flat uint16 ids: an odd size is a damaged file, and its last byte would be dropped
        raise UserError(f"{directory / name}: {length} bytes, an odd size for nanoGPT's uint16 ids (2 bytes each): "
                        f"truncated or not nanoGPT's format")
      streams.append(TokenStream(directory, [[name, 0, length // 2]], np.uint16, sizes))
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
