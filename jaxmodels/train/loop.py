"""The command line's training: `train_and_evaluate(config, workdir)`, a user of the Trainer's loop.

The NNX model is split once into a static graph definition and pure pytrees
(parameters, other model state such as BatchNorm statistics). The train and eval
steps are `jax.jit` functions of those pytrees: no NNX graph traversal happens per
step, the train state is donated, and metrics stay on the device until a log
interval fetches them. The loop is `trainer.run_steps` and the train step
`step.make_train_step` of our tasks' loss, as a `Trainer` runs a loss of yours.
"""

import contextlib
import json
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxmodels import config as config_lib
from jaxmodels import parallel
from jaxmodels.models.moe import MOE_METRICS
from jaxmodels.optim import freezing, make_schedule_from_config, precision
from jaxmodels.runs import checkpoint
from jaxmodels.runs.state import TrainState
from jaxmodels.runtime import storage
from jaxmodels.runtime.compilation import RecompileAlarm
from jaxmodels.runtime.errors import Preempted, UserError
from jaxmodels.tasks import train_metric_names
from jaxmodels.train import actions as actions_lib
from jaxmodels.train.actions import Run, scalars
from jaxmodels.train.experiment import Experiment, build_experiment
from jaxmodels.train.metrics import MetricsLogger
from jaxmodels.train.step import metric_names
from jaxmodels.train.trainer import Signals, run_steps

__all__ = ["schedule_change", "SCHEDULE_KEYS", "train_and_evaluate", "train_loop"]


def train_loop(exp: Experiment, state: TrainState, start: int, logger: MetricsLogger, ckpts,
               resumed: dict | None = None) -> Run:
  """Steps `start`..`train.steps` of the experiment's train step (the Trainer's loop, `trainer.run_steps`), each
  followed by the actions due (jaxmodels.train.actions); returns the Run (its `state`, last `eval_metrics` or {},
  and `stop`, why it stopped early, or "").

  Metrics stay on the device until a log interval or a save fetches them; the
  loop may move data only explicitly. A non-finite loss stops the run before any
  save of that state; a signal ends it after the current step (with several
  processes, after a step all agree on) with a synchronous save. Each checkpoint
  also keeps the metric rows not yet logged and the early-stopping record
  (`resumed`, Checkpoints.loop_state), so a resumed run's log intervals average
  the same steps as an uninterrupted run's, and an early-stopped run stays stopped.
  """
  t = exp.config.train
  run = Run(state, start, t.steps, logger, ckpts, RecompileAlarm(fail=t.fail_on_recompile, log=logger.print),
            metric_names=_step_metric_names(exp), skip_nonfinite=t.skip_nonfinite,
            for_checkpoint=exp.layout.for_checkpoint, rows=list((resumed or {}).get("unlogged_metrics") or []))
  signals = Signals()
  return run_steps(run, exp.train_step, exp.batch, actions_lib.default_actions(exp, start, logger, signals, resumed),
                   signals)


def _step_metric_names(exp: Experiment) -> tuple[str, ...]:
  """The train step's metric names: the task's, and a mixture-of-experts model's MOE_METRICS."""
  names = train_metric_names(exp.dataset.task)
  if not getattr(exp.config.model, "num_experts", 0):
    return names
  return metric_names((*names[:2], *MOE_METRICS))


def _restore(exp: Experiment, ckpts, log):
  """(state, start step, the loop's saved state (Checkpoints.loop_state) or {}, saved config or None): the
  workdir's newest readable
  checkpoint, else checkpoint.restore_from (a run, or the parameters of an export or `import-hf` directory),
  else a fresh start.

  Arrays are read straight into `exp.checkpoint_state`'s shardings; a fresh
  state is built only when nothing is restored, so a resume never holds two.
  """
  c = exp.config.checkpoint
  step, restored = ckpts.resume_newest(lambda _trees: exp.checkpoint_state, exp.config.to_dict(), log=log)
  if step is not None:
    restored = _complete(exp, restored, log)
    return exp.layout.from_checkpoint(restored), step, ckpts.loop_state(step), ckpts.metadata(step)[0]
  if c.restore_from:
    if c.restore_mode not in ("params", "full"):
      raise UserError(f"checkpoint.restore_mode={c.restore_mode!r}: expected params or full")
    like, adapters = _restore_target(exp)
    if checkpoint.is_export(c.restore_from):  # `jaxmodels export` or `import-hf`: parameters alone
      if c.restore_mode != "params":
        raise UserError(f"checkpoint.restore_from={c.restore_from!r} is an export (parameters only): "
                        f"use checkpoint.restore_mode=params")
      restored = checkpoint.restore_export(c.restore_from, like, exp.config.to_dict())
      where = c.restore_from
    else:
      directory, step = checkpoint.resolve_restore_from(c.restore_from)
      source = checkpoint.Checkpoints(directory)
      try:
        checkpoint.refuse_adapters(c.restore_from, source.metadata(step)[0])
        restored = source.restore(step, like, params_only=c.restore_mode == "params")
      finally:
        source.close()
      where = f"{directory}/{step}"
    if adapters is not None:
      restored = restored.replace(params=freezing.merge_trainable(adapters(), restored.params))
    if c.restore_mode == "params":  # a new optimizer state (and step 0) for the restored parameters
      sh = jax.tree.map(lambda x: x.sharding, exp.checkpoint_state)
      step0, opt_state = jax.jit(lambda p: (jnp.zeros((), jnp.int32), exp.tx.init(p)),
                                 out_shardings=(sh.step, sh.opt_state))(restored.params)
      # and a fresh EMA (from the restored parameters) and loss scale
      restored = restored.replace(step=step0, opt_state=opt_state, ema_params=exp.checkpoint_state.ema_params,
                                  loss_scale=exp.checkpoint_state.loss_scale)
    restored = _complete(exp, restored, log if c.restore_mode == "full" else lambda _line: None)
    log(f"started from {where} ({c.restore_mode})")
    return exp.layout.from_checkpoint(restored), int(parallel.fetch(restored.step)), {}, None
  return exp.init_state(), 0, {}, None


