"""The training loop, built from small pieces: `experiment` (config -> data, model, optimizer, layout),
`step` (the compiled train and eval steps), `loop` (`train_and_evaluate`), `actions` (the loop's periodic work),
`metrics` (what a run writes and prints) and `distill` (a teacher's soft targets)."""

from jaxmodels.train.experiment import Experiment, build_experiment
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.step import StepOptions, make_steps, step_options

__all__ = ["Experiment", "StepOptions", "build_experiment", "make_steps", "step_options", "train_and_evaluate"]
