"""Benchmarks of compilation and steps (`timing`: `jaxmodels bench`) and the memory planner (`plan`:
`jaxmodels plan`). `compile_stats(fn, *args)` measures a research function's compile (trace, lower and compile
seconds, HLO counts, XLA's FLOPs and bytes, memory and the fits-in-HBM verdict), as `jaxmodels bench compile`
measures the train step."""

from jaxmodels.bench.timing import compile_stats, topology_devices

__all__ = ["compile_stats", "topology_devices"]
