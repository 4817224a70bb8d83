"""Eval metrics from on-device sums: top-k hits and the confusion matrix, and the scores derived from it,
checked against scikit-learn on the same predictions."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmodels.tasks import eval_sums
from jaxmodels.tasks.scores import confusion_scores


def _sklearn_scores(y_true, y_pred) -> dict:
  out = {}
  for average in ("macro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
  return out


@pytest.mark.parametrize("num_classes, absent", [(5, None), (6, 4)])
def test_scores_equal_sklearns(num_classes, absent):
  rng = np.random.default_rng(0)
  y_true = rng.integers(0, num_classes, 300)
  y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, num_classes, 300))
  if absent is not None:  # a class neither in the labels nor predicted, and one never predicted
    y_true[y_true == absent], y_pred[y_pred == absent] = 0, 0
    y_pred[y_pred == absent + 1] = 1
  cm = skm.confusion_matrix(y_true, y_pred, labels=range(num_classes))
  scores = confusion_scores(cm)
  for key, value in _sklearn_scores(y_true, y_pred).items():
    assert scores[key] == pytest.approx(value, abs=1e-12), key
  p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(num_classes), zero_division=0)
  np.testing.assert_allclose(scores["precision_per_class"], p, atol=1e-12)
  np.testing.assert_allclose(scores["recall_per_class"], r, atol=1e-12)
  np.testing.assert_allclose(scores["f1_per_class"], f, atol=1e-12)


def test_eval_sums_count_top_k_hits_and_confusion_over_unmasked_rows():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(64, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 64).astype(np.int32)
  mask = (np.arange(64) < 50).astype(np.float32)  # the last 14 rows are padding
  sums = eval_sums("classify", jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), top_k=3)
  kept_logits, kept_labels = logits[:50], labels[:50]
  assert float(sums["top_k_correct"]) == 50 * skm.top_k_accuracy_score(kept_labels, kept_logits, k=3,
                                                                        labels=range(7))
  assert sums["confusion"].dtype == jnp.int32
  np.testing.assert_array_equal(sums["confusion"],
                                skm.confusion_matrix(kept_labels, kept_logits.argmax(-1), labels=range(7)))
