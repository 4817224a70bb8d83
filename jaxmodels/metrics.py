"""Run outputs: `metrics.jsonl` (one JSON object per line) and the terminal progress.

A progress bar (tqdm) when stderr is a terminal, plain log lines otherwise.
Values arrive here already fetched from the device: the training loop fetches
only at log intervals, so nothing in this module syncs the host per step.

Crash consistency: on a local disk each record is appended with one unbuffered
write, so a kill leaves at most one torn last line, which the next resume drops
with a warning. A GCS object cannot be appended to: on gs:// the file is kept in
memory and the whole object is rewritten at each record (an upload replaces the
object atomically, so readers see a complete file; the file is small: a record
per log interval).
"""

import json
import os
import sys

from tqdm import tqdm

from jaxmodels import storage


class MetricsLogger:
  """Appends records to `workdir/metrics.jsonl` and reports them on the terminal."""

  def __init__(self, workdir, total_steps: int, enabled: bool = True):
    """`enabled=False` (every process but 0 of a multi-process job) writes and prints nothing.

    The file opens at `start()`, once the run is accepted.
    """
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.enabled, self.total_steps = enabled, total_steps
    self._file, self._lines, self._bar, self._step = None, None, None, 0

  def start(self, initial_step: int) -> None:
    """Keeps an earlier run's records up to `initial_step` (a resume rewrites the rest), then appends."""
    if not self.enabled:
      return
    kept = self._earlier_records(initial_step)
    if storage.is_remote(self.path):
      self._lines = kept
      self.path.write_text("".join(kept))
    else:
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text("".join(kept))
      os.replace(tmp, self.path)  # a kill leaves the old file or the new one, never half of each
      self._file = open(self.path, "ab", buffering=0)  # pylint: disable=consider-using-with
    self._step = initial_step
    if sys.stderr.isatty():
      self._bar = tqdm(total=self.total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def _earlier_records(self, step: int) -> list[str]:
    """Lines of metrics.jsonl with step <= `step`; lines that are not JSON records (torn by a kill) dropped."""
    if not self.path.exists():
      return []
    kept = []
    for i, line in enumerate(self.path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        self.print(f"warning: dropped line {i} of {self.path}, a torn or damaged record: {line[:80]!r}")
        continue
      if record["step"] <= step:
        kept.append(line + "\n")
    return kept

  def write(self, record: dict) -> None:
    """One record: must hold `step` and `split`; numbers are rounded for the terminal only."""
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      self._file.write(line.encode())  # one write: a record lands whole or (killed) torn at the very end
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
  if isinstance(v, list):  # per-class values
    return "[" + " ".join(_fmt(x) for x in v) + "]"
  return str(v)
