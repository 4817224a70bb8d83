"""`jaxmodels plot RUN [RUN ...] --metric loss --out curves.png`: training curves of runs, with matplotlib.

One panel of the metric against the step, a train and an eval line per run (from each run's metrics.jsonl);
with `--confusion`, a panel per run with its newest confusion matrix (`confusion_<step>.json`, classifiers).
Files are read and the PNG written through storage, so runs and output may be on gs://.
"""

import io
import json

from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["plot_runs"]


def _records(run) -> list[dict]:
  path = storage.path(run) / "metrics.jsonl"
  if not path.is_file():
    raise UserError(f"{path} not found: is {run} a jaxmodels workdir?")
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line torn by a kill: the training loop drops it on resume too
      continue
  return records


def _newest_confusion(run):
  files = sorted(storage.path(run).glob("confusion_*.json"), key=lambda p: int(p.stem.split("_")[1]))
  if not files:
    raise UserError(f"{run} has no confusion_<step>.json (only classifiers write one)")
  return json.loads(files[-1].read_text())


def plot_runs(runs: list[str], metric: str, out: str, confusion: bool = False) -> str:
  """Writes the PNG to `out` and returns its path; UserError when no run has `metric`."""
  extras.require("matplotlib", "jaxmodels plot").use("Agg")
  plt = extras.require("matplotlib.pyplot", "jaxmodels plot")
  panels = 1 + (len(runs) if confusion else 0)
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
  curves = axes[0][0]
  drawn = 0
  for run in runs:
    records = _records(run)
    for split, style in (("train", "-"), ("eval", "o--")):
      points = [(r["step"], r[metric]) for r in records if r.get("split") == split
                and isinstance(r.get(metric), (int, float))]
      if points:
        curves.plot(*zip(*points), style, label=f"{run} {split}")
        drawn += 1
  if not drawn:
    raise UserError(f"no run has a numeric {metric!r} in its metrics.jsonl")
  curves.set_xlabel("step")
  curves.set_ylabel(metric)
  curves.legend(fontsize="small")
  for ax, run in zip(axes[0][1:], runs if confusion else []):
    saved = _newest_confusion(run)
    image = ax.imshow(saved["confusion"], cmap="Blues")
    ax.set_title(f"{run} step {saved['step']}")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  storage.path(out).write_bytes(buffer.getvalue())
  return out