def _restore_target(exp: Experiment):
  """(the state checkpoint.restore_from fills, None or a function giving fresh LoRA adapters): a LoRA run
  (train.lora.rank) reads the base model's parameters alone (a run or export without adapters; restore_mode=params)
  and adds fresh adapters, made without a whole fresh state (XLA drops the rest of `init_state`'s work)."""
  if not exp.config.train.lora.rank:
    return exp.checkpoint_state, None
  if exp.config.checkpoint.restore_mode != "params":
    raise UserError(f"checkpoint.restore_mode={exp.config.checkpoint.restore_mode} with train.lora.rank="
                    f"{exp.config.train.lora.rank}: a LoRA run starts from the base model's parameters alone "
                    f"(restore_mode=params)")
  adapters, base = freezing.split_trainable(exp.checkpoint_state.params, freezing.is_adapter)
  sh = jax.tree.map(lambda x: x.sharding, adapters)
  pmap = isinstance(exp.layout, parallel.PmapLayout)  # whose fresh state holds a copy per device, stacked

  def fresh_adapters():
    made = freezing.split_trainable(exp.init_state().params, freezing.is_adapter)[0]
    return jax.tree.map(lambda x: x[0], made) if pmap else made  # in the checkpoint's layout: one copy

  fresh = jax.jit(fresh_adapters, out_shardings=sh)
  return exp.checkpoint_state.replace(params=base, ema_params=None), fresh


def _complete(exp: Experiment, state: TrainState, log) -> TrainState:
  """`state` with the optional parts its checkpoint lacked (left abstract by Checkpoints.restore) made fresh:
  the EMA from the restored parameters (train.ema_decay turned on), the initial loss scale (float16 turned on)."""
  sh = jax.tree.map(lambda x: x.sharding, exp.checkpoint_state)
  abstract = lambda tree: any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
  if abstract(state.ema_params):
    log("note: the checkpoint holds no parameter EMA: the EMA (train.ema_decay) starts from its parameters")
    state = state.replace(ema_params=jax.jit(precision.ema_init, out_shardings=sh.ema_params)(state.params))
  if abstract(state.loss_scale):
    state = state.replace(loss_scale=jax.jit(precision.initial_loss_scale, out_shardings=sh.loss_scale)())
  return state


SCHEDULE_KEYS = ("train.steps", "train.learning_rate", "train.schedule", "train.warmup_steps",
                 "train.end_lr_fraction")


