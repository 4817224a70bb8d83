"""The compiled train and eval steps: `make_train_step(graphdef, tx, loss_fn, options)` (any loss: the one
train-step builder, which `jaxmodels.train.Trainer` and the CLI's `make_steps` both use) and `make_steps(graphdef,
tx, options)` (our tasks' loss, and the eval step) return pure functions of pytrees.

A loss is `loss_fn(model, batch, rng, *extra) -> (loss_sum, metrics)`: `loss_sum` a float32 scalar SUM over the
batch's examples (or targets), `metrics` a dict of float32 scalar sums over the same examples that holds
`count`, the number summed over (`task_loss` is ours). Sums, not means, so that micro-batches and devices add up
exactly: the step divides once, by the global count.

The train step is a short sequence of small pieces, each with one job, in the order they run:

    objective        the loss function on the model merged from the state's pure pytrees
    gradients        of one pass, or summed over micro-batches (`train.grad_accum_steps`), in float32
    across_devices   pmap: gradient and metric sums summed over the devices, model state averaged
    mean_gradients   the one division, by the global target count (and float16's loss scale)
    tx.update        the optimizer, then `precision.ema_update` (`train.ema_decay`)
    verdict          whether the update is kept (`train.skip_nonfinite`, float16's overflow); the next loss scale
    keep_or_skip     a skipped step keeps the old parameters, model state, optimizer state and EMA
    train_metrics    the step's metric vector: each metric sum over the global count (`metric_names`)

`StepOptions` holds what the steps do beyond a plain gradient step; `step_options` builds it from the config.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmodels import parallel, tasks
from jaxmodels.models.forward import context_order, forward, model_input
from jaxmodels.models.moe import pop_moe_terms
from jaxmodels.optim import freezing, precision
from jaxmodels.runs.state import TrainState, split_model

__all__ = ["across_devices", "dropout_key", "evaluation_options", "gradients", "keep_or_skip", "make_steps",
           "make_train_step", "mean_gradients", "metric_names", "objective", "step_options", "StepOptions",
           "task_loss", "train_metrics", "verdict"]


@dataclasses.dataclass(frozen=True, eq=False)
class StepOptions:
  """What the compiled steps do beyond a plain gradient step; `step_options` builds it from the config."""

  seed: int = 0  # dropout keys are fold_in(PRNGKey(seed + 1), step)
  grad_accum_steps: int = 1  # micro-batches per step
  axis_name: str | None = None  # the pmap strategy's device axis; None under jit
  skip_nonfinite: bool = False  # a step whose loss or gradients are not finite changes nothing but the step count
  task: str = "classify"  # the loss and metric sums (jaxmodels.tasks)
  loss: str = "mse"  # a regression's loss
  eval_top_k: int = 0  # the eval step counts top-k hits for k > 0
  y_shift: np.ndarray | None = None  # a regression's eval sums are of y - y_shift (tasks.eval_sums)
  ema_decay: float = 0.0  # of a state's `ema_params`
  loss_scale_period: int = 2000  # finite steps before float16's loss scale doubles
  # A trainable filter (path -> bool; jaxmodels.optim.freezing): only those parameters are differentiated (the
  # others get zero gradients, which the optimizer built with the same filter never reads). None: all of them.
  trainable: Callable[[str], bool] | None = None
  logits_chunk: int = 0  # lm: cross-entropy by vocabulary chunks of this size where the vocabulary is larger


def evaluation_options(t, dataset) -> dict:
  """The task options of `StepOptions` for `dataset` under train config `t`: top-k accuracy only where k leaves
  classes out; a regression's eval sums about the training targets' per-output mean (tasks.eval_sums' y_shift)."""
  y_shift = (np.mean(dataset.y_train, axis=0, dtype=np.float64).astype(np.float32) if dataset.task == "regress"
             else None)
  return {"task": dataset.task, "loss": t.loss, "y_shift": y_shift,
          "eval_top_k": t.eval_top_k if 1 < t.eval_top_k < dataset.num_outputs else 0}


def step_options(t, dataset, axis_name: str | None = None) -> StepOptions:
  """The steps' options from train config `t` (`config.train`) and the dataset; `axis_name` for pmap."""
  return StepOptions(seed=t.seed, grad_accum_steps=t.grad_accum_steps, axis_name=axis_name,
                     skip_nonfinite=t.skip_nonfinite, ema_decay=t.ema_decay, loss_scale_period=t.loss_scale_period,
                     trainable=freezing.from_config(t),
                     # QAT quantizes the head's matmul inside the model's forward pass: whole logits there.
                     logits_chunk=0 if t.quantization.bits else t.logits_chunk, **evaluation_options(t, dataset))


def task_loss(options: StepOptions, teacher=None):
  """Our tasks' loss (`options.task`, `options.loss`; jaxmodels.tasks) in the loss protocol: (model, batch, rng,
  teacher_vars=None) -> (summed objective, {"loss": the summed hard-label loss, the task's second train metric
  (`accuracy` sum of hits; regression `mae`, of absolute errors): sum, "count": unmasked targets}).

  `batch` holds `x`, `y` and optionally `mask` (targets, 0/1). With a `teacher` (distill.Teacher) the objective is
  `teacher.objective` of the teacher's arrays `teacher_vars`; the metrics still hold the hard-label loss.
  Without one, a language model with `hidden_and_head` (TransformerLM) whose vocabulary is larger than
  `options.logits_chunk` > 0 never makes its whole logits: `tasks.chunked_loss_sums` of its hidden states.
  """
  second = tasks.train_metric_names(options.task)[1]

  def loss(model, batch, rng, teacher_vars=None):
    x = model_input(batch["x"])
    mask = batch.get("mask", jnp.ones(batch["y"].shape, jnp.float32))
    head = None
    if (teacher is None and options.task == "lm" and 0 < options.logits_chunk < getattr(model, "vocab_size", 0)
        and hasattr(model, "hidden_and_head") and options.loss in tasks.LOSSES):  # your own loss: whole logits
      head = model.hidden_and_head(x, segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"),
                                   train=True, rngs=nnx.Rngs(dropout=rng))
    if head is not None:
      h_MD, w, vocab_axis = head
      sums = tasks.chunked_loss_sums(h_MD, w, batch["y"], mask, options.logits_chunk, vocab_axis=vocab_axis,
                                     dtype=h_MD.dtype)
      return sums["loss_sum"], {"loss": sums["loss_sum"], second: sums["correct"], "count": sums["count"]}
    logits = forward(model, batch, train=True, rngs=nnx.Rngs(dropout=rng))
    sums = tasks.loss_sums(options.task, logits, batch["y"], mask, options.loss)
    value = sums["loss_sum"] if teacher is None else teacher.objective(logits, x, mask, sums["loss_sum"],
                                                                        teacher_vars)
    return value, {"loss": sums["loss_sum"], second: sums["correct"], "count": sums["count"]}

  return loss


def objective(graphdef, loss_fn):
  """The function the train step differentiates: (params, model_state, batch, rng, *extra) -> (summed objective,
  (metric sums, new model state)), calling `loss_fn(model, batch, rng, *extra)` on the module merged from
  `graphdef` and the pure pytrees (traced once per compile: no graph traversal per step). The metric sums get
  `loss` (the objective's sum) unless the loss function gave its own. A mixture-of-experts model's auxiliary
  losses (`jaxmodels.models.moe.pop_moe_terms`: weighted, per target) are added to the objective, and its
  MOE_METRICS to the metric sums."""

  def fn(params, model_state, batch, rng, *extra):
    # copy=True: fresh Variables at this trace level, which the forward pass may mutate (BatchNorm).
    model = nnx.merge(graphdef, params, model_state, copy=True)
    out = loss_fn(model, batch, rng, *extra)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
      what = f"a tuple of {len(out)}" if isinstance(out, tuple) else "one array" if hasattr(out, "shape") else (
          type(out).__name__)
      raise ValueError(f"the loss function returned {what}: expected a pair (loss_sum, metrics), "
                       f"metrics a dict of sums holding 'count'")
    value, metrics = out
    if jnp.shape(value) != ():
      raise ValueError(f"the loss function's loss_sum has shape {jnp.shape(value)}: expected a scalar, the SUM of "
                       f"the loss over the batch's examples (or tokens)")
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    if shaped := sorted(f"{k} {v.shape}" for k, v in metrics.items() if v.shape != ()):
      raise ValueError(f"the loss function's metrics {', '.join(shaped)}: expected scalar sums over the batch")
    if "count" not in metrics:
      raise ValueError(f"the loss function's metrics {sorted(metrics)} lack 'count', the number of examples "
                       f"(or targets) its loss_sum and metric sums are summed over")
    penalty, moe_stats = pop_moe_terms(model)
    if penalty is not None:  # per-target means, as sums over the batch's count
      value = value + penalty * metrics["count"]
      metrics = {**metrics, **{k: v * metrics["count"] for k, v in moe_stats.items()}}
    _, _, new_model_state = split_model(model)
    return value, ({"loss": jax.lax.stop_gradient(value), **metrics}, new_model_state)

  return fn


def metric_names(keys) -> tuple[str, ...]:
  """Names of the train step's metric vector for a loss whose metric sums have `keys`: loss, the others (not
  `count`) sorted, grad_norm, skipped. Our tasks' loss gives `tasks.train_metric_names(task)`."""
  return ("loss", *sorted(k for k in keys if k not in ("loss", "count")), "grad_norm", "skipped")


def dropout_key(options: StepOptions, step: jax.Array) -> jax.Array:
  """`fold_in(PRNGKey(seed + 1), step)`: a pure function of the step, so the RNG needs no state of its own and a
  resumed run draws the same masks. Under pmap the key draws each device's rows of the global batch's masks
  (`parallel.rows_key`), so the masks are those of the jit strategies."""
  rng = jax.random.fold_in(jax.random.PRNGKey(options.seed + 1), step)
  return rng if options.axis_name is None else parallel.rows_key(rng, options.axis_name)


def _f32(tree):
  return jax.tree.map(lambda g: g.astype(jnp.float32), tree)


def gradients(grad_fn, params, model_state, batch, rng, micro_batches: int):
  """(float32 gradient sums, loss sums, model state) of `grad_fn` ((params, model_state, batch, rng) ->
  (grads, (sums, model state))) on this device's batch: one pass, or `micro_batches` = k passes in sequence
  inside the one compiled step, at a fraction of the activation memory, their sums added in float32.

  Micro-batch i is rows i, i+k, i+2k, ...: each device holds its share of every micro-batch (a contiguous split
  would put each on a fraction of the devices). Micro-batch i draws dropout key fold_in(rng, i).
  """
  if micro_batches == 1:
    grads, (sums, model_state) = grad_fn(params, model_state, batch, rng)
    return _f32(grads), sums, model_state
  # Strided: (B, ...) -> (B/k, k, ...) -> (k, B/k, ...) keeps every device's rows on it.
  micro = jax.tree.map(lambda a: parallel.constrain(
      jnp.moveaxis(a.reshape(-1, micro_batches, *a.shape[1:]), 1, 0), (None, "activation_batch")), batch)

  def body(carry, xs):
    model_state, grads_acc, sums_acc = carry
    mb, i = xs
    mb = jax.tree.map(lambda a: parallel.constrain(a, ("activation_batch",)), mb)
    grads, (sums, model_state) = grad_fn(params, model_state, mb, jax.random.fold_in(rng, i))
    return (model_state, jax.tree.map(jnp.add, grads_acc, _f32(grads)), jax.tree.map(jnp.add, sums_acc, sums)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  shapes = jax.eval_shape(grad_fn, params, model_state, jax.tree.map(lambda a: a[0], micro), rng)[1][0]
  zero_sums = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  (model_state, grads, sums), _ = jax.lax.scan(body, (model_state, zeros, zero_sums),
                                               (micro, jnp.arange(micro_batches)))
  return grads, sums, model_state


def across_devices(grads, sums, model_state, axis_name: str | None):
  """pmap (`axis_name`): gradient and metric sums summed over the devices, so the target count is global, and
  model state (BatchNorm statistics) averaged. Under jit the sharded program sums them itself: unchanged."""
  if axis_name is None:
    return grads, sums, model_state
  grads, sums = jax.lax.psum((grads, sums), axis_name)
  return grads, sums, jax.lax.pmean(model_state, axis_name)


def mean_gradients(grads, count: jax.Array, factor: jax.Array | None, params):
  """The one division of the float32 gradient sums: by the global target count (times the loss `factor` of
  float16's scaling), then in the parameters' dtypes for the optimizer. The result is the full batch's
  per-target mean gradient, exactly, however the mask falls over micro-batches and devices."""
  count = count if factor is None else count * factor
  return jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)


def verdict(loss: jax.Array, grad_norm: jax.Array, loss_scale, options: StepOptions):
  """(ok, the loss scale after this step): whether the step's update is kept, or None when nothing is checked
  (no test compiled). `train.skip_nonfinite` drops a step whose loss or gradient norm is not finite; float16's
  loss scaling drops one whose gradients overflowed and adjusts the scale (jaxmodels.optim.precision)."""
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) if options.skip_nonfinite else None
  if loss_scale is not None:  # an overflowed gradient (its norm inf or NaN) is skipped, and the scale halved
    finite = jnp.isfinite(grad_norm)
    ok = finite if ok is None else ok & finite
    loss_scale = precision.update_loss_scale(loss_scale, finite, options.loss_scale_period)
  return ok, loss_scale


