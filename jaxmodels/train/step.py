"""The compiled train and eval steps: `make_steps(graphdef, tx, ...)` returns pure functions of pytrees.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmodels import parallel, tasks
from jaxmodels.models.forward import forward, model_input
from jaxmodels.optim import precision
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.train.actions import summarize


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
  jaxmodels.optim.precision). A state with `ema_params` updates them by `ema_decay` after each applied update, and
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
