"""The lowest layer: what every other part of jaxmodels may use and that uses nothing of jaxmodels.

`errors` (the exceptions the CLI turns into one line), `host` (process settings
applied before JAX starts), `storage` (every path, local or `gs://`, and the
workdir lock), `compilation` (the persistent compile cache, compile timings,
recompile alarms), `hbm` (device memory: capacities, a step's bytes, OOM
messages), `extras` (optional dependencies and the `pip install` that brings
each), `imports` (objects named by import path, `package.module:name`) and
`fence` (arrays XLA cannot narrow to bfloat16 ahead of their uses).
"""

from jaxmodels.runtime.errors import NonFiniteLoss, Preempted, StorageError, UserError

__all__ = ["NonFiniteLoss", "Preempted", "StorageError", "UserError"]
