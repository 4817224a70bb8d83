"""What a model's outputs mean: each task's loss and on-device metric sums (`losses`; a language model's
cross-entropy by vocabulary chunks in `chunked`), and the scores derived from them on the host (`scores`:
precision, recall, F1, ROC AUC, R^2)."""

from jaxmodels.tasks.chunked import chunked_cross_entropy, chunked_loss_sums
from jaxmodels.tasks.losses import (
    AUC_BINS,
    AUC_LOGIT_RANGE,
    LOSS_CHOICES,
    LOSSES,
    TASKS,
    check_loss,
    eval_sums,
    is_loss,
    loss_function,
    loss_sums,
    train_metric_names,
)
from jaxmodels.tasks.scores import eval_metric_names, eval_scores, top_k_name

__all__ = ["AUC_BINS", "AUC_LOGIT_RANGE", "LOSS_CHOICES", "LOSSES", "TASKS", "check_loss", "chunked_cross_entropy",
           "chunked_loss_sums", "eval_metric_names", "eval_scores", "eval_sums", "is_loss", "loss_function",
           "loss_sums", "top_k_name", "train_metric_names"]
