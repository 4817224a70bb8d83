"""The periodic work of the training loop, as small objects the loop runs after each step.

Each action has an `every` (steps between runs; 0: not on a step schedule) and
one method, `__call__(run)`, run when `due(run)`: by default every `every`
steps and at the last step. `begin(run)` and `end(run)` run once around the
loop. The loop (`trainer.run_steps`) keeps their order: train metrics are logged,
then the model is evaluated, then the stop conditions are read, then the state
is saved, so a save holds the step's eval metrics and happens before a stop.

`Run` is what the actions share: the train state, the step count, the metric
rows not yet logged, the last evaluation, and why the run stops (if it does).
Nothing here syncs the host per step: metrics are fetched only by the actions
that log or save, at their intervals, under the loop's transfer guard. A log
interval's metrics are copied to the host asynchronously and its record is
written one interval later (or at the next save, evaluation or the end), so the
device queue does not drain at a log step.
"""

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import parallel
from jaxmodels.models import flops
from jaxmodels.optim import pruning
from jaxmodels.runtime.compilation import RecompileAlarm, libtpu_problem
from jaxmodels.runtime.errors import NonFiniteLoss, Preempted, UserError
from jaxmodels.tasks import train_metric_names

__all__ = ["Action", "default_actions", "EarlyStop", "Evaluate", "Hook", "LogTrain", "Preempt", "Profile", "Run",
           "Save", "scalars", "summarize", "TRAIN_METRICS", "WatchSignals"]

# The train step returns its metrics stacked in one float32 vector in this order (regression: mae for accuracy):
# each output array costs dispatch time on every step, the stack costs one.
TRAIN_METRICS = train_metric_names("classify")


def summarize(rows: np.ndarray, names: tuple[str, ...] = TRAIN_METRICS) -> dict[str, float]:
  """Per-name means of metric rows (one per step) over their finite values; skipped steps are counted.

  A skipped step's non-finite loss or gradient norm is left out of its mean; the finite loss of a float16 step
  skipped for an overflowed gradient is kept. A name without a finite value is NaN.
  """
  finite = np.isfinite(rows)
  counts = finite.sum(axis=0)
  means = np.where(counts > 0, np.where(finite, rows, 0).sum(axis=0) / np.maximum(counts, 1), np.nan)
  out = {name: float(v) for name, v in zip(names, means)}
  skipped = int(rows[:, names.index("skipped")].sum())
  if skipped:
    out["skipped"] = skipped
  else:
    del out["skipped"]
  return out


def scalars(metrics: dict) -> dict[str, float]:
  """The float metrics of an evaluation (no per-class lists, no confusion matrix)."""
  return {k: v for k, v in metrics.items() if isinstance(v, float)}


