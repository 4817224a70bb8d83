"""Character- or byte-level text for language models.

The first `1 - data.val_fraction` of the text trains, the rest validates.
Training draws random windows of `seq_len + 1` tokens, a pure function of
(seed, step); evaluation sweeps the validation text in consecutive windows,
padding and masking the last, so every validation target counts exactly once.

With no `data.path`, the embedded default corpus is the source code of a fixed
list of Python standard-library modules (`CORPUS_MODULES`), read from the
running interpreter: real text on any machine, no download. It is about 380 K
characters (Python 3.11; other versions differ slightly).
"""

import dataclasses
import importlib.util
import math
from typing import Iterator

import numpy as np

from jaxmodels.data.arrays import ALL_ROWS, Rows, existing_file, padded_batches
from jaxmodels.data.tokenizers import VOCAB_FILE, Vocab
from jaxmodels.data.windows import SequenceSource
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CORPUS_MODULES", "default_corpus", "load_text_dataset", "read_text", "TextDataset", "unigram_entropy"]

CORPUS_MODULES = ("argparse", "textwrap", "difflib", "dataclasses", "inspect")


def default_corpus() -> str:
  """The embedded corpus: the concatenated source of CORPUS_MODULES."""
  parts = []
  for name in CORPUS_MODULES:
    parts.append(storage.path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8"))
  return "\n".join(parts)


def read_text(path: str) -> str:
  """The UTF-8 text of the file at `path`; UserError for a missing path, a directory, an unreadable file, bytes
  that are not UTF-8, or an empty file."""
  file = existing_file(path, "a text file")
  try:
    text = storage.read_utf8(file, path)
  except OSError as e:
    raise UserError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
  if not text:
    raise UserError(f"{path} is empty")
  return text


def unigram_entropy(ids: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the token frequencies: the loss of the best context-free model."""
  p = np.bincount(ids, minlength=vocab_size) / len(ids)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


@dataclasses.dataclass
class TextDataset(SequenceSource):
  """Token ids of the train and validation text; batches are {'x', 'y'} of shape (B, seq_len)."""

  task = "lm"

  train_ids: np.ndarray
  val_ids: np.ndarray
  vocab: Vocab
  seq_len: int
  seed: int
  source: str

  @property
  def vocab_size(self) -> int:
    return self.vocab.size

  @property
  def unit(self) -> str:
    """What a token is (char or byte), for the eval metric bits_per_<unit>."""
    return self.vocab.kind

  def describe(self) -> str:
    return (f"{self.source}: {len(self.train_ids):,} train / {len(self.val_ids):,} validation tokens, "
            f"{self.vocab.kind} vocabulary of {self.vocab.size}, unigram entropy "
            f"{unigram_entropy(self.train_ids, self.vocab.size):.3f} nats/token")

  def files(self) -> dict[str, str]:
    """Files the run keeps in its workdir: the vocabulary, for evaluation and sampling."""
    return {VOCAB_FILE: self.vocab.to_json()}

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` (indices into the global batch) of the global batch of random windows for `step`."""
    read = lambda starts: self.train_ids[starts[:, None] + np.arange(self.seq_len + 1)]
    return self.random_windows(step, batch_size, rows, len(self.train_ids), read)

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive validation windows, rows `rows` of each padded batch; the same count on every process."""
    ids, L = self.val_ids, self.seq_len
    n = math.ceil((len(ids) - 1) / L)
    padded = np.concatenate([ids, np.zeros(n * L + 1 - len(ids), np.int32)])
    x = np.stack([padded[i * L:(i + 1) * L] for i in range(n)])
    y = np.stack([padded[i * L + 1:(i + 1) * L + 1] for i in range(n)])
    mask = (np.arange(n * L).reshape(n, L) < len(ids) - 1).astype(np.float32)  # real targets only
    for batch in padded_batches(x, y, batch_size, mask):
      yield {k: v[rows] for k, v in batch.items()}


def load_text_dataset(*, path: str, seed: int, seq_len: int, val_fraction: float, tokenizer: str) -> TextDataset:
  """`data.source=text`: the UTF-8 file at `path` (empty: the embedded corpus), its last `val_fraction`
  validating, as `tokenizer` (char | byte) ids in windows of `seq_len`; `seed` draws the training windows.
  UserError for an unreadable file (`read_text`), splits shorter than one window, or a text of one token."""
  text, source = (read_text(path), path) if path else (default_corpus(), "embedded corpus")
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
  split = int(len(text) * (1.0 - val_fraction))
  vocab = Vocab.build(tokenizer, text[:split])
  train_ids, val_ids = vocab.encode(text[:split]), vocab.encode(text[split:])
  for name, ids in (("training", train_ids), ("validation", val_ids)):
    if len(ids) < seq_len + 1:
      raise UserError(f"the {name} split of {source} has {len(ids)} tokens, shorter than one window of "
                      f"data.seq_len + 1 = {seq_len + 1}")
  if len(np.unique(train_ids)) < 2:  # the language-model analogue of a dataset with one class
    raise UserError(f"the training split of {source} repeats one token ({vocab.decode(train_ids[:1])!r}): "
                    f"there is nothing to learn")
  return TextDataset(train_ids, val_ids, vocab, seq_len, seed, source)
