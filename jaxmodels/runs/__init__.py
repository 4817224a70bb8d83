"""Where a trained run lives and how it is read back: the train state (`state`), Orbax checkpoints
(`checkpoint`), and parameter exports for research code (`export`: `load_model`, `load_params`)."""

from jaxmodels.runs.checkpoint import Checkpoints
from jaxmodels.runs.export import load_model, load_params, load_trained_model, save_model
from jaxmodels.runs.state import TrainState, split_model

__all__ = ["Checkpoints", "TrainState", "load_model", "load_params", "load_trained_model", "save_model", "split_model"]
