"""Optimizers: the factory (`make_optimizer`, `make_schedule`, from keyword arguments; `make_optimizer_from_config`,
`make_schedule_from_config` from the `train.*` group), weight-decay masks, magnitude pruning as an Optax
transformation (`pruning`), and the parts of the train state beyond the optimizer's (`precision`: float16 loss
scaling, the parameter EMA); which parameters train and how fast (`freezing`: `train.freeze`, LoRA's adapters,
`train.lr_multipliers`)."""

from jaxmodels.optim.decay import decay_mask
from jaxmodels.optim.freezing import trainable_filter
from jaxmodels.optim.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    make_optimizer,
    make_optimizer_from_config,
    make_schedule,
    make_schedule_from_config,
)

__all__ = ["OPTIMIZERS", "SCHEDULES", "decay_mask", "make_optimizer", "make_optimizer_from_config", "make_schedule",
           "make_schedule_from_config", "trainable_filter"]
