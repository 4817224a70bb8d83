"""Parallelism: device meshes, sharding rules, multi-process jobs and the local launcher.

`parallel.strategy` picks the layout: `single` (one device), `dp` (batch over
`data`, parameters replicated), `fsdp` (parameters and optimizer state sharded
over `fsdp`, batch over `data` x `fsdp`), `tp` (Megatron tensor parallelism of
attention heads and MLPs over `tensor`, with sequence parallelism between them;
combine with dp/fsdp through `parallel.mesh`), or `pmap` (the classic `jax.pmap` data-parallel step). A `stage`
mesh axis adds pipeline parallelism to the jit strategies (`jaxmodels.parallel.pipeline`); an `expert` mesh axis
(`parallel.mesh=data=2,expert=4`) splits mixture-of-experts layers' experts over its devices
(`jaxmodels.parallel.experts`: all-to-all dispatch); a `context` axis adds context parallelism
(`jaxmodels.parallel.context`): each sequence split over it, attention by a ring of key/value blocks.
"""

from jaxmodels.parallel.distributed import initialize
from jaxmodels.parallel.keys import rows_key
from jaxmodels.parallel.pipeline import Schedule, pipeline_schedule
from jaxmodels.parallel.sharding import (
                                         ACTIVATION_AXES,
                                         MESH_AXES,
                                         STRATEGIES,
                                         Layout,
                                         PmapLayout,
                                         activation_sharding,
                                         constrain,
                                         fetch,
                                         make_mesh,
                                         opt_state_shardings,
                                         param_shardings,
                                         partition_specs,
                                         per_device_bytes,
                                         process_rows,
)

__all__ = ["ACTIVATION_AXES", "MESH_AXES", "STRATEGIES", "Layout", "PmapLayout", "activation_sharding",
           "constrain", "fetch", "initialize", "make_mesh", "opt_state_shardings",
           "param_shardings", "partition_specs", "per_device_bytes", "pipeline_schedule", "process_rows", "rows_key", "Schedule"]
