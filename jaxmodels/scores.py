"""Classification scores derived on the host from a confusion matrix of exact counts.

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

import numpy as np


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
