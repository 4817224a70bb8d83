"""Benchmarks of compilation and steps (`timing`: `jaxmodels bench`) and the memory planner (`plan`:
`jaxmodels plan`)."""
