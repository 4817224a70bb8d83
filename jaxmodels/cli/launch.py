"""`jaxmodels launch`: a simulated multi-host job of CPU processes on this machine."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.parallel.launch import launch
from jaxmodels.runtime.errors import UserError

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels launch --processes N [--devices-per-process D] [--port P] -- COMMAND [ARGS ...]

Simulates a multi-host job on this machine: N CPU processes, each with D CPU
devices, joined through jax.distributed over 127.0.0.1 (gloo collectives), each
running `jaxmodels COMMAND ARGS`. Output lines carry a [i] process prefix. If
one process fails, the others are stopped and the launcher exits non-zero.
Example: jaxmodels launch --processes 2 --devices-per-process 2 -- train
  --config experiments/digits_cnn.py --config.parallel.strategy=dp
"""
  if "--" not in args:
    raise UserError("launch needs `--` before the command to run, e.g. -- train --config ...")
  split = args.index("--")
  a = parse_args(prog, args[:split], [("--processes", dict(type=int, required=True)),
                                      ("--devices-per-process", dict(type=int, default=1)),
                                      ("--port", dict(type=int, default=0))])
  if a.processes < 1 or a.devices_per_process < 1 or not args[split + 1:]:
    raise UserError("--processes and --devices-per-process must be positive, and a command must follow --")
  return launch(a.processes, args[split + 1:], a.devices_per_process, a.port or None)
