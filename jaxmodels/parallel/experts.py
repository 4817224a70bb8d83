"""Expert parallelism: a mixture-of-experts layer's experts split over the `expert` mesh axis.

The batch is split over `expert` too (`BATCH_AXES`), so outside the MoE layers the axis is one more
data-parallel axis. Inside them, `run` calls the layer's dispatch on each device's tokens (`jax.shard_map`)
with the device's num_experts / expert experts: the token rows travel to their experts' devices and back by
`jax.lax.all_to_all` over `expert` (GShard, Lepikhin et al. 2020). Under `tensor` the experts' hidden width
is split too (Megatron's column- then row-parallel MLP, the partial outputs summed by a psum over `tensor`);
`fsdp`-split expert weights are gathered at the layer's entry, as every FSDP weight is.
"""

import functools

import jax
from jax.sharding import PartitionSpec as P

from jaxmodels.parallel.sharding import activation_spec, active_sharding

__all__ = ["EXPERT", "run"]

EXPERT = "expert"  # the mesh axis, and the logical parameter axis of the experts' dimension


def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def run(dispatch, mlp, x_MD, experts_MK, weights_MK, expert_weights: dict, *, num_experts: int,
        capacity_factor: float):
  """`dispatch(x_MD, experts_MK, weights_MK, local_mlp, num_experts, capacity_factor, axis_name=, shards=)`,
  `local_mlp` being `mlp` bound to `expert_weights` ((E, ...) arrays by keyword; `gate_GDF`/`up_GDF` split on
  their last axis under `tensor`, `down_GFD` on its middle one). Returns dispatch's (y_MD, kept), kept summed
  over the devices.

  Outside `activation_sharding` the whole computation runs as written (one device's view). Under it, each
  device runs it on its token rows (split over the batch's mesh axes) and its experts. ValueError when the
  `expert` axis does not divide num_experts or cannot split the token rows.
  """
  active = active_sharding()
  if active is None:
    return dispatch(x_MD, experts_MK, weights_MK, functools.partial(mlp, **expert_weights), num_experts,
                    capacity_factor)
  mesh, rules = active
  shards = mesh.shape.get(EXPERT, 1)
  rows = activation_spec(x_MD.shape, ("activation_batch",), mesh, rules)[0]
  if num_experts % shards:
    raise ValueError(f"num_experts={num_experts} cannot be split over mesh axis {EXPERT!r} of size {shards}")
  if shards > 1 and EXPERT not in _axes(rows):
    raise ValueError(f"{x_MD.shape[0]} token rows cannot be split over the batch's mesh axes {dict(mesh.shape)} "
                     f"with {EXPERT!r} among them: expert parallelism needs each device's own tokens")
  expert = EXPERT if shards > 1 else None
  tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
  specs = {"up_GDF": P(expert, None, tensor), "gate_GDF": P(expert, None, tensor), "down_GFD": P(expert, tensor)}

  def local(x, experts, weights, local_weights):
    y, kept = dispatch(x, experts, weights, functools.partial(mlp, **local_weights), num_experts, capacity_factor,
                       axis_name=expert, shards=shards)
    return (y if tensor is None else jax.lax.psum(y, tensor)), kept[None]

  y_MD, kept = jax.shard_map(local, mesh=mesh, in_specs=(P(rows), P(rows), P(rows),
                                                         {k: specs[k] for k in expert_weights}),
                             out_specs=(P(rows), P(_axes(rows) or None)))(x_MD, experts_MK, weights_MK,
                                                                          expert_weights)
  return y_MD, kept.sum()