def keep_or_skip(ok: jax.Array | None, new, old):
  """`new` where `ok`, else `old` (a skipped step), leaf by leaf; `new` when nothing is checked (`ok` None)."""
  return new if ok is None else jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_metrics(sums: dict, grad_norm: jax.Array, ok: jax.Array | None) -> jax.Array:
  """The step's metrics stacked in one float32 vector in `metric_names(sums)` order: each sum divided by the
  global count (the loss; accuracy, or a regression's mean absolute error; a custom loss's metrics), the gradient
  norm, skipped (1 for a skipped step). Each output array costs dispatch time on every step; the stack costs one."""
  skipped = jnp.zeros((), jnp.float32) if ok is None else 1.0 - ok.astype(jnp.float32)
  means = [(sums[k] / sums["count"]).astype(jnp.float32) for k in metric_names(sums)[:-2]]
  return jnp.stack([*means, grad_norm.astype(jnp.float32), skipped]).astype(jnp.float32)


def make_train_step(graphdef, tx, loss_fn, options: StepOptions = StepOptions(),
                    targets=lambda batch: batch["y"].size):
  """The pure train step for a model graph, an optimizer and a loss (the module docstring's protocol); the
  caller compiles it (jax.jit with the state donated, or jax.pmap with `options.axis_name`).

  train_step(state, batch, *extra) -> (state, metrics vector in `metric_names` order): the pieces above, in
  order; `extra` (a distillation teacher's arrays) goes to `loss_fn` after the rng. The rng is `dropout_key`'s,
  a pure function of (options.seed, step). A state with a `loss_scale` (float16) differentiates the loss sum
  times loss_scale / (`targets(batch)` / micro-batches, static: targets per micro-batch slot) and unscales the
  float32 gradient sums; a state with `ema_params` updates them by `options.ema_decay` after each kept update.
  The update uses the global per-count mean gradient, exactly, however examples fall over micro-batches
  (`options.grad_accum_steps`) and devices. Under context parallelism the loss gets the batch in its load-balanced
  token order, with `positions` (`jaxmodels.models.forward.context_order`).
  """
  loss_fn, o = objective(graphdef, loss_fn), options  # o: read on every line of the step

  def train_step(state: TrainState, batch, *extra):
    batch = context_order(batch)  # context parallelism's load-balanced token order (else the batch itself)
    factor = None if state.loss_scale is None else precision.loss_factor(state.loss_scale,
                                                                          targets(batch) / o.grad_accum_steps)
    trained, frozen = freezing.split_trainable(state.params, o.trainable)
    grad_fn = jax.grad(precision.scaled(lambda p, *a: loss_fn(freezing.merge_trainable(p, frozen), *a, *extra),
                                        factor), has_aux=True)
    grads, sums, model_state = gradients(grad_fn, trained, state.model_state, batch,
                                         dropout_key(o, state.step), o.grad_accum_steps)
    grads, sums, model_state = across_devices(grads, sums, model_state, o.axis_name)
    grads = mean_gradients(grads, sums["count"], factor, trained)
    grads = freezing.merge_trainable(grads, jax.tree.map(jnp.zeros_like, frozen))  # frozen ones: never read
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = precision.ema_update(state.ema_params, params, o.ema_decay)
    loss, grad_norm = sums["loss"] / sums["count"], optax.tree.norm(grads)
    ok, loss_scale = verdict(loss, grad_norm, state.loss_scale, o)
    params, model_state, opt_state, ema = keep_or_skip(
        ok, (params, model_state, opt_state, ema), (state.params, state.model_state, state.opt_state, state.ema_params))
    metrics = train_metrics(sums, grad_norm, ok)
    return state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                         ema_params=ema, loss_scale=loss_scale), metrics

  return train_step


