"""`jaxmodels plan`: the settings of an experiment that fit a TPU slice, fastest first."""

from jaxmodels.bench import plan
from jaxmodels.cli.arguments import parse_args
from jaxmodels.config import parse_experiment_args
from jaxmodels.config.experiments import OVERRIDE

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels plan --config experiments/X.py [--topology v5e:2x4[,slices=2]] [--global-batch 256]
             [--try parallel.strategy=fsdp,dp --try model.remat=none,dots,full --try train.grad_accum_steps=1,2,4 ...]
             [--config.K=V ...] [--json plan.json] [--plot plan.png] [--workers N] [--timeout S]

Compiles the train step of every candidate (the cartesian product of the --try
lists, values as in `bench compile --sweep`) ahead of time for the TPU topology
(without --topology: for the attached devices), each in a worker process
(--workers at once, default one per two CPU cores and 4 GiB of free host memory;
--timeout seconds each, default 600). Reports each candidate's bytes per device
(arguments + outputs not aliased + temporaries + code, from XLA's memory
analysis) against the chip's memory, drops those that do not fit, ranks the rest
by XLA's estimated step time (else by FLOPs and bytes accessed per device) and
prints the `jaxmodels train` command of the best. --global-batch sets
train.batch_size for every candidate. --try parallel.mesh=stages (or =contexts)
stands for every pipeline (or context) split the devices, model and batch allow.
Exit status 1 when nothing fits.
"""
  config, path, rest = parse_experiment_args(args)
  a = parse_args(prog, rest, [("--try", dict(dest="tries", action="append", default=[])),
                              ("--topology", dict(default="")), ("--json", dict(default="")),
                              ("--plot", dict(default="")), ("--global-batch", dict(type=int, default=0)),
                              ("--workers", dict(type=int, default=0)), ("--timeout", dict(type=float, default=600.0))])
  return plan.run_plan(config, plan.PlanArgs(
      config_path=path, overrides=[x for x in args if x.startswith(OVERRIDE)], tries=a.tries, topology=a.topology,
      global_batch=a.global_batch, out=a.json, plot=a.plot, workers=a.workers, timeout=a.timeout))
