"""Pipeline parallelism over the `stage` mesh axis: a circular (interleaved) micro-batch schedule run inside the
one jitted step, in the SPMD style of MaxText's `pipeline.py` (no per-stage programs).

A stack of L layers, stored as one scanned (L, ...) tree, runs as S `stages` x R `repeats` x K layers per stage
(L = S x R x K): layer l belongs to repeat r = l // (S K), stage s = (l // K) % S. Device group s of the `stage`
axis holds stage s of every repeat, so with R > 1 each device holds R non-adjacent slices of the stack (the
circular schedule of Narayanan et al. 2021, "Efficient large-scale language model training on GPU clusters",
Megatron-LM's interleaved pipeline). The batch is cut into N micro-batches; at iteration t stage s runs
item j = t - s of the N x R items (micro-batch j mod N in repeat j // N), all stages at once as one
`jax.vmap` over the stage dimension (`spmd_axis_name="stage"`, so each device computes its own stage), and
the stages' outputs move one stage on by `jnp.roll` over that stage-sharded dimension, which XLA lowers to a
collective permute. The last stage's outputs go to a buffer of the N micro-batches, from which stage 0 reads
its next input: the batch's rows in repeat 0, the previous repeat's outputs after it (hence N >= S: a
micro-batch's output must be back before stage 0 needs it). After N R + S - 1 iterations the buffer holds the
stack's output.

Each stage is busy in N R of those iterations, so the idle (bubble) fraction is
(S - 1) / (N R + S - 1) (`Schedule.bubble_fraction`; Narayanan et al. 2021, eq. 1 with the interleaved
schedule's 1/v: the bubble of GPipe, Huang et al. 2019, shrunk by the R repeats). Bubble iterations compute on
placeholder rows whose results are never used.

Parameters keep their scanned (L, ...) layout, split on the layer axis over `stage` (`parallel.rules`
`("layers", "stage")`): with R = 1 each device's contiguous L / S layers are its stage; with R > 1 the step
regroups the stack as (R, S, K, ...), which moves (R - 1) / R of each device's layers between stage devices
once per step (and their gradients back). Checkpoints are therefore the same with or without stages.
"""

import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels.parallel.sharding import active_mesh

__all__ = ["active_schedule", "pipeline", "pipeline_schedule", "Schedule", "schedule_for", "STAGE"]

STAGE = "stage"  # the mesh axis
_OPTIONS = contextvars.ContextVar("jaxmodels_pipeline_options", default=(0, 1))  # (microbatches, repeats)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """S `stages`, N `microbatches`, R `repeats` (circular: each device runs R non-adjacent stages of layers)."""

  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def iterations(self) -> int:
    """N R + S - 1: the loop's trip count."""
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """(S - 1) / (N R + S - 1): the share of the iterations each stage idles (Narayanan et al. 2021)."""
    return (self.stages - 1) / self.iterations

  def check(self, num_layers: int, batch_size: int | None = None) -> None:
    """ValueError, one line naming the key, unless the schedule can run `num_layers` layers on `batch_size` rows."""
    s, n, r = self.stages, self.microbatches, self.repeats
    if r < 1 or n < 1:
      raise ValueError(f"parallel.pipeline_repeats={r} and parallel.pipeline_microbatches={n} must be positive")
    if num_layers % (s * r):
      raise ValueError(f"model.num_layers={num_layers} does not divide into stage={s} x "
                       f"parallel.pipeline_repeats={r} equal stages: use a multiple of {s * r} layers")
    if n < s:
      raise ValueError(f"parallel.pipeline_microbatches={n} is fewer than the stage={s} stages: every stage "
                       f"needs a micro-batch in flight (use at least {s})")
    if batch_size is not None and batch_size % n:
      raise ValueError(f"a batch of {batch_size} rows (train.batch_size / train.grad_accum_steps) does not split "
                       f"into parallel.pipeline_microbatches={n} micro-batches")


class pipeline_schedule:  # pylint: disable=invalid-name  (a function in use: `with pipeline_schedule(...)`)
  """`pipeline_schedule(microbatches, repeats)`: a context, and a function decorator, within which a stage-split
  mesh runs N = `microbatches` (0: one per stage) and R = `repeats` (`parallel.pipeline_*`); outside it N = S,
  R = 1."""

  def __init__(self, microbatches: int = 0, repeats: int = 1):
    self.options = (microbatches, repeats)
    self._tokens = []

  def __enter__(self):
    self._tokens.append(_OPTIONS.set(self.options))
    return self

  def __exit__(self, *exc):
    _OPTIONS.reset(self._tokens.pop())

  def __call__(self, fn):
    @functools.wraps(fn)
    def scheduled(*args, **kwargs):
      with self:
        return fn(*args, **kwargs)
    return scheduled