def schedule_change(exp: Experiment, saved_config: dict | None, start: int) -> str | None:
  """A one-line note when the saved run's learning-rate schedule differs from this one's over steps start.., else None.

  E.g. a longer train.steps restarts the cosine decay from a higher rate.
  """
  t = exp.config.train
  if saved_config is None or start >= t.steps:
    return None
  saved = config_lib.default_config().train
  saved.update({k: v for k, v in saved_config.get("train", {}).items() if f"train.{k}" in SCHEDULE_KEYS})
  steps = jnp.arange(start, t.steps)
  old = np.asarray(jax.jit(jax.vmap(make_schedule_from_config(saved)))(steps))
  new = np.asarray(jax.jit(jax.vmap(exp.schedule))(steps))
  if np.allclose(old, new, rtol=1e-6, atol=1e-12):
    return None
  keys = "; ".join(checkpoint.config_differences(saved_config, exp.config.to_dict(), SCHEDULE_KEYS, ()))
  return (f"resuming at step {start} with a changed learning-rate schedule ({keys}): the rate at step {start} "
          f"is {new[0]:.4g} (the saved run's schedule gives {old[0]:.4g})")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` into `workdir` (a local path or gs://bucket/dir) and returns the final eval metrics
  (the floats; see Experiment.evaluate).

  Writes `config.json` (`checkpoint.restore_from` made absolute there and in `config`), `model.json`,
  `metrics.jsonl`, `confusion_<step>.json` (classifiers) and `checkpoints/`. A workdir that already holds a
  checkpoint resumes from its newest readable one. Holds `workdir/LOCK` while it runs. Raises `UserError` for a
  bad workdir, config or data, a workdir in use by another run, or a checkpoint this config
  cannot resume, all before anything is written; `NonFiniteLoss` if the loss
  diverges, and `Preempted` after a signal's save. Early stopping
  (`train.early_stopping`) returns normally, before `train.steps`.
  """
  lead = jax.process_index() == 0  # only process 0 writes files and logs; every process saves checkpoints
  log = print if lead else lambda _line: None
  storage.check_workdir(workdir)
  if config.checkpoint.restore_from:  # saved absolute (gs:// as given): export-hf finds an import's tokenizer by it
    config.checkpoint.restore_from = str(storage.path(config.checkpoint.restore_from))
  exp = build_experiment(config)  # every config and data error surfaces here
  checkpoint.retention_policy(config.checkpoint)
  d = exp.dataset
  files = {"config.json": config_lib.to_json(config), **d.files(),
           "model.json": json.dumps({"input_shape": list(d.input_shape), "num_outputs": d.num_outputs,
                                     "task": d.task})}
  lock = storage.WorkdirLock(workdir, log)
  ckpts = None
  with _stop_on_signals_until_the_loop(log):  # SIGTERM before the loop: release the lock, exit 75
    try:
      _agree(lock.acquire if lead else None)
      reader = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
      try:
        state, start, resumed, saved_config = _restore(exp, ckpts=reader, log=log)
      finally:
        reader.close()
      if start > config.train.steps:
        raise UserError(f"--workdir {workdir} holds a checkpoint at step {start}, past train.steps="
                        f"{config.train.steps}: set train.steps to at least {start}, or use a new --workdir")
      # Accepted: from here on the run writes.
      note = schedule_change(exp, saved_config, start)
      if lead:
        storage.write_files(workdir, files)  # all or none: a failed write leaves the workdir's files as they were
      ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir), config.checkpoint)
      logger = MetricsLogger(workdir, config.train.steps, enabled=lead, config=config.to_dict())
      logger.start(start)
      for notice in exp.notices:
        logger.print(f"note: {notice}")
      if note:
        logger.write({"step": start, "split": "note", "note": note})
      logger.print(f"{d.describe()}; training steps {start}..{config.train.steps} into {workdir}")
      if jax.process_count() > 1 and isinstance(exp.layout, parallel.Layout):
        logger.print(exp.layout.describe())  # which mesh axes cross processes
      t0 = time.perf_counter()
      run = train_loop(exp, state, start, logger, ckpts, resumed)
      train_s = time.perf_counter() - t0
      eval_metrics = scalars(run.eval_metrics or exp.evaluate(run.state))  # resumed at the end: evaluate, report
    finally:
      try:
        if ckpts is not None:
          ckpts.close()  # waits for the last async save; a failed save raises here
      finally:
        lock.release()
  summary = " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items())
  stopped = ""
  if run.stop:  # early stopping: the best checkpoint is kept (checkpoint.keep_best) and named
    es = run.early_stopping
    stopped = (f"; {run.stop}; best checkpoint {checkpoint.checkpoint_dir(workdir)}/{es['best_step']} "
               f"({es['metric']}={es['best']:.4f})")
  logger.print(f"final: step {run.done} test {summary} (training {train_s:.1f} s){stopped}")
  logger.close()
  return eval_metrics


@contextlib.contextmanager
def _stop_on_signals_until_the_loop(log):
  """SIGTERM/SIGINT before the loop takes signals over (`_Signals`) end the run at once, through `Preempted`.

  Raised in the main thread, it passes through the run's `finally` blocks, so the
  workdir lock is released, and the CLI exits 75 (nothing was trained since the
  newest checkpoint; rerunning resumes it). One process only: in a multi-process
  job JAX's preemption service owns SIGTERM.
  """
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield
    return

  def handle(signum, _frame):
    log(f"signal {signum} before training started: stopped; rerun the same command to start or resume")
    raise Preempted(0)

  previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _agree(lead_action) -> None:
  """Runs `lead_action` on process 0 (None elsewhere); every process raises if it failed, so none waits alone."""
  error = None
  if lead_action is not None:
    try:
      lead_action()
    except UserError as e:
      error = e
  if jax.process_count() > 1 and int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):
    raise error or UserError("process 0 could not start the run (see its message)")
  if error is not None:
    raise error
