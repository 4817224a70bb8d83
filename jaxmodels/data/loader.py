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

A UserError that `fn` raises (e.g. an image file that does not decode) comes back from the worker as a value
and is raised again by the consumer, after it stops the stream: raised inside a grain worker, it would end that
worker with batches left in shared memory that nothing frees (reported as leaked at exit).
"""

import atexit
import dataclasses
import functools
import threading
import weakref
from typing import Callable, Iterator

import grain
import numpy as np
from absl import flags

from jaxmodels.runtime.errors import UserError

__all__ = ["FAR", "in_order", "prefetched", "StepStream"]

FAR = 1 << 40  # the end of an open-ended step range


@dataclasses.dataclass(frozen=True)
class _Failed:
  """What a batch function's UserError becomes on its way out of a worker: its message."""

  message: str


def _guarded(fn: Callable[[int], dict], step: int) -> "dict | _Failed":
  """fn(step), or its UserError as a `_Failed` value (a module function: workers pickle it with `fn`)."""
  try:
    return fn(step)
  except UserError as e:
    return _Failed(str(e))


def _batch(it: Iterator) -> dict:
  """The next batch of `it` as arrays of this process's own memory; a `_Failed` one closes `it` and raises its
  UserError here.

  Workers hand arrays over in shared memory (grain's SharedMemoryArray), freed when the array is collected: one
  still held at exit (a device array on the CPU backend aliases its host buffer) is left behind and reported as
  leaked. A copy costs a memcpy per batch and frees the shared block at once.
  """
  batch = next(it)
  if isinstance(batch, _Failed):
    it.close()
    raise UserError(batch.message)
  if not isinstance(batch, dict):
    return batch
  shared = lambda v: isinstance(v, np.ndarray) and type(v) is not np.ndarray  # a SharedMemoryArray
  return {k: np.array(v) if shared(v) else v for k, v in batch.items()}


def prefetched(fn: Callable[[int], dict], start: int, stop: int = FAR, workers: int = 0,
               buffer: int = 2) -> Iterator[dict]:
  """fn(start), fn(start + 1), ..., fn(stop - 1), computed ahead: in `workers` grain processes, else one thread.

  `buffer` batches per worker (or for the thread) are made ahead of the consumer. Read them with `_batch`, which
  raises the UserError of a failed one.
  """
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer)
  ds = grain.MapDataset.range(start, stop).map(functools.partial(_guarded, fn)).to_iter_dataset(options)
  if workers:
    if not flags.FLAGS.is_parsed():  # grain reads its options from absl's global flags, which jaxmodels never parses
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
  return iter(ds)


# Streams in creation order, stopped at exit newest first (a stream may feed on an older one: the training loop's
# device stream on an image dataset's worker stream); unstopped workers leave shared memory reported as leaked.
_OPEN: list[weakref.ref] = []
_SHUT = []  # non-empty once the interpreter exits: streams no longer start workers


class StepStream:
  """`get(step)` = fn(step), served from a prefetching stream while steps come in order.

  A UserError of `fn` (bad data) stops the stream for good: that `get` and every later one raise it, and no
  workers start again (a stream feeding on this one, made ahead, would otherwise restart them at the next step).
  """

  def __init__(self, fn: Callable[[int], dict], workers: int, buffer: int = 2):
    self.fn, self.workers, self.buffer = fn, workers, buffer
    self._it, self._next = None, None
    self._failed = None  # the UserError that stopped the stream
    # get() may be called from a thread of another stream (a restarted one's old thread still finishing) as
    # well as its new one: one at a time, so no restart drops an iterator without closing its workers.
    self._lock = threading.Lock()
    _OPEN.append(weakref.ref(self))

  def get(self, step: int) -> dict:
    with self._lock:
      if self._failed is not None:
        raise self._failed
      if self._it is None or step != self._next:
        if _SHUT:
          raise RuntimeError("the data loader is shut down: the interpreter is exiting")
        self._close()
        self._it = prefetched(self.fn, step, workers=self.workers, buffer=self.buffer)
      self._next = step + 1
      try:
        return _batch(self._it)
      except UserError as e:
        self._it, self._failed = None, e  # closed by _batch
        raise

  def close(self) -> None:
    """Stops the workers; a later `get` starts new ones."""
    with self._lock:
      self._close()

  def _close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None


@atexit.register
def _shut_down() -> None:
  _SHUT.append(True)
  for ref in reversed(_OPEN):
    if (stream := ref()) is not None:
      stream.close()


def in_order(fn: Callable[[int], dict], count: int, workers: int) -> Iterator[dict]:
  """fn(0), ..., fn(count - 1) (e.g. evaluation batches), computed ahead like training batches.

  The range is left open and cut here: grain 0.2.18's workers leave shared memory behind (reported as leaked at
  exit) when they reach the end of a finite range, not when closed. So fn must accept steps past `count`.
  """
  if not count:
    return
  it = prefetched(fn, 0, FAR, workers)
  try:
    for _ in range(count):
      yield _batch(it)
  finally:
    it.close()
