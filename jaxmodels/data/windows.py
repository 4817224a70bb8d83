"""What the sequence sources share (`data.source=text`, `tokens`, `copy`, `reverse`): inputs of `seq_len` token ids,
`vocab_size` outputs, and training batches that are pure functions of (seed, step).

Training batch `step` is drawn from `np.random.default_rng([seed, step])` (`step_rng`), so a resumed run gets
exactly the batches an uninterrupted one would, with no iterator state, and a process that feeds only some rows
of the global batch draws the same global batch and keeps its rows. A language model's batch (`random_windows`)
is `batch_size` windows of `seq_len + 1` tokens at offsets drawn uniformly from the training split.
"""

from collections.abc import Callable

import numpy as np

from jaxmodels.data.arrays import Rows

__all__ = ["SequenceSource"]


class SequenceSource:
  """A base for the sequence datasets (dataclasses with the fields `seq_len`, `seed` and `vocab_size`, or a
  `vocab_size` property)."""

  seq_len: int  # tokens per input
  seed: int  # train.seed: with the step, it fixes each training batch
  vocab_size: int  # the model's outputs

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.seq_len,)

  @property
  def num_outputs(self) -> int:
    return self.vocab_size

  def step_rng(self, step: int) -> np.random.Generator:
    """The generator of training batch `step`: a pure function of (seed, step)."""
    return np.random.default_rng([self.seed, step])

  def random_windows(self, step: int, batch_size: int, rows: Rows, num_tokens: int,
                     read: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """{'x', 'y'} of shape (len(rows), seq_len): rows `rows` (indices into the global batch) of the global batch of
    `batch_size` random windows for `step` over a training split of `num_tokens` tokens, targets shifted by one.

    `read(starts)` returns the windows of `seq_len + 1` tokens that start at `starts` (shape (n,)), as an (n,
    seq_len + 1) array: only the rows' windows are read.
    """
    starts = self.step_rng(step).integers(0, num_tokens - self.seq_len, size=batch_size)[rows]
    windows = read(starts)
    return {"x": windows[:, :-1], "y": windows[:, 1:]}
