"""The training loop, built from small pieces: `trainer` (`Trainer`, your loss and batches through the loop, and
the loop itself), `experiment` (config -> data, model, optimizer, layout),
`step` (the compiled train and eval steps), `loop` (`train_and_evaluate`), `actions` (the loop's periodic work),
`metrics` (what a run writes and prints) and `distill` (a teacher's soft targets)."""

from jaxmodels.train.experiment import Experiment, build_experiment
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.step import StepOptions, make_steps, make_train_step, step_options
from jaxmodels.train.trainer import Trainer

__all__ = ["Experiment", "StepOptions", "Trainer", "build_experiment", "make_steps", "make_train_step",
           "step_options", "train_and_evaluate"]
