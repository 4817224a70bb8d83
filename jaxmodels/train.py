"""The training loop: `train_and_evaluate(config, workdir)`.

The NNX model is split once into a static graph definition and pure pytrees
(parameters, other model state such as BatchNorm statistics). The train and eval
steps are `jax.jit` functions of those pytrees: no NNX graph traversal happens per
step, the train state is donated, and metrics stay on the device until a log
interval fetches them.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxmodels import actions as actions_lib
from jaxmodels import checkpoint
from jaxmodels import distill
from jaxmodels import flops
from jaxmodels import parallel
from jaxmodels import precision
from jaxmodels import quantization
from jaxmodels import scores
from jaxmodels import tasks
from jaxmodels import storage
from jaxmodels import config as config_lib
from jaxmodels.data import LM_SOURCES, check_batch_size, load_dataset, loader
from jaxmodels.actions import Run, scalars, summarize
from jaxmodels.errors import Preempted, UserError
from jaxmodels.compilation import CompileTimer, RecompileAlarm
from jaxmodels.metrics import MetricsLogger
from jaxmodels.models import build_model
from jaxmodels.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # nnx.Param variables as a pure nested dict of arrays
  model_state: dict  # every other variable (BatchNorm statistics, ...), likewise
  opt_state: optax.OptState
  ema_params: dict | None = None  # float32 moving average of params (train.ema_decay > 0; jaxmodels.precision)
  loss_scale: precision.LossScale | None = None  # dynamic loss scale (model.dtype=float16), else None


def split_model(model: nnx.Module):
  """(graphdef, params, model_state), the states as pure nested dicts of arrays.

  Pure dicts, not `nnx.State`: jit flattens them in C++, where State and Variable
  nodes cost a Python call each on every step (2-3x the dispatch time of a
  small model). `nnx.merge` accepts them back.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def model_input(x):
  """The model's input: uint8 images (data.source=images, moved as bytes) scaled to float32 [0, 1] on the device."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def make_model(config, dataset, rngs: nnx.Rngs) -> nnx.Module:
  """The config's model, sized for the dataset's inputs, outputs and task."""
  # BatchNorm syncs statistics over the pmap axis
  axis_name = parallel.PmapLayout.axis_name if config.parallel.strategy == "pmap" else None
  task = dataset.task if dataset.task in ("lm", "seq2seq") else "classify"
  model = build_model(config.model, dataset.input_shape, dataset.num_outputs, rngs, task=task, axis_name=axis_name)
  q = config.train.quantization  # quantization-aware training: the forward pass computes on int weights
  spec = dict(method="qat", bits=q.bits, activations=q.activations, exclude=q.exclude) if q.bits else None
  return quantization.apply(model, spec, dataset.input_shape, task)


def forward(model, batch: dict, **kwargs):
  """The model's logits for a batch: an encoder-decoder (seq2seq) reads the source and, teacher-forced, the
  decoder input; every other model reads `x` alone. `kwargs`: train, rngs."""
  if "decoder_input" in batch:
    return model(batch["x"], batch["decoder_input"], source_mask_BS=batch["source_mask"], **kwargs)
  return model(model_input(batch["x"]), **kwargs)


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step: data, model graph, optimizer, layout, steps."""

  config: Any
  dataset: Any
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: Any  # parallel.Layout (jit strategies) or parallel.PmapLayout
  model_flops: float  # analytic training FLOPs of one step (jaxmodels.flops)
  init_state: Callable[[], TrainState]  # a fresh state, placed on the devices
  checkpoint_state: TrainState  # ShapeDtypeStructs with shardings: where a restore puts each array
  train_step: Callable  # (state, batch) -> (state, metrics vector, see actions.TRAIN_METRICS); donates state
  eval_step: Callable  # (state, batch, totals) -> totals + the batch's summed metrics; donates totals (None: the sums)
  notices: list[str] = dataclasses.field(default_factory=list)  # config adjustments (config.fit_to_steps) to print
  _loader: Any = None  # jaxmodels.data.loader.StepStream of device batches, made data.prefetch steps ahead

  def host_batch(self, step: int) -> dict:
    """This process's rows of training batch `step`, as host arrays."""
    size = self.config.train.batch_size
    return self.dataset.train_batch(step, size, self.layout.local_rows(size))

  def batch(self, step: int) -> dict:
    """Training batch `step` as global arrays; this process loads only the rows its devices hold.

    Consecutive steps are loaded and put on the devices `data.prefetch` steps ahead, on a loader thread.
    """
    put = lambda s: self.layout.global_batch(self.host_batch(s), self.config.train.batch_size)
    if not self.config.data.prefetch:
      return put(step)
    if self._loader is None:
      self._loader = loader.StepStream(put, workers=0, buffer=self.config.data.prefetch)
    return self._loader.get(step)

  def stop_loader(self) -> None:
    """Stops the prefetching of training batches; the next `batch` starts it again."""
    if self._loader is not None:
      self._loader.close()

  def evaluate(self, state: TrainState, alarm: RecompileAlarm | None = None, step: int = 0) -> dict:
    """Metrics over the whole test (validation) split; one host fetch at the end.

    `alarm` watches the eval step for recompiles; `step` is the training step its warnings name.

    Loss is the mean per target of the task's loss (jaxmodels.tasks): cross-entropy
    in nats per example (classification) or per token (language models, which also
    report perplexity and bits per char or byte). Regression reports mse, mae and r2;
    binary precision, recall, f1 and roc_auc; multilabel f1_micro, *_macro and
    f1_per_label; `top<k>_accuracy` for `train.eval_top_k`. Classifiers add precision, recall and
    F1 (macro and weighted floats, per-class lists; jaxmodels.scores) and `confusion`,
    the (C, C) matrix of counts as nested lists (rows true class, columns predicted).
    `scalars(metrics)` keeps the floats.
    """
    size = self.config.train.eval_batch_size
    totals = None
    pmap = isinstance(self.layout, parallel.PmapLayout)
    # Every process iterates the same batches (the padded split's count), so each enters every step's collectives.
    for batch in self.dataset.eval_batches(size, self.layout.local_rows(size)):
      batch = self.layout.global_batch(batch, size)
      if totals is None:  # zeros made on the devices where the step keeps its totals (pmap: one copy per device)
        shapes = jax.eval_shape(self.eval_step, state, batch, None)
        totals = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
                         out_shardings=self.layout.sharding if pmap else self.layout.replicated)()
      inputs = {"state": state, "batch": batch, "totals": totals}  # totals donated; shapes stay readable
      with CompileTimer() as compile_time:
        totals = self.eval_step(state, batch, totals)  # the running sums stay inside the compiled step
      if alarm is not None:
        alarm.check("eval_step", self.eval_step, inputs, step, compile_time)
    totals = self.layout.fetch(totals)
    if pmap:  # identical copies, one per device
      totals = jax.tree.map(lambda a: a[0], totals)
    count = float(totals["count"])
    metrics = {"loss": float(totals["loss_sum"]) / count}
    task = self.dataset.task
    if task == "regress":
      metrics.update(scores.regression_scores(totals))
    else:
      metrics["accuracy"] = float(totals["correct"]) / count  # multilabel: the share of labels right
    if task == "binary":
      metrics.update(scores.binary_scores(totals["confusion"], totals["auc_hist"]))
    if task == "multilabel":
      metrics.update(scores.multilabel_scores(totals["label_counts"]))
    if "top_k_correct" in totals:
      metrics[f"top{self.config.train.eval_top_k}_accuracy"] = float(totals["top_k_correct"]) / count
    if task == "seq2seq":
      metrics["exact_match"] = float(totals["exact"]) / float(totals["sequences"])
    if task in ("lm", "seq2seq"):
      metrics["perplexity"] = math.exp(metrics["loss"])
      metrics[f"bits_per_{self.dataset.unit}"] = metrics["loss"] / math.log(2)
    if task == "classify":
      confusion = np.asarray(totals["confusion"], np.int64)
      metrics.update(scores.confusion_scores(confusion), confusion=confusion.tolist())
    return metrics


