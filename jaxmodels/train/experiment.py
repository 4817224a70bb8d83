"""From a config to everything the loop needs: data, model graph, optimizer, layout and steps.

`build_experiment(config)` validates the config, loads the data and lays the train
state out over the mesh; it compiles nothing. The `Experiment` it returns also
evaluates a state over the held-out split.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmodels import config as config_lib
from jaxmodels import parallel, tasks
from jaxmodels.compress import quantization
from jaxmodels.data import LM_SOURCES, check_batch_size, load_dataset_from_config, loader
from jaxmodels.models import build_model, flops, lora
from jaxmodels.optim import freezing, make_optimizer_from_config, precision
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.runtime.compilation import CompileTimer, RecompileAlarm
from jaxmodels.runtime.errors import UserError
from jaxmodels.tasks import scores
from jaxmodels.train import distill
from jaxmodels.train.step import make_steps, step_options
from jaxmodels.train.trainer import jit_train_step

__all__ = ["build_experiment", "Experiment", "make_model"]


def make_model(config, dataset, rngs: nnx.Rngs) -> nnx.Module:
  """The config's model, sized for the dataset's inputs, outputs and task, with LoRA adapters (`train.lora`)."""
  # BatchNorm syncs statistics over the pmap axis
  axis_name = parallel.PmapLayout.axis_name if config.parallel.strategy == "pmap" else None
  task = dataset.task if dataset.task in ("lm", "seq2seq") else "classify"
  model = build_model(config.model, dataset.input_shape, dataset.num_outputs, rngs, task=task, axis_name=axis_name)
  q = config.train.quantization  # quantization-aware training: the forward pass computes on int weights
  spec = dict(method="qat", bits=q.bits, activations=q.activations, exclude=q.exclude) if q.bits else None
  return lora.from_config(quantization.apply(model, spec, dataset.input_shape, task), config.train.lora, rngs)


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step: data, model graph, optimizer, layout, steps."""

  config: Any
  dataset: Any
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: Any  # parallel.Layout (jit strategies) or parallel.PmapLayout
  model_flops: float  # analytic training FLOPs of one step (jaxmodels.models.flops)
  init_state: Callable[[], TrainState]  # a fresh state, placed on the devices
  checkpoint_state: TrainState  # ShapeDtypeStructs with shardings: where a restore puts each array
  train_step: Callable  # (state, batch) -> (state, metrics vector, see actions.TRAIN_METRICS); donates state
  eval_step: Callable  # (state, batch, totals) -> totals + the batch's summed metrics; donates totals (None: the sums)
  notices: list[str] = dataclasses.field(default_factory=list)  # config adjustments (config.fit_to_steps) to print
  hardware_flops: float | None = None  # model_flops plus what remat recomputes (flops.hardware_flops_per_step)
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

    What each task reports is `jaxmodels.tasks.scores.eval_scores` of the summed totals: the loss (the mean per
    target of the task's loss), `eval_metric_names(task)` and `top<k>_accuracy` for `train.eval_top_k`, per-class
    lists and a classifier's `confusion` matrix. `scalars(metrics)` keeps the floats.
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
    task = self.dataset.task
    unit = self.dataset.unit if task in ("lm", "seq2seq") else "token"
    return scores.eval_scores(task, totals, unit, self.config.train.eval_top_k)


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
  dataset = load_dataset_from_config(config)
  t = config.train
  if t.loss in ("mae", "huber") and dataset.task != "regress":  # was ignored without a word
    raise UserError(f"train.loss={t.loss} is a regression loss, but data.task={dataset.task} has its own: leave "
                    f"train.loss unset, or name your own loss as package.module:function")
  if t.loss not in tasks.LOSSES:  # your own loss (package.module:function): its protocol, before anything is written
    tasks.check_loss(t.loss, dataset.task, dataset.num_outputs,
                     dataset.y_train.shape[1:] if dataset.task in ("multilabel", "regress") else ())
  if dataset.task not in ("lm", "seq2seq"):  # text windows and synthetic sequences: any number of them
    check_batch_size(t.batch_size, len(dataset.x_train))
  tx, schedule = make_optimizer_from_config(t)

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
  freezing.check_patterns(abstract_state.params, t)
  if trainable := freezing.from_config(t):
    notices.append(freezing.describe(abstract_state.params, abstract_state.opt_state, trainable))
  if config.parallel.strategy == "pmap":
    layout = parallel.PmapLayout(jax.local_devices())
    train_fn, eval_fn = make_steps(graphdef, tx, step_options(t, dataset, layout.axis_name))
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
    train_fn, eval_fn = make_steps(graphdef, tx, step_options(t, dataset), teacher)
    # A `stage` mesh axis runs the layers as a pipeline of parallel.pipeline_microbatches (parallel.pipeline).
    scheduled = parallel.pipeline_schedule(config.parallel.pipeline_microbatches, config.parallel.pipeline_repeats)
    train_fn, eval_fn = scheduled(train_fn), scheduled(eval_fn)
    # Traced with the activations pinned to the mesh (parallel.constrain): each device computes its rows.
    pinned = parallel.activation_sharding(mesh, config.parallel.activation_rules)
    teacher_sh = () if teacher is None else (teacher.shardings,)
    train_step = jit_train_step(train_fn, layout, state_sh, config.parallel.activation_rules, teacher_sh)
    if teacher is not None:  # the teacher's arrays are an argument of the step: not donated, not differentiated
      train_step = distill.StepWithTeacher(train_step, teacher.variables)
    eval_step = jax.jit(pinned(eval_fn), in_shardings=(state_sh, layout.batch_sharding, layout.replicated),
                        out_shardings=layout.replicated, donate_argnums=2)
    init_state = jax.jit(fresh_state, out_shardings=state_sh)
  layout.check_batch_size(t.batch_size)  # batch sizes must divide the data-parallel size: fail before training
  layout.check_batch_size(t.eval_batch_size)
  model_flops = flops.model_flops_per_step(config, dataset, abstract_model, notices)
  checkpoint_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  abstract_state, state_sh)
  return Experiment(config, dataset, graphdef, tx, schedule, layout, model_flops, init_state, checkpoint_state,
                    train_step, eval_step, notices,
                    flops.hardware_flops_per_step(config, dataset, abstract_model, model_flops))