@dataclasses.dataclass
class Run:
  """The loop's shared state: what one step leaves for the actions due after it."""

  state: Any  # train.TrainState after `done` steps
  done: int  # optimizer steps taken
  last: int  # the step the run ends at (train.steps)
  logger: Any  # metrics.MetricsLogger
  ckpts: Any  # checkpoint.Checkpoints, or None (nothing is saved)
  alarm: RecompileAlarm
  metric_names: tuple[str, ...] = TRAIN_METRICS  # of the train step's metric vector (step.metric_names)
  skip_nonfinite: bool = False  # a non-finite loss is a skipped step (train.skip_nonfinite), not the end
  # What NonFiniteLoss advises (the Trainer's names its arguments, not the config's keys).
  nonfinite_advice: str = "Lower train.learning_rate, set train.grad_clip, or set train.skip_nonfinite=true"
  for_checkpoint: Any = lambda state: state  # the state as saved (the layout's for_checkpoint)
  pending: list = dataclasses.field(default_factory=list)  # metric vectors still on the device
  rows: list = dataclasses.field(default_factory=list)  # host metric rows since the last log line
  compile_seconds: dict = dataclasses.field(default_factory=dict)  # the last step's trace/lower/compile times
  eval_metrics: dict = dataclasses.field(default_factory=dict)  # the newest evaluation
  eval_step: int = -1  # the step `eval_metrics` was computed at
  stop: str = ""  # why the run stops after this step: "" (it does not), a signal, or early stopping
  preempted: bool = False  # the stop is a signal's or a preemption notice's: the process exits to be rerun
  early_stopping: dict | None = None  # EarlyStop's record, saved in each checkpoint
  deferred: tuple | None = None  # LogTrain's (write(rows), last step, device metric vectors being copied)

  def write_deferred(self) -> None:
    """Reads the metric vectors LogTrain left copying to the host (blocking until their steps are done) and
    hands their rows to its writer; raises NonFiniteLoss as `fetch` does."""
    if self.deferred is None:
      return
    write, last_step, copies = self.deferred
    self.deferred = None
    write(self._checked(np.asarray(jax.device_get(copies)), last_step).tolist() if copies else [])

  def fetch(self) -> None:
    """Writes a deferred log record, then fetches pending metrics (one host sync); raises NonFiniteLoss on a
    non-finite loss unless skipping."""
    self.write_deferred()
    if not self.pending:
      return
    self.rows.extend(self._checked(np.stack(parallel.fetch(self.pending)), self.done).tolist())
    self.pending.clear()

  def _checked(self, rows: np.ndarray, last_step: int) -> np.ndarray:
    """`rows` (of steps ..last_step), or NonFiniteLoss naming the first step whose loss is not finite."""
    losses = rows[:, 0]
    if not self.skip_nonfinite and not np.all(np.isfinite(losses)):
      bad = last_step - len(rows) + 1 + int(np.argmax(~np.isfinite(losses)))
      newest = None if self.ckpts is None else self.ckpts.latest_step()
      kept = "no checkpoint was saved yet" if newest is None else f"the newest checkpoint is step {newest}"
      raise NonFiniteLoss(f"loss is {losses[~np.isfinite(losses)][0]} at step {bad}; stopped without saving "
                          f"that state ({kept}). {self.nonfinite_advice}")
    return rows


class Action:
  """Work run after a step when `due`: every `every` steps (0: never on a schedule) and at the last step."""

  every = 0

  def due(self, run: Run) -> bool:
    return bool(self.every and run.done % self.every == 0) or run.done == run.last

  def begin(self, run: Run) -> None:
    """Once, before the first step."""

  def __call__(self, run: Run) -> None:
    raise NotImplementedError

  def end(self, run: Run) -> None:
    """Once, after the last step (not after an exception)."""


def _scalar(x: jax.Array) -> float:
  return float(np.ravel(jax.device_get(x))[0])


