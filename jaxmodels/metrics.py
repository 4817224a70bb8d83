"""Run outputs: `metrics.jsonl` (one JSON object per line) and the terminal progress.

A progress bar (tqdm) when stderr is a terminal, plain log lines otherwise.
Values arrive here already fetched from the device: the training loop fetches
only at log intervals, so nothing in this module syncs the host per step.
"""

import json
import os
import sys

from tqdm import tqdm


class MetricsLogger:
  """Appends records to `workdir/metrics.jsonl` and reports them on the terminal."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    """`enabled=False` (every process but 0 of a multi-process job) writes and prints nothing.

    The file opens at `start()`, after a resumed run has trimmed it.
    """
    self.workdir, self.path = workdir, os.path.join(workdir, "metrics.jsonl")
    self.enabled, self.total_steps = enabled, total_steps
    self._file, self._bar, self._step = None, None, 0

  def start(self, initial_step: int) -> None:
    if not self.enabled:
      return
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._step = initial_step
    if sys.stderr.isatty():
      self._bar = tqdm(total=self.total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, record: dict) -> None:
    """One record: must hold `step` and `split`; numbers are rounded for the terminal only."""
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("step", "split"))
    if self._bar is not None:
      self._bar.update(record["step"] - self._step)
      self._step = record["step"]
      if record["split"] == "train":
        self._bar.set_postfix_str(shown)
      else:
        self._bar.write(f"step {record['step']} {record['split']}: {shown}")
    else:
      print(f"step {record['step']} {record['split']}: {shown}", flush=True)

  def print(self, line: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._file is not None:
      self._file.close()


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
