"""`jaxmodels eval`: a run's checkpoint evaluated on its eval split or other data."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.config.experiments import OVERRIDE
from jaxmodels.tools.evaluate import evaluate_run

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels eval --workdir DIR [--step N] [--config.data.KEY=VALUE ...]

Evaluates checkpoint N (default: the newest) of the run in DIR on its eval split,
or on other data given by --config.data.* overrides (e.g. --config.data.path=other.npz,
arrays of the same shapes), prints the metrics and writes DIR/eval_N.json (atomically;
it may run beside the training run in DIR: a damaged or deleted newest checkpoint
makes it read the newest intact one).
"""
  overrides = [x for x in args if x.startswith(OVERRIDE)]
  a = parse_args(prog, [x for x in args if not x.startswith(OVERRIDE)],
                 [("--workdir", dict(required=True)), ("--step", dict(type=int, default=None))])
  step, metrics = evaluate_run(a.workdir, a.step, tuple(overrides), write=True)
  shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
  print(f"eval: {'export' if step is None else f'step {step}'} {shown}")
  return 0
