"""Optimizers: the factory (`make_optimizer`, `make_schedule`), weight-decay masks, magnitude pruning as an Optax
transformation (`pruning`), and the parts of the train state beyond the optimizer's (`precision`: float16 loss
scaling, the parameter EMA)."""

from jaxmodels.optim.decay import decay_mask
from jaxmodels.optim.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    make_optimizer,
    make_schedule,
)

__all__ = ["OPTIMIZERS", "SCHEDULES", "decay_mask", "make_optimizer", "make_schedule"]