def schedule_for(mesh, microbatches: int = 0, repeats: int = 1) -> Schedule | None:
  """The Schedule `mesh` runs with `parallel.pipeline_microbatches` (0: one per stage) and `_repeats`; None
  without a `stage` axis of more than one device."""
  stages = 1 if mesh is None else mesh.shape.get(STAGE, 1)
  return None if stages == 1 else Schedule(stages, microbatches or stages, repeats)


def active_schedule() -> Schedule | None:
  """The Schedule of the mesh `jaxmodels.parallel.activation_sharding` pins to, with the enclosing
  `pipeline_schedule`'s options; None unless its `stage` axis has more than one device."""
  return schedule_for(active_mesh(), *_OPTIONS.get())


def _on_stages(x, mesh):
  """x pinned to the mesh's `stage` axis on its leading dimension, the rest left to XLA."""
  spec = P(STAGE, *(P.UNCONSTRAINED,) * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def pipeline(stage_fn, layers, x_BTD, per_example, schedule: Schedule):
  """The stack's output (B, T, D) for input x_BTD, run as `schedule` over the active mesh's `stage` axis.

  `layers`: a pytree whose leaves hold the L layers on a leading axis (the scanned parameters, dropout keys,
  layer indices); `per_example`: a pytree of arrays with a leading B axis (positions, masks) or None.
  `stage_fn(layers_K, x_MD, per_example_b, microbatch)` runs K consecutive layers (leaves with a leading K
  axis) on one micro-batch's token rows x_MD (M = b T, b = B / N rows of the batch, interleaved: micro-batch
  m holds rows m, m + N, m + 2N, ..., so each keeps its share on every data-parallel device) and returns the
  rows; `microbatch` (int32 scalar) tells it which. Raises ValueError for a schedule the layers or batch do
  not fit (`Schedule.check`).
  """
  mesh = active_mesh()
  S, N, R = schedule.stages, schedule.microbatches, schedule.repeats
  B, T, D = x_BTD.shape
  L = jax.tree.leaves(layers)[0].shape[0]
  schedule.check(L, B)
  K, b = L // (S * R), B // N
  layers_SRK = jax.tree.map(lambda a: _on_stages(jnp.swapaxes(a.reshape(R, S, K, *a.shape[1:]), 0, 1), mesh), layers)
  split = lambda a: jnp.swapaxes(a.reshape(b, N, *a.shape[1:]), 0, 1)  # (B, ...) -> (N, b, ...)
  per_example_N = jax.tree.map(split, per_example)
  buffer_NMD = split(x_BTD).reshape(N, b * T, D)

  def run_stage(layers_RK, x_MD, repeat, microbatch):
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, repeat, 0, keepdims=False)
    mine = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, microbatch, 0, keepdims=False), per_example_N)
    return stage_fn(jax.tree.map(pick, layers_RK), x_MD, mine, microbatch)

  # Each stage's iteration is rematerialized (its forward recomputed in the backward pass, saving what
  # model.remat saves inside it): saved, the layers a stage picks for its repeat would be one copy of the device's
  # layers per iteration, N R + S - 1 copies (XLA's CPU temporaries 2.7x those of this form, 8 layers of 256 x 1024).
  run_stage = jax.checkpoint(run_stage, policy=jax.checkpoint_policies.nothing_saveable)
  stages = jax.vmap(run_stage, spmd_axis_name=STAGE)
  s_S = jnp.arange(S)

  def iteration(carry, t):
    state_SMD, buffer_NMD = carry
    item_S = t - s_S  # the item each stage works on; outside [0, N R) a bubble
    first = buffer_NMD[t % N]  # stage 0's input: a fresh micro-batch, or its output from the previous repeat
    state_SMD = _on_stages(jnp.where((s_S == 0)[:, None, None], first[None], state_SMD), mesh)
    out_SMD = _on_stages(stages(layers_SRK, state_SMD, jnp.clip(item_S // N, 0, R - 1), item_S % N), mesh)
    done = t - (S - 1)  # the item the last stage finished
    slot = done % N
    kept = jnp.where(done >= 0, out_SMD[S - 1], buffer_NMD[slot])
    buffer_NMD = jax.lax.dynamic_update_index_in_dim(buffer_NMD, kept, slot, 0)
    return (_on_stages(jnp.roll(out_SMD, 1, axis=0), mesh), buffer_NMD), None  # roll: a collective permute

  state_SMD = _on_stages(jnp.zeros((S, b * T, D), x_BTD.dtype), mesh)
  (_, buffer_NMD), _ = jax.lax.scan(iteration, (state_SMD, buffer_NMD), jnp.arange(schedule.iterations))
  return jnp.swapaxes(buffer_NMD.reshape(N, b, T, D), 0, 1).reshape(B, T, D)
