"""`Trainer`: your own module, optimizer, loss and batches through the loop the command line runs.

One loop (`run_steps`) and one train-step builder (`jaxmodels.train.step.make_train_step`) serve both: `jaxmodels
train` is `run_steps` over `make_train_step` of our tasks' loss with its own actions (evaluation, early stopping,
profiling), and a `Trainer` is `run_steps` over `make_train_step` of your loss with yours (`add_hook`). Both
compile the step with `jit_train_step`: the state sharded by the logical-axis rules over the mesh and donated,
batches split over `data` x `fsdp`, activations pinned by `parallel.activation_rules`.
"""

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxmodels import config as config_lib
from jaxmodels import parallel
from jaxmodels.optim import freezing
from jaxmodels.runs import checkpoint
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.compilation import CompileTimer, RecompileAlarm
from jaxmodels.train import actions as actions_lib
from jaxmodels.train.actions import Run
from jaxmodels.train.metrics import MetricsLogger
from jaxmodels.train.step import StepOptions, make_train_step, metric_names, objective

__all__ = ["jit_train_step", "run_steps", "Signals", "Trainer"]


class Signals:
  """SIGTERM/SIGINT ask the loop to stop after a step; `stop_after(step)` says whether this is that step.

  One process: the step the signal arrived in; a second signal exits at once.
  Several processes (jax.distributed with its preemption service): a signal on
  any one of them stops all of them after the same step, so every process
  saves that step and none enters a collective the others never reach. JAX's
  coordination service owns SIGTERM there (its C++ handler tells every process
  of the notice); SIGINT is turned into a SIGTERM to this process.
  `reached_preemption_sync_point` must be called once per step on every process;
  it reads a flag set in the background, so the hot path holds no host sync.
  """

  def __init__(self):
    self.received = None
    self._previous = {}
    self._synced = (jax.process_count() > 1 and jax.distributed.is_initialized()
                    and jax.config.jax_enable_preemption_service)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, _frame):
    if self.received is not None:
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.received = signum
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells the other processes

  def stop_after(self, step: int) -> bool:
    """Whether the loop stops after `step`; with several processes, call it once per step on each."""
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_steps(run: Run, train_step, batch, actions: list, signals: Signals) -> Run:
  """The training loop: steps `run.done`..`run.last` of `train_step(state, batch(step)) -> (state, metrics
  vector)`, each followed by the `actions` due (jaxmodels.train.actions), in order; returns `run` (its `state`,
  `done`, and `stop`, why it stopped early, or "").

  Metrics stay on the device until a log interval or a save fetches them. The
  loop may move data only explicitly (device_put / device_get): an implicit
  transfer, a hidden per-step host sync, is an error rather than a slowdown.
  A non-finite loss stops the run (NonFiniteLoss, from the action that fetches it)
  before any save of that state; a signal (`signals`, watched by actions.WatchSignals)
  ends it after the current step. `run.alarm` watches the step for recompiles.
  """
  with jax.transfer_guard("disallow"), signals:
    for action in actions:
      action.begin(run)
    for step in range(run.done, run.last):
      if run.stop:  # stopped early (or restored so)
        break
      inputs = {"state": run.state, "batch": batch(step)}  # donated, but their shapes and shardings stay readable
      with CompileTimer() as compile_time:
        run.state, metrics = train_step(run.state, inputs["batch"])
      run.alarm.check("train_step", train_step, inputs, step + 1, compile_time)
      run.pending.append(metrics)
      run.done, run.compile_seconds = step + 1, compile_time.seconds
      for action in actions:
        if action.due(run):
          action(run)
    for action in actions:
      action.end(run)
  return run


