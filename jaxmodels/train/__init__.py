"""The training loop, built from small pieces: `experiment` (config -> data, model, optimizer, layout),
`step` (the compiled train and eval steps), `loop` (`train_and_evaluate`), `actions` (the loop's periodic work),
`metrics` (what a run writes and prints) and `distill` (a teacher's soft targets)."""

from jaxmodels.train.experiment import Experiment, build_experiment
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.step import make_steps

__all__ = ["Experiment", "build_experiment", "make_steps", "train_and_evaluate"]
