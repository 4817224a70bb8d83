"""`jaxmodels plot`: training curves (and confusion matrices) of runs as a PNG."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.tools.plot import plot_runs

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels plot RUN [RUN ...] [--metric loss] --out curves.png [--confusion]

Draws the train and eval curves of one metric (any name in the runs' metrics.jsonl:
loss, accuracy, f1_macro, r2, ...) against the step for each RUN into a PNG;
--confusion adds each run's newest confusion matrix (classifiers).
"""
  a = parse_args(prog, args, [("runs", dict(nargs="+")), ("--metric", dict(default="loss")),
                              ("--out", dict(required=True)), ("--confusion", dict(action="store_true"))])
  print(f"wrote {plot_runs(a.runs, a.metric, a.out, a.confusion)}")
  return 0