def jit_train_step(train_fn, layout: parallel.Layout, state_shardings, activation_rules=(), extra_shardings=()):
  """`train_fn(state, batch, *extra)` compiled over `layout`'s mesh: the state in `state_shardings` and donated,
  the batch split over data x fsdp, `extra` arguments in `extra_shardings`, the metric vector replicated; traced
  with the activations pinned by `activation_rules` (parallel.activation_sharding)."""
  pinned = parallel.activation_sharding(layout.mesh, activation_rules)
  return jax.jit(pinned(train_fn), in_shardings=(state_shardings, layout.batch_sharding, *extra_shardings),
                 out_shardings=(state_shardings, layout.replicated), donate_argnums=0)


class Trainer:
  """Your module, optax transformation, loss and batches through the command line's compiled, sharded, donated,
  checkpointed, resumable and logged loop.

  >>> trainer = Trainer(model, optax.adam(1e-3), loss_fn, batch_fn, mesh=parallel.make_mesh(strategy="fsdp"),
  ...                   workdir="/tmp/run")
  >>> trainer.add_hook(lambda step, state: print(step), every=5)
  >>> state = trainer.fit(steps=10)

  Arguments:
    model: the `nnx.Module` to train, with its initial parameters (in any dtype). It is split once into a graph
      definition and pure pytrees (runs.state.split_model); each compiled step merges them back for `loss_fn`.
      `nnx.Param` variables are trained; other variables (BatchNorm statistics) are carried as model state.
    tx: an `optax.GradientTransformation`; it receives the mean gradient over the whole batch (see `loss_fn`).
    loss_fn: `loss_fn(model, batch, rng) -> (loss_sum, metrics)`, traced inside the compiled step. `batch` is
      the dict `batch_fn` gives, as device arrays (under `grad_accum_steps` = k, a 1/k micro-batch of it);
      `rng` a PRNG key that is a pure function of (seed, step) (fold it in for dropout: `nnx.Rngs(dropout=rng)`).
      `loss_sum`: a float32 scalar, the SUM of the loss over the batch's examples (or tokens); `metrics`: a dict
      of float32 scalar sums over the same examples, which must hold `count`, the number of examples (or
      tokens) summed over. The step differentiates the sum, adds sums over micro-batches and devices, and
      divides once by the global count: the optimizer gets the per-count mean gradient of the global batch,
      exactly, however it is split. Logged: `loss` (loss_sum / count), each other metric sum / count, the
      gradient norm and `skipped`. Variables the model mutates (BatchNorm) are kept as model state.
    batch_fn: `batch_fn(step) -> dict of host (numpy) arrays`, the GLOBAL batch of training step `step`, each
      array's leading axis the batch (divisible by the mesh's data x fsdp size). It must be a pure function of
      the step, so a resumed run sees the batches an uninterrupted one would. With several processes each
      process keeps the rows its devices hold.
    mesh: a `jax.sharding.Mesh` with axes (stage, data, fsdp, context, tensor, expert)
      (`parallel.make_mesh(strategy=..., mesh=...)`);
      None: one device.
    rules: (logical axis, mesh axis or None) pairs that shard parameters by the logical axis names modules give
      them (`parallel.rules`); None: the command line's defaults (`embed` over fsdp, `mlp`/`heads` over tensor).
    fallback_rules: (path regex, mesh axis) pairs for parameters without logical names (`parallel.fallback_rules`:
      the largest dimension the axis divides is split); None: the defaults (every such parameter over fsdp).
    activation_rules: (logical activation axis, mesh axes) pairs for `parallel.constrain` inside the step
      (`parallel.activation_rules`); None: the defaults (the batch over data x fsdp).
    workdir: a local path or gs:// URL for `metrics.jsonl` and `checkpoints/` (held under `workdir/LOCK` while
      fitting); a workdir with a checkpoint resumes from its newest readable one (parameters, optimizer state,
      step and unlogged metric rows), given the same module, optimizer and batch shapes. None: nothing is
      written or restored and nothing is logged.
    seed: the dropout keys' seed (`rng` = fold_in(PRNGKey(seed + 1), step), as the command line's).
    grad_accum_steps: micro-batches per step, run in sequence inside the step (rows i, i+k, ... form micro-batch i).
    skip_nonfinite: a step with a non-finite loss or gradient norm changes nothing but the step count (else the
      run stops with NonFiniteLoss before saving that state).
    log_every: steps per `metrics.jsonl` record (the first step is logged alone, with its compile times).
    checkpoint_every: steps between asynchronous checkpoints (0: only at the end); the last step and a signal's
      stop (SIGTERM/SIGINT: saved, then `jaxmodels.runtime.errors.Preempted` is raised) always save. Without a
      workdir a signal ends `fit` after the step, which returns the state.
    keep: newest checkpoints kept.
    schedule: the learning-rate schedule (an optax schedule of the step) to log as `learning_rate`; None: not
      logged.
    trainable: a trainable filter (parameter path -> bool; `jaxmodels.optim.freezing.trainable_filter`, e.g.
      `trainable_filter(adapters_only=True)` after `jaxmodels.models.lora.apply_lora`, or frozen patterns): only
      those parameters are differentiated and updated, and `tx` keeps state for them alone
      (`freezing.freeze(tx, trainable)`). None: every parameter trains.

  Raises UserError for a mesh, rule or batch size that does not fit, a workdir in use, or a checkpoint whose
  saved trees differ from this model's and optimizer's.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, loss_fn, batch_fn, *, mesh=None,
               rules=None, fallback_rules=None, activation_rules=None, workdir=None, seed: int = 0,
               grad_accum_steps: int = 1, skip_nonfinite: bool = False, log_every: int = 10,
               checkpoint_every: int = 0, keep: int = 1, schedule=None, trainable=None):
    defaults = config_lib.default_config().parallel
    tx = freezing.freeze(tx, trainable)
    self.tx, self.loss_fn, self.batch_fn, self.workdir, self.schedule = tx, loss_fn, batch_fn, workdir, schedule
    self.log_every, self.checkpoint_every, self.keep = log_every, checkpoint_every, keep
    self.options = StepOptions(seed=seed, grad_accum_steps=grad_accum_steps, skip_nonfinite=skip_nonfinite,
                               trainable=trainable)
    mesh = parallel.make_mesh(strategy="single") if mesh is None else mesh
    shardings = parallel.param_shardings(nnx.state(model, nnx.Param), mesh,
                                         defaults.rules if rules is None else rules,
                                         defaults.fallback_rules if fallback_rules is None else fallback_rules)
    self.layout = parallel.Layout(mesh, jax.tree.map(lambda s: s.spec, shardings))
    self.graphdef, params, model_state = split_model(model)

    def fresh(params, model_state):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                        opt_state=tx.init(params))

    abstract = jax.eval_shape(fresh, params, model_state)
    self.state_shardings = self.layout.state_shardings(TrainState, abstract, tx)
    self.checkpoint_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                         abstract, self.state_shardings)
    self._init = lambda: jax.jit(fresh, out_shardings=self.state_shardings)(params, model_state)
    self.train_step = jit_train_step(make_train_step(self.graphdef, tx, loss_fn, self.options), self.layout,
                                     self.state_shardings,
                                     defaults.activation_rules if activation_rules is None else activation_rules)
    self.state: TrainState | None = None  # after `fit`: the final state
    self._hooks: list[actions_lib.Hook] = []

  def add_hook(self, fn, every: int) -> None:
    """Runs `fn(step, state)` after every step that is a multiple of `every` (step: optimizer steps taken;
    state: the TrainState after them, whose arrays the next step donates: copy what you keep). Hooks run in the
    order added, before the step's checkpoint; transfers are allowed inside them."""
    self._hooks.append(actions_lib.Hook(fn, every))

  def batch(self, step: int) -> dict:
    """Training batch `step` as global arrays over the mesh (this process's rows of `batch_fn(step)`)."""
    with jax.transfer_guard("allow"):  # batch_fn may compute on the device; its result is fetched explicitly
      host = {k: np.asarray(v) for k, v in self.batch_fn(step).items()}
    size = len(next(iter(host.values())))
    rows = self.layout.local_rows(size)
    return self.layout.global_batch({k: v[rows] for k, v in host.items()}, size)

  @property
  def model(self) -> nnx.Module:
    """The module with the trained parameters and model state (after `fit`)."""
    state = self.state if self.state is not None else self._init()
    return nnx.merge(self.graphdef, state.params, state.model_state)

  def fit(self, steps: int) -> TrainState:
    """Trains until `steps` optimizer steps are taken (resuming a workdir's checkpoint) and returns the final
    TrainState (step, params, model_state, opt_state: pure pytrees, sharded over the mesh).

    Raises ValueError, before the first step runs, for a `batch_fn` that returns no dict or a batch that
    `grad_accum_steps` does not divide, and for a `loss_fn` whose result is not (scalar loss_sum, dict of scalar
    sums holding `count`); UserError for a workdir whose saved checkpoints are all damaged."""
    lead = jax.process_index() == 0
    log = print if lead else lambda _line: None
    lock = ckpts = None
    if self.workdir is not None:
      storage.check_workdir(self.workdir)
      lock = storage.WorkdirLock(self.workdir, log)
    try:
      if lock is not None and lead:
        lock.acquire()
      state, start, resumed = None, 0, {}
      if self.workdir is not None:
        ckpt_config = config_lib.default_config().checkpoint
        ckpt_config.keep = self.keep
        ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(self.workdir), ckpt_config)
        step, restored = ckpts.resume_newest(lambda _trees: self.checkpoint_state, log=log)
        if step is not None:  # read straight into the state's shardings; no fresh state is built
          state, start, resumed = restored, step, ckpts.loop_state(step)
      state = self._init() if state is None else state
      logger = MetricsLogger(self.workdir or ".", steps, enabled=lead and self.workdir is not None)
      logger.start(start)
      self.state = self._loop(state, start, steps, logger, ckpts, resumed).state
      logger.close()
    finally:
      try:
        if ckpts is not None:
          ckpts.close()  # waits for the last async save; a failed save raises here
      finally:
        if lock is not None and lead:
          lock.release()
    return self.state

  def _loop(self, state, start: int, steps: int, logger, ckpts, resumed: dict) -> Run:
    with jax.transfer_guard("allow"):
      batch = self.batch_fn(start)
      if not isinstance(batch, dict):
        raise ValueError(f"batch_fn({start}) returned {type(batch).__name__}: expected a dict of host arrays")
      first = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    for n in {v.shape[0] for v in first.values() if v.shape}:
      if n % self.options.grad_accum_steps:
        raise ValueError(f"batch_fn({start}) gave {n} examples, which grad_accum_steps="
                         f"{self.options.grad_accum_steps} micro-batches do not divide")
    micro = jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[0] // self.options.grad_accum_steps,
                                                         *a.shape[1:]), a.dtype), first)
    keys = jax.eval_shape(objective(self.graphdef, self.loss_fn), self.checkpoint_state.params,
                          self.checkpoint_state.model_state, micro, jax.random.PRNGKey(0))[1][0]
    run = Run(state, start, steps, logger, ckpts, RecompileAlarm(log=logger.print),
              metric_names=metric_names(keys), skip_nonfinite=self.options.skip_nonfinite,
              nonfinite_advice="Lower the optimizer's learning rate, clip the gradients (optax.clip_by_global_norm), "
                               "or pass skip_nonfinite=True",
              rows=list(resumed.get("unlogged_metrics") or []))
    learning_rates = (None if self.schedule is None else
                      np.asarray(jax.jit(jax.vmap(self.schedule))(jnp.arange(steps))))
    signals = Signals()
    actions = [actions_lib.LogTrain(self.log_every, learning_rates, start, None, len(jax.tree.leaves(first)[0])),
               actions_lib.WatchSignals(signals), *self._hooks,
               *([actions_lib.Save(self.checkpoint_every, {"trainer": {"seed": self.options.seed}}),
                  actions_lib.Preempt()] if ckpts is not None else [])]
    return run_steps(run, self.train_step, self.batch, actions, signals)
