"""What an evaluation reports (`eval_scores`, `eval_metric_names`): scores derived on the host from exact counts.

The eval step accumulates the confusion matrix on the device (int32 counts,
summed across eval batches and devices); precision, recall and F1 follow from
it exactly, in float64, here. Hand-written rather than scikit-learn's
`precision_recall_fscore_support`: that function wants the predictions
themselves, which would mean fetching every prediction of the eval split to the
host. Definitions match scikit-learn's with `zero_division=0` (tests check it):
a class never predicted has precision 0, a class absent from the labels recall 0,
"macro" averages the classes that occur in the labels or the predictions (as
scikit-learn does when it is not given the labels), and "weighted" weighs each
class by its number of true examples.
"""

import math

import numpy as np

__all__ = ["binary_scores", "confusion_scores", "eval_metric_names", "eval_scores", "multilabel_scores",
           "regression_scores", "top_k_name"]


def confusion_scores(confusion_CC: np.ndarray) -> dict:
  """Scores of a (C, C) confusion matrix, rows the true class and columns the predicted one.

  Returns floats `precision_macro`, `recall_macro`, `f1_macro`, `precision_weighted`,
  `recall_weighted`, `f1_weighted` and lists of C floats `precision_per_class`,
  `recall_per_class`, `f1_per_class`.
  """
  cm = np.asarray(confusion_CC, np.float64)
  true_pos, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
  precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
  recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
  weights = support / support.sum() if support.sum() else np.zeros_like(support)
  present = (support + predicted) > 0
  out = {}
  for name, per_class in (("precision", precision), ("recall", recall), ("f1", f1)):
    out[f"{name}_macro"] = float(per_class[present].mean())
    out[f"{name}_weighted"] = float(np.sum(per_class * weights))
  for name, per_class in (("precision", precision), ("recall", recall), ("f1", f1)):
    out[f"{name}_per_class"] = [float(v) for v in per_class]
  return out


def binary_scores(confusion_22: np.ndarray, auc_hist_2N: np.ndarray) -> dict[str, float]:
  """`precision`, `recall`, `f1` of the positive class (scikit-learn's average="binary") and `roc_auc`.

  ROC AUC from the two classes' logit histograms: the probability that a positive
  outranks a negative, ties (the same bin) counted half, as scikit-learn counts
  equal scores; bins of 1/128 of a logit unit make it equal sklearn's to about 1e-3.
  """
  cm = np.asarray(confusion_22, np.float64)
  true_pos, predicted, actual = cm[1, 1], cm[:, 1].sum(), cm[1].sum()
  precision = true_pos / predicted if predicted else 0.0
  recall = true_pos / actual if actual else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  negatives, positives = np.asarray(auc_hist_2N, np.float64)
  below = np.cumsum(negatives) - negatives  # negatives in lower bins than each bin
  pairs = positives.sum() * negatives.sum()
  auc = float(np.sum(positives * (below + 0.5 * negatives)) / pairs) if pairs else float("nan")
  return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "roc_auc": auc}


def multilabel_scores(label_counts_3C: np.ndarray) -> dict:
  """From per-label (true positives, predicted, actual) counts: `f1_micro`, `precision_macro`, `recall_macro`,
  `f1_macro` (the mean over labels, scikit-learn's average="macro" with zero_division=0) and `f1_per_label`."""
  true_pos, predicted, actual = np.asarray(label_counts_3C, np.float64)
  safe = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)
  precision, recall = safe(true_pos, predicted), safe(true_pos, actual)
  f1 = safe(2 * precision * recall, precision + recall)
  micro = 2 * true_pos.sum() / (predicted.sum() + actual.sum()) if predicted.sum() + actual.sum() else 0.0
  return {"f1_micro": float(micro), "precision_macro": float(precision.mean()), "recall_macro": float(recall.mean()),
          "f1_macro": float(f1.mean()), "f1_per_label": [float(v) for v in f1]}


def regression_scores(totals: dict) -> dict[str, float]:
  """`mse`, `mae` (over every target element) and `r2`, the coefficient of determination of each output
  averaged over outputs (scikit-learn's r2_score, multioutput="uniform_average"), from per-output sums."""
  get = lambda k: np.asarray(totals[k], np.float64).ravel()
  n, y_sum, y_sq_sum, sq_error = get("target_count"), get("y_sum"), get("y_sq_sum"), get("sq_error_sum")
  total_sq = y_sq_sum - y_sum ** 2 / n  # sum of squares about each output's mean
  r2 = np.where(total_sq > 0, 1 - sq_error / np.where(total_sq > 0, total_sq, 1), 0.0)
  return {"mse": float(sq_error.sum() / n.sum()), "mae": float(get("abs_error_sum").sum() / n.sum()),
          "r2": float(r2.mean())}


def eval_metric_names(task: str, unit: str = "token") -> tuple[str, ...]:
  """The float metrics `eval_scores` reports for `task`, in its order, less a classifier's `top_k_name(k)` (after
  accuracy, where `eval_sums` counts top-k hits): what early stopping and `checkpoint.keep_best` may name. `unit`:
  what a language model's token is (bits_per_<unit>)."""
  return {"lm": ("loss", "accuracy", "perplexity", f"bits_per_{unit}"),
          "classify": ("loss", "accuracy") + tuple(f"{s}_{a}" for s in ("precision", "recall", "f1")
                                                   for a in ("macro", "weighted")),
          "binary": ("loss", "accuracy", "precision", "recall", "f1", "roc_auc"),
          "multilabel": ("loss", "accuracy", "f1_micro", "precision_macro", "recall_macro", "f1_macro"),
          "regress": ("loss", "mse", "mae", "r2"),
          "seq2seq": ("loss", "accuracy", "exact_match", "perplexity", f"bits_per_{unit}")}[task]


def top_k_name(k: int) -> str:
  """The metric of `train.eval_top_k` = k: the share of targets whose label is among the k highest logits."""
  return f"top{k}_accuracy"


def eval_scores(task: str, totals: dict, unit: str = "token", top_k: int = 0) -> dict:
  """An evaluation's metrics from its summed `totals` (jaxmodels.tasks.eval_sums, fetched to the host): the floats
  of `eval_metric_names` (and `top_k_name(top_k)` where the totals count top-k hits), per-class or per-label
  lists, and a classifier's `confusion` matrix as nested lists (rows the true class, columns the predicted one).

  Loss is the mean per target of the task's loss: cross-entropy in nats per example (classification) or per token
  (language models, which also report perplexity and bits per `unit`).
  """
  count = float(totals["count"])
  metrics = {"loss": float(totals["loss_sum"]) / count}
  if task == "regress":
    metrics.update(regression_scores(totals))
  else:
    metrics["accuracy"] = float(totals["correct"]) / count  # multilabel: the share of labels right
  if task == "binary":
    metrics.update(binary_scores(totals["confusion"], totals["auc_hist"]))
  if task == "multilabel":
    metrics.update(multilabel_scores(totals["label_counts"]))
  if "top_k_correct" in totals:
    metrics[top_k_name(top_k)] = float(totals["top_k_correct"]) / count
  if task == "seq2seq":
    metrics["exact_match"] = float(totals["exact"]) / float(totals["sequences"])
  if task in ("lm", "seq2seq"):
    metrics["perplexity"] = math.exp(metrics["loss"])
    metrics[f"bits_per_{unit}"] = metrics["loss"] / math.log(2)
  if task == "classify":
    confusion = np.asarray(totals["confusion"], np.int64)
    metrics.update(confusion_scores(confusion), confusion=confusion.tolist())
  return metrics