def build_experiment(config, devices=None) -> Experiment:
  """Validates the config, loads the data, lays the state out over the mesh; compiles nothing yet.

  `devices` (default: all) may be devices of a TPU topology that is not attached,
  for ahead-of-time compiles (`jaxmodels bench compile --topology`).
  """
  config_lib.validate(config)
  platform = (devices or jax.devices())[0].platform
  if config.model.get("attention_impl") == "splash" and platform != "tpu":
    raise UserError(f"model.attention_impl=splash is JAX's Pallas TPU kernel, but the devices are {platform}: use "
                    f"auto, einsum or xla here (or compile for a TPU: jaxmodels bench compile --topology v5e:2x2)")
  notices = config_lib.fit_to_steps(config)
  splash = config.model.get("attention_impl") == "splash"
  if splash and config.data.source in LM_SOURCES and config.data.seq_len % 128:
    raise UserError(f"model.attention_impl=splash needs data.seq_len a multiple of 128 (the TPU's lanes), got "
                    f"{config.data.seq_len}")
  dataset = load_dataset(config)
  t = config.train
  if dataset.task not in ("lm", "seq2seq"):  # text windows and synthetic sequences: any number of them
    check_batch_size(t.batch_size, len(dataset.x_train))
  tx, schedule = make_optimizer(t)

  def fresh_state() -> TrainState:
    _, params, model_state = split_model(make_model(config, dataset, nnx.Rngs(t.seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), ema_params=precision.ema_init(params) if t.ema_decay else None,
                      loss_scale=(precision.initial_loss_scale() if precision.needs_loss_scale(config.model.dtype)
                                  else None))

  # Built on abstract values: the graph definition and sharding annotations without allocating parameters.
  abstract_model = nnx.eval_shape(lambda: make_model(config, dataset, nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract_model)
  abstract_state = jax.eval_shape(fresh_state)
  eval_options = evaluation_options(t, dataset)
  state_options = dict(ema_decay=t.ema_decay, loss_scale_period=t.loss_scale_period)
  if config.parallel.strategy == "pmap":
    layout = parallel.PmapLayout(jax.local_devices())
    train_fn, eval_fn = make_steps(graphdef, tx, t.seed, t.grad_accum_steps, axis_name=layout.axis_name,
                                   skip_nonfinite=t.skip_nonfinite, **eval_options, **state_options)
    # Metrics and eval sums are reduced over the axis inside the step, so they come out once (out_axes None).
    train_step = jax.pmap(train_fn, axis_name=layout.axis_name, donate_argnums=0, out_axes=(0, None))
    eval_step = jax.pmap(eval_fn, axis_name=layout.axis_name, donate_argnums=2)  # totals: one copy per device
    n = len(layout.devices)
    # Each device computes the fresh state and keeps its own copy: no device holds the stacked copies.
    init_state = jax.jit(lambda: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), fresh_state()),
                         out_shardings=layout.sharding)
    state_sh = jax.tree.map(lambda _: layout.checkpoint_sharding(), abstract_state)
  else:
    mesh = parallel.make_mesh(config.parallel, devices)
    specs = parallel.partition_specs(nnx.state(abstract_model, nnx.Param), mesh, config.parallel.rules,
                                     config.parallel.fallback_rules)
    layout = parallel.Layout(mesh, specs)
    state_sh = layout.state_shardings(TrainState, abstract_state, tx)
    teacher = distill.load_teacher(config, dataset, layout)  # train.distill.teacher, or None
    train_fn, eval_fn = make_steps(graphdef, tx, t.seed, t.grad_accum_steps, skip_nonfinite=t.skip_nonfinite,
                                   teacher=teacher, **eval_options, **state_options)
    # Traced with the activations pinned to the mesh (parallel.constrain): each device computes its rows.
    pinned = parallel.activation_sharding(mesh, config.parallel.activation_rules)
    train_fn, eval_fn = pinned(train_fn), pinned(eval_fn)
    teacher_sh = () if teacher is None else (teacher.shardings,)
    train_step = jax.jit(train_fn, in_shardings=(state_sh, layout.batch_sharding, *teacher_sh),
                         out_shardings=(state_sh, layout.replicated), donate_argnums=0)
    if teacher is not None:  # the teacher's arrays are an argument of the step: not donated, not differentiated
      train_step = distill.StepWithTeacher(train_step, teacher.variables)
    eval_step = jax.jit(eval_fn, in_shardings=(state_sh, layout.batch_sharding, layout.replicated),
                        out_shardings=layout.replicated, donate_argnums=2)
    init_state = jax.jit(fresh_state, out_shardings=state_sh)
  layout.check_batch_size(t.batch_size)  # batch sizes must divide the data-parallel size: fail before training
  layout.check_batch_size(t.eval_batch_size)
  model_flops = flops.model_flops_per_step(config, dataset, abstract_model)
  checkpoint_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  abstract_state, state_sh)
  return Experiment(config, dataset, graphdef, tx, schedule, layout, model_flops, init_state, checkpoint_state,
                    train_step, eval_step, notices)


