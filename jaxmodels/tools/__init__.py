"""What you do with a trained run: evaluate it (`evaluate`), compress it (`compress`), sample from it
(`sample`), plot its curves (`plot`)."""

from jaxmodels.tools.evaluate import evaluate_model, evaluate_run
from jaxmodels.tools.plot import plot_runs
from jaxmodels.tools.sample import generate

__all__ = ["evaluate_model", "evaluate_run", "generate", "plot_runs"]
