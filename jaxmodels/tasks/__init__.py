"""What a model's outputs mean: each task's loss and on-device metric sums (`losses`), and the scores derived
from them on the host (`scores`: precision, recall, F1, ROC AUC, R^2)."""

from jaxmodels.tasks.losses import (
    AUC_BINS,
    AUC_LOGIT_RANGE,
    LOSSES,
    TASKS,
    eval_sums,
    loss_sums,
    train_metric_names,
)

__all__ = ["AUC_BINS", "AUC_LOGIT_RANGE", "LOSSES", "TASKS", "eval_sums", "loss_sums", "train_metric_names"]