def evaluation_options(t, dataset) -> dict:
  """make_steps' task options for `dataset` under train config `t`: top-k accuracy only where k leaves classes
  out; a regression's eval sums about the training targets' per-output mean (tasks.eval_sums' y_shift)."""
  y_shift = (np.mean(dataset.y_train, axis=0, dtype=np.float64).astype(np.float32) if dataset.task == "regress"
             else None)
  return dict(task=dataset.task, loss=t.loss, y_shift=y_shift,
              eval_top_k=t.eval_top_k if 1 < t.eval_top_k < dataset.num_outputs else 0)


def make_steps(graphdef, tx, seed: int, grad_accum_steps: int = 1, axis_name: str | None = None,
               skip_nonfinite: bool = False, task: str = "classify", loss: str = "mse", eval_top_k: int = 0,
               y_shift=None, teacher=None, ema_decay: float = 0.0, loss_scale_period: int = 2000):
  """The pure (train_step, eval_step) functions for a model graph and an optimizer; the caller compiles them.

  The gradient is that of the summed loss divided once by the number of
  targets (unmasked positions) in the whole batch, over every micro-batch and
  device: the full batch's token-mean gradient, exactly, however the mask
  falls. With `grad_accum_steps` = k, micro-batch i is rows i, i+k, i+2k, ...:
  each device holds its share of every micro-batch (a contiguous split would
  put each on a fraction of the devices), and the gradients add up in float32.

  Dropout keys are `fold_in(PRNGKey(seed + 1), step)`: a pure function of the step,
  so the RNG needs no state of its own and a resumed run draws the same masks.
  With `axis_name` (the pmap strategy) gradient and metric sums are summed
  across that axis (so the target count is global), model state is averaged,
  eval sums are summed, and each device folds its axis index into the dropout
  key (otherwise all would draw the same masks). With `skip_nonfinite`, a step whose loss or gradients are not finite leaves the
  state unchanged but for the step counter (metric `skipped` = 1). `task` and
  `loss` (regression) pick the loss (jaxmodels.tasks); the eval step adds the
  batch's `tasks.eval_sums` (top-k hits for `eval_top_k` > 0; regression sums about `y_shift`) to its `totals`
  argument inside the compiled step (no eager sum per batch; None: the batch's sums).
  With a `teacher` (distill.Teacher) the train step takes the teacher's arrays as a
  third argument and minimises `teacher.objective` (distillation); its metrics
  still report the hard-label loss.

  A state with a `loss_scale` (float16) differentiates the scaled loss, unscales the float32 gradient sums,
  skips the update of a step whose gradients are not finite, and adjusts the scale (`loss_scale_period`;
  jaxmodels.precision). A state with `ema_params` updates them by `ema_decay` after each applied update, and
  the eval step evaluates them in place of the parameters.
  """

  def loss_fn(params, model_state, batch, rng, teacher_vars=None):
    """(summed loss, (sums, model state)): the sum, so that micro-batches and devices add up exactly."""
    # copy=True: fresh Variables at this trace level, which the forward pass may mutate (BatchNorm).
    model = nnx.merge(graphdef, params, model_state, copy=True)
    x = model_input(batch["x"])
    logits = forward(model, batch, train=True, rngs=nnx.Rngs(dropout=rng))
    mask = batch.get("mask", jnp.ones(batch["y"].shape, jnp.float32))
    sums = tasks.loss_sums(task, logits, batch["y"], mask, loss)
    _, _, new_model_state = split_model(model)
    objective = sums["loss_sum"] if teacher is None else teacher.objective(logits, x, mask, sums["loss_sum"],
                                                                            teacher_vars)
    return objective, (sums, new_model_state)

  f32 = lambda tree: jax.tree.map(lambda g: g.astype(jnp.float32), tree)

  def train_step(state: TrainState, batch, teacher_vars=None):
    # The summed loss is scaled by loss_scale / (targets per micro-batch slot, static), so the scale means what
    # it means for a mean loss (PyTorch's GradScaler, jmp) whatever the batch size.
    scale = None if state.loss_scale is None else state.loss_scale.scale / (batch["y"].size / grad_accum_steps)
    grad_fn = jax.grad(precision.scaled(loss_fn, scale), has_aux=True)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    if grad_accum_steps == 1:
      grads, (sums, model_state) = grad_fn(state.params, state.model_state, batch, rng, teacher_vars)
      grads = f32(grads)
    else:
      # Micro-batches run sequentially inside the one compiled step, at a fraction of the activation
      # memory. Strided: (B, ...) -> (B/k, k, ...) -> (k, B/k, ...) keeps every device's rows on it.
      micro = jax.tree.map(lambda a: parallel.constrain(
          jnp.moveaxis(a.reshape(-1, grad_accum_steps, *a.shape[1:]), 1, 0), (None, "activation_batch")), batch)

      def body(carry, xs):
        model_state, grads_acc, sums_acc = carry
        mb, i = xs
        mb = jax.tree.map(lambda a: parallel.constrain(a, ("activation_batch",)), mb)
        grads, (sums, model_state) = grad_fn(state.params, model_state, mb, jax.random.fold_in(rng, i),
                                             teacher_vars)
        return (model_state, jax.tree.map(jnp.add, grads_acc, f32(grads)),
                jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}
      (model_state, grads, sums), _ = jax.lax.scan(
          body, (state.model_state, zeros, zero_sums), (micro, jnp.arange(grad_accum_steps)))
    if axis_name is not None:
      grads, sums = jax.lax.psum((grads, sums), axis_name)
      model_state = jax.lax.pmean(model_state, axis_name)
    # One division by the global target count (and the loss scale, in float32), then back to the parameters'
    # dtype for the optimizer.
    count = sums["count"] if scale is None else sums["count"] * scale
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema_params is None else precision.ema_update(state.ema_params, params, ema_decay)
    loss, grad_norm = sums["loss_sum"] / sums["count"], optax.tree.norm(grads)
    skipped, ok, loss_scale = jnp.zeros((), jnp.float32), None, state.loss_scale
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if scale is not None:  # an overflowed gradient (its norm inf or NaN) is skipped, and the scale halved
      finite = jnp.isfinite(grad_norm)
      ok = finite if ok is None else ok & finite
      loss_scale = precision.update_loss_scale(state.loss_scale, finite, loss_scale_period)
    if ok is not None:
      params, model_state, opt_state, ema = jax.tree.map(
          lambda new, old: jnp.where(ok, new, old), (params, model_state, opt_state, ema),
          (state.params, state.model_state, state.opt_state, state.ema_params))
      skipped = 1.0 - ok.astype(jnp.float32)
    metrics = jnp.stack([loss, sums["correct"] / sums["count"], grad_norm, skipped]).astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, ema_params=ema, loss_scale=loss_scale)
    return new_state, metrics

  def eval_step(state: TrainState, batch, totals=None):
    params = state.params if state.ema_params is None else precision.ema_as_params(state.ema_params, state.params)
    model = nnx.merge(graphdef, params, state.model_state)
    sums = tasks.eval_sums(task, forward(model, batch, train=False), batch["y"], batch["mask"], eval_top_k, loss,
                           y_shift)
    sums = sums if axis_name is None else jax.lax.psum(sums, axis_name)
    return sums if totals is None else jax.tree.map(jnp.add, totals, sums)

  return train_step, eval_step


