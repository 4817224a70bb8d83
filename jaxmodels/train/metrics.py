"""Run outputs: `metrics.jsonl` (one JSON object per line), TensorBoard scalars under `tb/`, and the terminal
progress.

A progress bar (tqdm) when stderr is a terminal, plain log lines otherwise.
Values arrive here already fetched from the device: the training loop fetches
only at log intervals, so nothing in this module syncs the host per step.

Crash consistency: on a local disk each record is appended with one unbuffered
write, so a kill leaves at most one torn last line, which the next resume drops
with a warning. A GCS object cannot be appended to: on gs:// the file is kept in
memory and the whole object is rewritten at each record (an upload replaces the
object atomically, so readers see a complete file; the file is small: a record
per log interval).

TensorBoard: every number of every record is also a scalar `<split>/<name>` at its step, written by
tensorboardX's SummaryWriter (a well-kept writer of the event format, no TensorFlow needed) when tensorboardX
is installed (the `tracking` extra, `pip install 'jaxmodels[tracking]'`); without it no `tb/` is written,
silently: metrics.jsonl holds the same numbers. The writer
writes a local file; on gs:// it writes to a local temporary directory and each flush copies the event file
to `workdir/tb/` through storage. A resume purges the events after its first step (`purge_step`), as
metrics.jsonl drops its records after it.

Weights & Biases (`train.wandb_project`, the `tracking` extra; config validation refuses the key without wandb,
before the run writes anything): the config once, at the start, then every number of every record as
`<split>/<name>` against a `step` metric (W&B's own step counter only grows; a resume re-logs steps after its
checkpoint, which a `step` x-axis shows in place). The run's id is kept in `workdir/wandb/run_id`, so a resumed
run continues the same W&B run. Run files go to `workdir/wandb/` (offline mode: `wandb sync workdir/wandb/offline-run-*`
uploads them later); on a gs:// workdir W&B writes to a local temporary directory, copied to `workdir/wandb/` when
the run ends (a killed run's local files stay in the temporary directory).
"""

import json
import os
import shutil
import sys
import tempfile
import uuid

from tqdm import tqdm

from jaxmodels.runtime import extras, storage

__all__ = ["MetricsLogger", "TensorBoard", "WandB"]


def _tensorboardx():
  """tensorboardX, imported without importing torch.

  tensorboardX's writer imports torch whenever it is installed (as with the `dev` extra), only to accept torch
  tensors, which nothing here passes; that import was ~2 s of CPU per `jaxmodels train` process (2-core
  development VM). A None in sys.modules makes its `import torch` raise the ImportError it catches. Where torch
  is already imported, nothing is hidden. The writer is made on the main thread before the loop starts, when no
  other thread imports torch.
  """
  if "torch" in sys.modules:
    return extras.require("tensorboardX", "TensorBoard scalars")
  sys.modules["torch"] = None
  try:
    return extras.require("tensorboardX", "TensorBoard scalars")
  finally:
    del sys.modules["torch"]


class TensorBoard:
  """Scalars of metric records in `workdir/tb/`, readable by `tensorboard --logdir workdir/tb`."""

  def __init__(self, workdir, initial_step: int):
    writer_class = _tensorboardx().SummaryWriter
    self.target = storage.path(workdir) / "tb"
    self._local = tempfile.mkdtemp(prefix="jaxmodels-tb-") if storage.is_remote(self.target) else None
    # Flushed at each record (a record per log interval), not only on the writer's timer.
    self.writer = writer_class(self._local or os.fspath(self.target), purge_step=initial_step or None)

  def write(self, record: dict) -> None:
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])
    self.writer.flush()
    if self._local is not None:
      for name in os.listdir(self._local):
        with open(os.path.join(self._local, name), "rb") as f:
          (self.target / name).write_bytes(f.read())

  def close(self) -> None:
    self.writer.close()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)


class WandB:
  """A W&B run of the config (`train.wandb_project`, `train.wandb_mode`) that logs metric records."""

  def __init__(self, workdir, config: dict):
    wandb = extras.require("wandb", "train.wandb_project")
    self.target = storage.path(workdir) / "wandb"
    self._local = tempfile.mkdtemp(prefix="jaxmodels-wandb-") if storage.is_remote(self.target) else None
    id_file = self.target / "run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    self.target.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    train = config["train"]
    # dir: W&B writes its files to dir/wandb/
    self.run = wandb.init(project=train["wandb_project"], mode=train["wandb_mode"] or None, config=config,
                          dir=self._local or os.fspath(self.target.parent), id=run_id, resume="allow",
                          settings=wandb.Settings(silent=True, console="off"))
    self.run.define_metric("*", step_metric="step")

  def write(self, record: dict) -> None:
    numbers = {f"{record['split']}/{k}": v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
      self.run.log({**numbers, "step": record["step"]})

  def close(self) -> None:
    self.run.finish()
    if self._local is not None:
      local = os.path.join(self._local, "wandb")
      for root, _, names in os.walk(local):
        for name in names:
          source = os.path.join(root, name)
          destination = self.target / os.path.relpath(source, local)
          destination.parent.mkdir(parents=True, exist_ok=True)
          with open(source, "rb") as f:
            destination.write_bytes(f.read())
      shutil.rmtree(self._local, ignore_errors=True)


class MetricsLogger:
  """Appends records to `workdir/metrics.jsonl` and reports them on the terminal."""

  def __init__(self, workdir, total_steps: int, enabled: bool = True, config: dict | None = None):
    """`enabled=False` (every process but 0 of a multi-process job) writes and prints nothing. `config` (the
    run's, as a dict) with `train.wandb_project` set also logs to Weights & Biases.

    The file opens at `start()`, once the run is accepted.
    """
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.enabled, self.total_steps = enabled, total_steps
    self._file, self._lines, self._bar, self._step, self._tb = None, None, None, 0, None
    self.config, self._wandb = config, None

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
    if extras.installed("tensorboardX"):  # optional: skipped silently without it (module docstring)
      self._tb = TensorBoard(self.workdir, initial_step)
    if self.config and self.config["train"].get("wandb_project"):
      self._wandb = WandB(self.workdir, self.config)
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
    if self._tb is not None:
      self._tb.write(record)
    if self._wandb is not None:
      self._wandb.write(record)
    shown = (record["note"] if record["split"] == "note" else  # a note is a sentence: shown as written
             " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("step", "split")))
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
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, list):  # per-class values
    return "[" + " ".join(_fmt(x) for x in v) + "]"
  return str(v)