class LogTrain(Action):
  """Averages the train metrics of each interval and writes them with throughput and MFU.

  The first step of a process includes compilation: it is logged on its own with
  its compile times (a fresh run) or printed (a resumed run, which logs on the
  uninterrupted run's schedule instead: its first step only if that schedule
  logs it), and throughput is timed from its end.
  Later intervals start their metrics' copies to the host and leave the record
  to `Run.write_deferred`, called at the next log step, save, evaluation or the
  end: the host does not wait for the device at a log step, and stays at most
  one interval ahead of it. An interval is timed from the moment the previous
  interval's metrics were read on the host to the moment its own were: when
  the device is the bottleneck that read waits for the interval's last step, so
  the time is the device's; when the host is, the host's.

  MFU divides by `peak_flops`, or on a device without a listed peak (a CPU) by
  the highest of the matmul peaks measured during the run as `bench step` does
  (`flops.matmul_flops`): `FIRST_PEAKS` after the first step, one after every `PEAK_EVERY`-th
  interval, with the device idle and outside the timed intervals. One peak
  measured once at the start made a digits LSTM run log MFU above 1 when the
  machine's speed changed; the median of the samples still let an interval
  of a small model beat the peak while other jobs slowed the large matmul more.
  """

  PEAK_EVERY = 5  # log intervals between peak samples (each a drained queue and a ~0.1 s matmul)
  FIRST_PEAKS = 3  # samples after the first step

  def __init__(self, every: int, learning_rates: np.ndarray | None, start: int, peak_flops: float | None,
               batch_size: int, model_flops: float | None = None, tokens_per_example: int | None = None):
    """`learning_rates`: every step's rate (None: not logged); `batch_size`: examples per step; `model_flops`:
    the analytic FLOPs of one step (None: no MFU); `tokens_per_example`: for `tokens_per_sec` (None: not logged)."""
    self.every, self.learning_rates, self.start, self.peak_flops = every, learning_rates, start, peak_flops
    self.batch_size, self.model_flops, self.tokens_per_example = batch_size, model_flops, tokens_per_example
    self.t0 = self.ready = None  # ready: when the metrics of the last written interval were on the host
    self.interval_step = start  # the step the next interval starts after
    self.intervals, self.peaks = 0, []

  def begin(self, run: Run) -> None:
    self.t0 = time.perf_counter()

  def due(self, run: Run) -> bool:
    return self.ready is None or super().due(run)

  def __call__(self, run: Run) -> None:
    record = {"step": run.done, "split": "train"}
    if self.learning_rates is not None:
      record["learning_rate"] = float(self.learning_rates[run.done - 1])
    if self.ready is None:
      run.fetch()
      first_step_s = time.perf_counter() - self.t0
      record.update(summarize(np.asarray(run.rows), run.metric_names))
      record.update({k: _scalar(v) for k, v in self._state_scalars(run).items()})
      compile_record = {k: round(v, 4) for k, v in run.compile_seconds.items()}
      if self.start == 0:
        run.logger.write({**record, "first_step_s": first_step_s, **compile_record})
        run.rows.clear()
      else:
        run.logger.print(f"first step after resuming took {first_step_s:.2f} s ({compile_record})")
        if super().due(run):  # a step the uninterrupted run logs: its record, of the same rows
          run.logger.write(record)
          run.rows.clear()
      for _ in range(self.FIRST_PEAKS):
        self._sample_peak()
      self.ready, self.interval_step = time.perf_counter(), run.done
      return
    self.intervals += 1
    run.write_deferred()  # the previous interval's: its copies were started one interval ago
    copies = [x.addressable_data(0) for x in run.pending]  # one device's copy of each (replicated) vector
    scalars = self._state_scalars(run)
    for x in [*copies, *scalars.values()]:
      x.copy_to_host_async()
    rows = list(run.rows)  # this interval's rows fetched by a save
    run.deferred = (lambda fetched: self._write(run, record, rows + fetched, scalars), run.done, copies)
    run.rows.clear()
    run.pending.clear()
    if self.peak_flops is None and self.model_flops is not None and self.intervals % self.PEAK_EVERY == 0:
      run.write_deferred()  # waits for the interval's steps: the matmul then runs on an idle device, untimed
      self._sample_peak()
      self.ready = time.perf_counter()

  def _write(self, run: Run, record: dict, rows: list, scalars: dict) -> None:
    """Writes an interval's record (`scalars`: `_state_scalars` at its last step), timed from the previous
    interval's metrics being ready to this one's."""
    now = time.perf_counter()
    elapsed, timed = now - self.ready, record["step"] - self.interval_step
    self.ready, self.interval_step = now, record["step"]
    record.update(summarize(np.asarray(rows), run.metric_names))
    record.update({k: _scalar(v) for k, v in scalars.items()})
    record.update(step_time_ms=1000 * elapsed / timed, examples_per_sec=timed * self.batch_size / elapsed)
    if self.model_flops is not None:
      record["mfu"] = self.model_flops * timed / elapsed / (self.peak_flops or max(self.peaks))
    if self.tokens_per_example is not None:
      record["tokens_per_sec"] = record["examples_per_sec"] * self.tokens_per_example
    run.logger.write(record)

  @staticmethod
  def _state_scalars(run: Run) -> dict:
    """{name: one device's copy} of the state's scalars after this step: `sparsity` (train.pruning: the share of
    zero prunable weights) and `loss_scale` (float16). Copied on the device, as the next step donates the state."""
    arrays = {"sparsity": pruning.sparsity_of(run.state.opt_state),
              "loss_scale": None if run.state.loss_scale is None else run.state.loss_scale.scale}
    return {k: jnp.copy(v.addressable_data(0)) for k, v in arrays.items() if v is not None}

  def _sample_peak(self) -> None:
    if self.peak_flops is None and self.model_flops is not None:
      self.peaks.append(flops.matmul_flops())

  def end(self, run: Run) -> None:
    run.write_deferred()