def make_steps(graphdef, tx, options: StepOptions = StepOptions(), teacher=None):
  """The pure (train_step, eval_step) functions of our tasks for a model graph and an optimizer; the caller
  compiles them.

  train_step(state, batch[, teacher_vars]) -> (state, metrics vector): `make_train_step` of `task_loss`; with a
  `teacher` (distill.Teacher) it takes the teacher's arrays as a third argument and minimises the teacher's
  objective.

  eval_step(state, batch, totals) adds the batch's `tasks.eval_sums` (top-k hits for `eval_top_k` > 0;
  regression sums about `y_shift`) to `totals` inside the compiled step (no eager sum per batch; None: the
  batch's sums), summed over the pmap axis; a state with `ema_params` is evaluated with them.
  """
  o = options
  train_step = make_train_step(graphdef, tx, task_loss(options, teacher), options)

  def eval_step(state: TrainState, batch, totals=None):
    params = state.params if state.ema_params is None else precision.ema_as_params(state.ema_params, state.params)
    model = nnx.merge(graphdef, params, state.model_state)
    batch = context_order(batch)
    sums = tasks.eval_sums(o.task, forward(model, batch, train=False), batch["y"], batch["mask"], o.eval_top_k,
                           o.loss, o.y_shift)
    sums = sums if o.axis_name is None else jax.lax.psum(sums, o.axis_name)
    return sums if totals is None else jax.tree.map(jnp.add, totals, sums)

  return train_step, eval_step