def mean_train_metrics(pending: list[jax.Array]) -> dict[str, float]:
  """Fetches train-step metric vectors (one host sync) and averages them by name."""
  return summarize(np.stack(parallel.fetch(pending)))


class _Signals:
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


def train_loop(exp: Experiment, state: TrainState, start: int, logger: MetricsLogger, ckpts,
               resumed: dict | None = None) -> Run:
  """Steps `start`..`train.steps`, each followed by the actions due (jaxmodels.actions); returns the Run
  (its `state`, last `eval_metrics` or {}, and `stop`, why it stopped early, or "").

  Metrics stay on the device until a log interval or a save fetches them. The
  loop may move data only explicitly (device_put / device_get): an implicit
  transfer, a hidden per-step host sync, is an error rather than a slowdown.
  A non-finite loss stops the run before any save of that state; a signal
  ends it after the current step (with several processes, after a step all agree
  on) with a synchronous save. Each checkpoint also keeps the metric rows not
  yet logged and the early-stopping record (`resumed`, Checkpoints.loop_state),
  so a resumed run's log intervals average the same steps as an uninterrupted
  run's, and an early-stopped run stays stopped.
  """
  t = exp.config.train
  run = Run(exp, state, start, logger, ckpts, RecompileAlarm(fail=t.fail_on_recompile, log=logger.print),
            rows=list((resumed or {}).get("unlogged_metrics") or []))
  signals = _Signals()
  actions = actions_lib.default_actions(exp, start, logger, signals, resumed)
  with jax.transfer_guard("disallow"), signals:
    for action in actions:
      action.begin(run)
    for step in range(start, t.steps):
      if run.stop:  # stopped early (or restored so)
        break
      batch = exp.batch(step)
      inputs = {"state": run.state, "batch": batch}  # donated, but their shapes and shardings stay readable
      with CompileTimer() as compile_time:
        run.state, metrics = exp.train_step(run.state, batch)
      run.alarm.check("train_step", exp.train_step, inputs, step + 1, compile_time)
      run.pending.append(metrics)
      run.done, run.compile_seconds = step + 1, compile_time.seconds
      for action in actions:
        if action.due(run):
          action(run)
    for action in actions:
      action.end(run)
  return run