class Evaluate(Action):
  """Metrics over the whole eval split, written as an `eval` record and kept in `run.eval_metrics`; a
  classifier's confusion matrix goes to `confusion_<step>.json` (with its classes' scores) instead."""

  def __init__(self, every: int, evaluate):
    """`evaluate(state, alarm, step)` -> metrics (train.Experiment.evaluate)."""
    self.every, self.evaluate = every, evaluate

  def __call__(self, run: Run) -> None:
    run.write_deferred()  # the train record of this step first
    metrics = self.evaluate(run.state, run.alarm, run.done)
    confusion = metrics.pop("confusion", None)
    run.eval_metrics, run.eval_step = metrics, run.done
    run.logger.write({"step": run.done, "split": "eval", **metrics})
    if confusion is not None and run.logger.enabled:
      per_class = {k: v for k, v in metrics.items() if k.endswith("_per_class")}
      (run.logger.workdir / f"confusion_{run.done}.json").write_text(
          json.dumps({"step": run.done, "confusion": confusion, **per_class}))


class WatchSignals(Action):
  """Every step: whether a signal or preemption notice stops the run after it (`train._Signals`)."""

  every = 1

  def __init__(self, signals):
    self.signals = signals

  def due(self, run: Run) -> bool:
    return True

  def __call__(self, run: Run) -> None:
    if self.signals.stop_after(run.done):  # with several processes: once per step on each, a sync point
      run.stop = f"signal {self.signals.received}" if self.signals.received else "preemption notice"
      run.preempted = True


class EarlyStop(Action):
  """After an evaluation: stops the run when `metric` has not improved on its best by more than `min_delta`
  for `patience` evaluations in a row (`train.early_stopping`).

  Its record (best value and step, evaluations since, why it stopped) goes into every
  checkpoint, so a resumed run continues the count, and one that had stopped takes no
  further step. The step of each new best is saved (Save), and checkpoint.keep_best keeps it.
  """

  def __init__(self, metric: str, mode: str, patience: int, min_delta: float, resumed: dict | None):
    self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
    self.resumed = resumed

  def begin(self, run: Run) -> None:
    run.early_stopping = self.resumed or {"metric": self.metric, "best": None, "best_step": None,
                                          "evals_since_best": 0, "stopped": ""}
    run.stop = run.early_stopping["stopped"]  # a run restored after stopping early takes no step

  def due(self, run: Run) -> bool:
    return run.eval_step == run.done

  def __call__(self, run: Run) -> None:
    record, value = run.early_stopping, run.eval_metrics[self.metric]
    best = record["best"]
    sign = 1 if self.mode == "max" else -1
    if best is None or sign * (value - best) > self.min_delta:
      record.update(best=value, best_step=run.done, evals_since_best=0)
      return
    record["evals_since_best"] += 1
    if record["evals_since_best"] >= self.patience:
      record["stopped"] = run.stop = (
          f"early stopping: eval {self.metric} has not improved on {best:.6g} (step {record['best_step']}) by more "
          f"than {self.min_delta:g} in {self.patience} evaluations")
      run.logger.write({"step": run.done, "split": "stop", "reason": run.stop})


