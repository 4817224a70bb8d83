"""Batches made ahead of use: grain worker processes (or a thread) run a dataset's batch function for step + k.

A batch stays a pure function of its step: the loader only computes `fn(step)`
for the next steps early, in order, so a resumed run (which starts the stream
at its restored step) sees the same batches. `StepStream.get(step)` serves
consecutive steps from the stream and restarts it on any other step, so callers
keep random access (the datasets' `train_batch(step, ...)` contract).

grain (`MapDataset.range(...).map(fn).to_iter_dataset().mp_prefetch(...)`)
runs `fn` in `workers` spawned processes, each producing whole batches of its
share of the steps, returned in step order; `fn` must pickle. With 0 workers
grain's read thread (`ReadOptions(num_threads=1)`) still makes the next batches
while the step runs, for sources that do not pickle cheaply (memory-mapped files).
"""

import atexit
import weakref
from typing import Callable, Iterator

import grain
from absl import flags

FAR = 1 << 40  # the end of an open-ended step range


def prefetched(fn: Callable[[int], dict], start: int, stop: int = FAR, workers: int = 0,
               buffer: int = 2) -> Iterator[dict]:
  """fn(start), fn(start + 1), ..., fn(stop - 1), computed ahead: in `workers` grain processes, else one thread.

  `buffer` batches per worker (or for the thread) are made ahead of the consumer.
  """
  ds = grain.MapDataset.range(start, stop).map(fn).to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                                                      prefetch_buffer_size=buffer))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads its options from absl's global flags, which jaxmodels never parses
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
  return iter(ds)


_OPEN = weakref.WeakSet()  # streams whose workers are stopped at exit (else their shared memory is reported leaked)


class StepStream:
  """`get(step)` = fn(step), served from a prefetching stream while steps come in order."""

  def __init__(self, fn: Callable[[int], dict], workers: int):
    self.fn, self.workers = fn, workers
    self._it, self._next = None, None
    _OPEN.add(self)

  def get(self, step: int) -> dict:
    if self._it is None or step != self._next:
      self.close()
      self._it = prefetched(self.fn, step, workers=self.workers)
    self._next = step + 1
    return next(self._it)

  def close(self) -> None:
    """Stops the workers; a later `get` starts new ones."""
    if self._it is not None:
      self._it.close()
      self._it = None


atexit.register(lambda: [s.close() for s in list(_OPEN)])


def in_order(fn: Callable[[int], dict], count: int, workers: int) -> Iterator[dict]:
  """fn(0), ..., fn(count - 1) (e.g. evaluation batches), computed ahead like training batches."""
  if not count:
    return
  it = prefetched(fn, 0, count, workers)
  try:
    for _ in range(count):
      yield next(it)
  finally:
    it.close()