def _restore(exp: Experiment, ckpts, log):
  """(state, start step, the loop's saved state (Checkpoints.loop_state) or {}, saved config or None): the
  workdir's newest readable
  checkpoint, else checkpoint.restore_from (a run, or the parameters of an export or `import-hf` directory),
  else a fresh start.

  Arrays are read straight into `exp.checkpoint_state`'s shardings; a fresh
  state is built only when nothing is restored, so a resume never holds two.
  """
  c = exp.config.checkpoint
  step = ckpts.newest_readable_step(log)
  if step is not None:
    restored = _complete(exp, ckpts.restore(step, exp.checkpoint_state, exp.config.to_dict()), log)
    return exp.layout.from_checkpoint(restored), step, ckpts.loop_state(step), ckpts.metadata(step)[0]
  if c.restore_from:
    if c.restore_mode not in ("params", "full"):
      raise UserError(f"checkpoint.restore_mode={c.restore_mode!r}: expected params or full")
    if checkpoint.is_export(c.restore_from):  # `jaxmodels export` or `import-hf`: parameters alone
      if c.restore_mode != "params":
        raise UserError(f"checkpoint.restore_from={c.restore_from!r} is an export (parameters only): "
                        f"use checkpoint.restore_mode=params")
      restored = checkpoint.restore_export(c.restore_from, exp.checkpoint_state, exp.config.to_dict())
      where = c.restore_from
    else:
      directory, step = checkpoint.resolve_restore_from(c.restore_from)
      source = checkpoint.Checkpoints(directory)
      try:
        restored = source.restore(step, exp.checkpoint_state, params_only=c.restore_mode == "params")
      finally:
        source.close()
      where = f"{directory}/{step}"
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
  old = np.asarray(jax.jit(jax.vmap(make_optimizer(saved)[1]))(steps))
  new = np.asarray(jax.jit(jax.vmap(exp.schedule))(steps))
  if np.allclose(old, new, rtol=1e-6, atol=1e-12):
    return None
  keys = "; ".join(checkpoint.config_differences(saved_config, exp.config.to_dict(), SCHEDULE_KEYS, ()))
  return (f"resuming at step {start} with a changed learning-rate schedule ({keys}): the rate at step {start} "
          f"is {new[0]:.4g} (the saved run's schedule gives {old[0]:.4g})")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` into `workdir` (a local path or gs://bucket/dir) and returns the final eval metrics
  (the floats; see Experiment.evaluate).

  Writes `config.json`, `model.json`, `metrics.jsonl`, `confusion_<step>.json` (classifiers) and `checkpoints/`. A
  workdir that already holds a checkpoint resumes from its newest readable one.
  Holds `workdir/LOCK` while it runs. Raises `UserError` for a bad workdir,
  config or data, a workdir in use by another run, or a checkpoint this config
  cannot resume, all before anything is written; `NonFiniteLoss` if the loss
  diverges, and `Preempted` after a signal's save. Early stopping
  (`train.early_stopping`) returns normally, before `train.steps`.
  """
  lead = jax.process_index() == 0  # only process 0 writes files and logs; every process saves checkpoints
  log = print if lead else lambda _line: None
  storage.check_workdir(workdir)
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
        for name, text in files.items():
          (storage.path(workdir) / name).write_text(text)
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