class Save(Action):
  """An async checkpoint with the unlogged metric rows (and this step's eval metrics, for keep_best).

  Also due when the run stops (then synchronous, so the process may exit right after) and at early stopping's
  new best.
  """

  def __init__(self, every: int, config_dict: dict):
    self.every, self.config_dict = every, config_dict

  def due(self, run: Run) -> bool:
    best = run.early_stopping is not None and run.early_stopping["best_step"] == run.done
    return super().due(run) or bool(run.stop) or best

  def __call__(self, run: Run) -> None:
    run.fetch()
    run.ckpts.save(run.done, run.for_checkpoint(run.state), self.config_dict, unlogged=run.rows,
                   metrics=scalars(run.eval_metrics) if run.eval_step == run.done else None, wait=bool(run.stop),
                   early_stopping=run.early_stopping)


class Preempt(Action):
  """After a signal's save: says so (on every process: each saved this step) and raises Preempted."""

  def due(self, run: Run) -> bool:
    return run.preempted

  def __call__(self, run: Run) -> None:
    message = f"{run.stop}: saved step {run.done}; rerun the same command to resume"
    if run.logger.enabled:
      run.logger.print(message)
    else:
      print(message, flush=True)
    raise Preempted(run.done)


class Profile(Action):
  """A jax.profiler trace of steps [first, last) of `train.profile_steps`, written to `directory`."""

  def __init__(self, steps, directory: str, log):
    if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
      raise UserError(f"train.profile_steps={tuple(steps)}: expected (first, last) with 0 <= first < last")
    if steps and (problem := libtpu_problem()):
      raise UserError(f"train.profile_steps: {problem} (a mismatched libtpu crashes jax.profiler)")
    self.steps, self.directory, self.log, self.active = tuple(steps), directory, log, False

  def due(self, run: Run) -> bool:
    return bool(self.steps) and run.done in self.steps

  def begin(self, run: Run) -> None:
    if self.steps and run.done == self.steps[0]:
      self._start(run.state)

  def __call__(self, run: Run) -> None:
    if run.done == self.steps[0]:
      self._start(run.state)
    else:
      self.end(run)

  def _start(self, state) -> None:
    jax.block_until_ready(state)
    jax.profiler.start_trace(self.directory)
    self.active = True

  def end(self, run: Run) -> None:
    if self.active:
      jax.block_until_ready(run.state)
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.steps[0]}..{self.steps[1]} written to {self.directory} "
               f"(tensorboard --logdir {self.directory}, or ui.perfetto.dev)")


class Hook(Action):
  """A function of the caller's, `fn(step, state)`, run after every step that is a multiple of `every`
  (`Trainer.add_hook`): `step` the optimizer steps taken, `state` the TrainState after them (its arrays are
  donated to the next step: copy what you keep). Transfers to and from the host are allowed inside it."""

  def __init__(self, fn, every: int):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"a hook's every={every!r}: expected a positive number of steps")
    self.fn, self.every = fn, every

  def due(self, run: Run) -> bool:
    return run.done % self.every == 0

  def __call__(self, run: Run) -> None:
    with jax.transfer_guard("allow"):
      self.fn(run.done, run.state)


def default_actions(exp, start: int, logger, signals, resumed: dict | None = None) -> list[Action]:
  """The loop's actions in the order they run after a step; `resumed`: the checkpoint's loop state, if any."""
  t, es = exp.config.train, exp.config.train.early_stopping
  # Every step's learning rate, computed once here (schedules are jnp functions), before the transfer guard.
  learning_rates = np.asarray(jax.jit(jax.vmap(exp.schedule))(jax.numpy.arange(t.steps)))
  return [
      Profile(t.profile_steps, os.fspath(logger.workdir / "profile"), logger.print),
      LogTrain(t.log_every, learning_rates, start,
               flops.peak_flops(exp.layout.device_count)[0] if flops.datasheet_peak() else None,
               t.batch_size, exp.model_flops, exp.config.data.seq_len if exp.dataset.task == "lm" else None),
      Evaluate(t.eval_every, exp.evaluate),
      WatchSignals(signals),
      *([EarlyStop(es.metric, es.mode, es.patience, es.min_delta, (resumed or {}).get("early_stopping"))]
        if es.metric else []),
      Save(exp.config.checkpoint.every, exp.config.to_dict()),
      Preempt(),
  ]
