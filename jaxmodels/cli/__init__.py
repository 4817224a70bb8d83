"""The `jaxmodels` command line; `run_experiment` makes an experiment file runnable as a script."""

from jaxmodels.cli.main import entry, main, run_experiment

__all__ = ["entry", "main", "run_experiment"]
