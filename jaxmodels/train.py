"""The training loop: `train_and_evaluate(config, workdir)`.

The NNX model is split once into a static graph definition and pure pytrees
(parameters, other model state such as BatchNorm statistics). The train and eval
steps are `jax.jit` functions of those pytrees: no NNX graph traversal happens per
step, the train state is donated, and metrics stay on the device until a log
interval fetches them.
"""

import dataclasses
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmodels import checkpoint
from jaxmodels import parallel
from jaxmodels import config as config_lib
from jaxmodels.data import load_dataset
from jaxmodels.metrics import MetricsLogger
from jaxmodels.models import build_model
from jaxmodels.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # nnx.Param variables as a pure nested dict of arrays
  model_state: dict  # every other variable (BatchNorm statistics, ...), likewise
  opt_state: optax.OptState


# The train step returns its metrics stacked in one float32 vector in this order:
# each output array costs dispatch time on every step, the stack costs one.
TRAIN_METRICS = ("loss", "accuracy", "grad_norm")


def split_model(model: nnx.Module):
  """(graphdef, params, model_state), the states as pure nested dicts of arrays.

  Pure dicts, not `nnx.State`: jit flattens them in C++, where State and Variable
  nodes cost a Python call each on every step (2-3x the dispatch time of a
  small model). `nnx.merge` accepts them back.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def loss_sums(logits, labels, mask) -> dict[str, jax.Array]:
  """Summed float32 cross-entropy and correct predictions over unmasked positions.

  Works for labels of any shape: (B,) for classification, (B, L) for sequences.
  """
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def make_model(config, dataset, rngs: nnx.Rngs) -> nnx.Module:
  """The config's model, sized for the dataset's inputs, outputs and task."""
  axis_name = "data" if config.parallel.strategy == "pmap" else None  # BatchNorm syncs statistics over it
  return build_model(config.model, dataset.input_shape, dataset.num_outputs, rngs, task=dataset.task,
                     axis_name=axis_name)


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step: data, model graph, optimizer, layout, steps."""

  config: Any
  dataset: Any
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: Any  # parallel.Layout (jit strategies) or parallel.PmapLayout
  init_state: Callable[[], TrainState]  # a fresh state, placed on the devices
  train_step: Callable  # (state, batch) -> (state, metrics vector, see TRAIN_METRICS); donates state
  eval_step: Callable  # (state, batch) -> summed metrics

  def batch(self, step: int) -> dict:
    """Training batch `step` as global arrays; this process loads only its own rows."""
    t = self.config.train
    share = self.layout.local_share(t.batch_size)
    return self.layout.global_batch(self.dataset.train_batch(step, t.batch_size, share))

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Metrics over the whole test (validation) split; one host fetch at the end.

    Loss is mean cross-entropy in nats per example (classification) or per token
    (language models, which also report perplexity and bits per char or byte).
    """
    size = self.config.train.eval_batch_size
    share = self.layout.local_share(size)
    totals = None
    for batch in self.dataset.eval_batches(size, share):
      sums = self.eval_step(state, self.layout.global_batch(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = self.layout.fetch(totals)
    count = float(totals["count"])
    metrics = {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count}
    if self.dataset.task == "lm":
      metrics["perplexity"] = math.exp(metrics["loss"])
      metrics[f"bits_per_{self.dataset.vocab.kind}"] = metrics["loss"] / math.log(2)
    return metrics


def build_experiment(config) -> Experiment:
  """Validates the config, loads the data, lays the state out over the mesh; compiles nothing yet."""
  config_lib.validate(config)
  dataset = load_dataset(config)
  tx, schedule = make_optimizer(config.train)
  t = config.train

  def fresh_state() -> TrainState:
    _, params, model_state = split_model(make_model(config, dataset, nnx.Rngs(t.seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params))

  # Built on abstract values: the graph definition and sharding annotations without allocating parameters.
  abstract_model = nnx.eval_shape(lambda: make_model(config, dataset, nnx.Rngs(0)))
  graphdef, _, _ = split_model(abstract_model)
  abstract_state = jax.eval_shape(fresh_state)
  if config.parallel.strategy == "pmap":
    layout = parallel.PmapLayout(jax.local_devices())
    train_fn, eval_fn = make_steps(graphdef, tx, t.seed, t.grad_accum_steps, axis_name="data")
    pmapped = jax.pmap(train_fn, axis_name="data", donate_argnums=0)

    def train_step(state, batch):
      state, metrics = pmapped(state, batch)
      return state, metrics[0]  # identical on every device after the pmean

    eval_step = jax.pmap(eval_fn, axis_name="data")
    init_state = lambda: layout.replicate(jax.jit(fresh_state)())
  else:
    mesh = parallel.make_mesh(config.parallel)
    specs = parallel.partition_specs(nnx.state(abstract_model, nnx.Param), mesh, config.parallel.rules,
                                     config.parallel.fallback_rules)
    layout = parallel.Layout(mesh, specs)
    state_sh = layout.state_shardings(TrainState, abstract_state, tx)
    train_fn, eval_fn = make_steps(graphdef, tx, t.seed, t.grad_accum_steps)
    train_step = jax.jit(train_fn, in_shardings=(state_sh, layout.batch_sharding),
                         out_shardings=(state_sh, layout.replicated), donate_argnums=0)
    eval_step = jax.jit(eval_fn, in_shardings=(state_sh, layout.batch_sharding), out_shardings=layout.replicated)
    init_state = jax.jit(fresh_state, out_shardings=state_sh)
  layout.local_share(t.batch_size)  # batch sizes must divide the data-parallel size: fail before training
  layout.local_share(t.eval_batch_size)
  return Experiment(config, dataset, graphdef, tx, schedule, layout, init_state, train_step, eval_step)


def make_steps(graphdef, tx, seed: int, grad_accum_steps: int = 1, axis_name: str | None = None):
  """The pure (train_step, eval_step) functions for a model graph and an optimizer; the caller compiles them.

  Dropout keys are `fold_in(PRNGKey(seed + 1), step)`: a pure function of the step,
  so the RNG needs no state of its own and a resumed run draws the same masks.
  With `axis_name` (the pmap strategy) gradients, metrics and model state are
  averaged across that axis, and eval sums are summed over it.
  """

  def loss_fn(params, model_state, batch, rng):
    # copy=True: fresh Variables at this trace level, which the forward pass may mutate (BatchNorm).
    model = nnx.merge(graphdef, params, model_state, copy=True)
    logits = model(batch["x"], train=True, rngs=nnx.Rngs(dropout=rng))
    sums = loss_sums(logits, batch["y"], batch.get("mask", jnp.ones(batch["y"].shape, jnp.float32)))
    _, _, new_model_state = split_model(model)
    return sums["loss_sum"] / sums["count"], (sums, new_model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), state.step)
    if grad_accum_steps == 1:
      (_, (sums, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
    else:
      # Micro-batches run sequentially inside the one compiled step; their mean
      # gradient equals the full batch's, at a fraction of the activation memory.
      micro = jax.tree.map(lambda a: a.reshape(grad_accum_steps, -1, *a.shape[1:]), batch)

      def body(carry, xs):
        model_state, grads_acc, sums_acc = carry
        mb, i = xs
        (_, (sums, model_state)), grads = grad_fn(state.params, model_state, mb, jax.random.fold_in(rng, i))
        return (model_state, jax.tree.map(jnp.add, grads_acc, grads),
                jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}
      (model_state, grads, sums), _ = jax.lax.scan(
          body, (state.model_state, zeros, zero_sums), (micro, jnp.arange(grad_accum_steps)))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    if axis_name is not None:
      grads, model_state = jax.lax.pmean((grads, model_state), axis_name)
      sums = jax.lax.psum(sums, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = jnp.stack([sums["loss_sum"] / sums["count"], sums["correct"] / sums["count"],
                         optax.tree.norm(grads)]).astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    return new_state, metrics

  def eval_step(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params, state.model_state)
    sums = loss_sums(model(batch["x"], train=False), batch["y"], batch["mask"])
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)

  return train_step, eval_step


def mean_train_metrics(pending: list[jax.Array]) -> dict[str, float]:
  """Fetches train-step metric vectors (one host sync) and averages them by name."""
  means = np.mean(np.stack(parallel.fetch(pending)), axis=0)
  return {name: float(v) for name, v in zip(TRAIN_METRICS, means)}


def train_loop(exp: Experiment, state: TrainState, start: int, logger: MetricsLogger):
  """Steps `start`..`train.steps`; returns (state, last eval metrics or {}).

  Metrics stay on the device until a log interval fetches them all at once. The
  loop may move data only explicitly (device_put / device_get): an implicit
  transfer, a hidden per-step host sync, is an error rather than a slowdown.
  """
  t = exp.config.train
  pending, interval_start, eval_metrics = [], None, {}
  # Every step's learning rate, computed once here: schedules are jnp functions.
  learning_rates = np.asarray(jax.jit(jax.vmap(exp.schedule))(jnp.arange(t.steps)))
  t0 = time.perf_counter()
  with jax.transfer_guard("disallow"):
    for step in range(start, t.steps):
      state, metrics = exp.train_step(state, exp.batch(step))
      pending.append(metrics)
      done = step + 1
      if interval_start is None:  # the first step includes compilation: throughput is timed from its end
        logger.write({"step": done, "split": "train", **mean_train_metrics(pending),
                      "learning_rate": float(learning_rates[step]), "first_step_s": time.perf_counter() - t0})
        pending, interval_start = [], time.perf_counter()
      elif done % t.log_every == 0 or done == t.steps:
        record = mean_train_metrics(pending)
        elapsed = time.perf_counter() - interval_start
        record.update(learning_rate=float(learning_rates[step]), step_time_ms=1000 * elapsed / len(pending),
                      examples_per_sec=len(pending) * t.batch_size / elapsed)
        if exp.dataset.task == "lm":
          record["tokens_per_sec"] = record["examples_per_sec"] * exp.config.data.seq_len
        logger.write({"step": done, "split": "train", **record})
        pending, interval_start = [], time.perf_counter()
      if done % t.eval_every == 0 or done == t.steps:
        eval_metrics = exp.evaluate(state)
        logger.write({"step": done, "split": "eval", **eval_metrics})
  return state, eval_metrics


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` into `workdir` and returns the final eval metrics.

  Writes `config.json`, `metrics.jsonl` and `checkpoints/`. A workdir that already
  holds a checkpoint resumes from its newest step. Raises `UserError` for bad
  config or data before anything is written.
  """
  exp = build_experiment(config)  # every config and data error surfaces here
  lead = jax.process_index() == 0  # only process 0 writes files and logs; every process saves checkpoints
  os.makedirs(workdir, exist_ok=True)
  for name, text in {"config.json": config_lib.to_json(config), **exp.dataset.files()}.items():
    if lead:
      with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(text)

  state = exp.init_state()
  mngr = checkpoint.manager(workdir)
  if mngr.latest_step() is not None:
    restored = checkpoint.restore(mngr, mngr.latest_step(), exp.layout.for_checkpoint(state))
    state = exp.layout.from_checkpoint(restored)
  start = int(exp.layout.fetch(state.step))
  logger = MetricsLogger(workdir, config.train.steps, start, enabled=lead)
  logger.print(f"{exp.dataset.describe()}; training steps {start}..{config.train.steps} into {workdir}")
  t0 = time.perf_counter()
  state, eval_metrics = train_loop(exp, state, start, logger)
  train_s = time.perf_counter() - t0
  if not eval_metrics:  # resumed at the end: nothing trained, still report
    eval_metrics = exp.evaluate(state)
  final_step = int(exp.layout.fetch(state.step))
  if mngr.latest_step() != final_step:
    checkpoint.save(mngr, final_step, exp.layout.for_checkpoint(state))
  mngr.close()
  summary = " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items())
  logger.print(f"final: step {final_step} test {summary} (training {train_s:.1f} s)")
  logger.close()
  return eval_metrics
