"""`jaxmodels train`: an experiment file, its overrides, into a workdir."""

import os

from jaxmodels import parallel
from jaxmodels.cli.arguments import parse_args
from jaxmodels.config import parse_experiment_args
from jaxmodels.runtime import compilation
from jaxmodels.train.loop import train_and_evaluate

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels train --config experiments/X.py [--workdir DIR] [--config.GROUP.KEY=VALUE ...]

Trains the experiment into DIR (default runs/<experiment name>; a local path or
gs://bucket/dir): config.json, metrics.jsonl and checkpoints/. A DIR that holds a
checkpoint resumes from it; DIR/LOCK keeps a second run out while one runs.
Every key of jaxmodels/config/defaults.py can be overridden, e.g. --config.train.steps=500.
"""
  config, path, rest = parse_experiment_args(args)
  stem = os.path.splitext(os.path.basename(path))[0]
  a = parse_args(prog, rest, [("--workdir", dict(default=os.path.join("runs", stem)))])
  parallel.initialize(config.parallel)  # joins a multi-process job, if this is one, before any backend use
  compilation.enable_persistent_cache()
  train_and_evaluate(config, a.workdir)
  return 0
