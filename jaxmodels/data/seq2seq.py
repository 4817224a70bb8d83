"""Synthetic sequence-to-sequence tasks (`data.source=copy` or `reverse`): paired data for the encoder-decoder.

A source is 1..`data.seq_len` random symbols (lengths uniform over [max(1, seq_len // 2), seq_len], so that
held-out sequences are almost never training ones); its target is the same symbols (copy) or the symbols
reversed (reverse), then EOS. Token ids: PAD 0, BOS 1, EOS 2, symbols 3..vocab_size-1. A training batch is a
pure function of (train.seed, step); the 512 held-out sequences come from their own stream of the seed.

Batches: 'x' source (B, S) int32 (PAD after its end), 'source_mask' (B, S) bool, 'decoder_input' (B, T)
int32 (BOS then the target, teacher forcing), 'y' target (B, T) int32 and 'mask' (B, T) float32 (1 on the
target's symbols and its EOS), with S = seq_len and T = seq_len + 1.
"""

import dataclasses
from typing import Iterator

import numpy as np

from jaxmodels.data.arrays import ALL_ROWS, Rows, padded_batches
from jaxmodels.data.windows import SequenceSource
from jaxmodels.runtime.errors import UserError

__all__ = ["BOS", "DEFAULT_VOCAB", "EOS", "EVAL_SEQUENCES", "EVAL_STREAM", "examples", "load_seq2seq_dataset", "PAD",
           "Seq2SeqDataset"]

PAD, BOS, EOS = 0, 1, 2
DEFAULT_VOCAB = 16  # data.vocab_size=0: 13 symbols
EVAL_SEQUENCES = 512
EVAL_STREAM = 2**40  # the held-out sequences' generator: [seed, EVAL_STREAM], beyond any training step


def examples(kind: str, rng: np.random.Generator, n: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """`n` examples of task `kind` (copy | reverse) drawn from `rng`, as the batch arrays (see the module)."""
  lengths_B = rng.integers(max(1, seq_len // 2), seq_len + 1, size=n)
  symbols_BS = rng.integers(EOS + 1, vocab_size, size=(n, seq_len)).astype(np.int32)
  j_S = np.arange(seq_len)
  source_mask_BS = j_S < lengths_B[:, None]
  source_BS = np.where(source_mask_BS, symbols_BS, PAD).astype(np.int32)
  if kind == "reverse":  # target j = source (length - 1 - j)
    index_BS = np.clip(lengths_B[:, None] - 1 - j_S, 0, seq_len - 1)
    target_BS = np.where(source_mask_BS, np.take_along_axis(source_BS, index_BS, axis=1), PAD)
  else:
    target_BS = source_BS
  y_BT = np.concatenate([target_BS, np.full((n, 1), PAD, np.int32)], axis=1)
  y_BT[np.arange(n), lengths_B] = EOS
  mask_BT = (np.arange(seq_len + 1) <= lengths_B[:, None]).astype(np.float32)
  decoder_input_BT = np.concatenate([np.full((n, 1), BOS, np.int32), y_BT[:, :-1]], axis=1)
  return {"x": source_BS, "source_mask": source_mask_BS, "decoder_input": decoder_input_BT,
          "y": y_BT.astype(np.int32), "mask": mask_BT}


@dataclasses.dataclass
class Seq2SeqDataset(SequenceSource):
  """A copy or reverse task: `train_batch` draws fresh sequences each step; `eval_batches` the held-out ones."""

  task = "seq2seq"
  unit = "token"

  kind: str  # copy | reverse
  seq_len: int  # longest source
  vocab_size: int  # model outputs: the symbols and PAD, BOS, EOS
  seed: int

  def describe(self) -> str:
    return (f"{self.kind} task: sources of {max(1, self.seq_len // 2)}..{self.seq_len} of "
            f"{self.vocab_size - EOS - 1} symbols, {EVAL_SEQUENCES} held-out sequences")

  def files(self) -> dict[str, str]:
    return {}

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch of `step` (a pure function of the seed and the step)."""
    batch = examples(self.kind, self.step_rng(step), batch_size, self.seq_len, self.vocab_size)
    return {k: v[rows] for k, v in batch.items()}

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The held-out sequences in padded batches (mask 0 on padding rows); the same count on every process."""
    data = examples(self.kind, np.random.default_rng([self.seed, EVAL_STREAM]), EVAL_SEQUENCES, self.seq_len,
                    self.vocab_size)
    for batch in padded_batches(data.pop("x"), data.pop("y"), batch_size, data.pop("mask"), **data):
      yield {k: v[rows] for k, v in batch.items()}


def load_seq2seq_dataset(*, source: str, seed: int, seq_len: int, vocab_size: int) -> Seq2SeqDataset:
  """`data.source=copy` or `reverse` (`source`): sources of up to `seq_len` symbols, `vocab_size` outputs (0:
  DEFAULT_VOCAB), drawn from `seed`; UserError for a vocabulary without two symbols."""
  vocab_size = vocab_size or DEFAULT_VOCAB
  if vocab_size < EOS + 3:
    raise UserError(f"data.vocab_size={vocab_size}: data.source={source} needs at least "
                    f"{EOS + 3} (PAD, BOS, EOS and two symbols), or 0 for {DEFAULT_VOCAB}")
  return Seq2SeqDataset(source, seq_len, vocab_size, seed)
