"""Tasks beyond classification (binary, multilabel, regression): their scores equal scikit-learn's on the same
predictions, small synthetic problems train to stated scores, and labels that do not fit the task are one-line
errors."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict
from sklearn import metrics as skm

from jaxmodels.config import default_config
from jaxmodels.data import validate_arrays
from jaxmodels.runtime.errors import UserError
from jaxmodels.tasks import eval_sums, scores
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.step import evaluation_options


def _halves(f, *arrays):
  """`f` summed over two eval batches, the second half padding: the sums must add up across batches."""
  n = len(arrays[0])
  first = f(*(a[:n // 2] for a in arrays), np.ones(n // 2, np.float32))
  padded = [np.concatenate([a[n // 2:], a[:8]]) for a in arrays]
  second = f(*padded, np.r_[np.ones(n - n // 2), np.zeros(8)].astype(np.float32))
  return {k: np.asarray(first[k]) + np.asarray(second[k]) for k in first}


def test_binary_scores_equal_sklearns():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 400).astype(np.int32)
  logits = (2.0 * y - 1 + 1.5 * rng.normal(size=400)).astype(np.float32)[:, None]
  totals = _halves(lambda z, t, m: eval_sums("binary", jnp.asarray(z), jnp.asarray(t), jnp.asarray(m)), logits, y)
  got = scores.binary_scores(totals["confusion"], totals["auc_hist"])
  predicted = (logits[:, 0] > 0).astype(int)
  assert got["precision"] == pytest.approx(skm.precision_score(y, predicted), abs=1e-12)
  assert got["recall"] == pytest.approx(skm.recall_score(y, predicted), abs=1e-12)
  assert got["f1"] == pytest.approx(skm.f1_score(y, predicted), abs=1e-12)
  assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, logits[:, 0]), abs=1e-3)


def test_multilabel_scores_equal_sklearns():
  rng = np.random.default_rng(1)
  y = (rng.random((300, 5)) < 0.3).astype(np.float32)
  logits = (2.0 * y - 1 + 1.2 * rng.normal(size=y.shape)).astype(np.float32)
  mask_like = lambda z, t, m: eval_sums("multilabel", jnp.asarray(z), jnp.asarray(t),
                                        jnp.asarray(np.broadcast_to(m[:, None], t.shape)))
  totals = _halves(mask_like, logits, y)
  got = scores.multilabel_scores(totals["label_counts"])
  predicted = (logits > 0).astype(int)
  assert got["f1_micro"] == pytest.approx(skm.f1_score(y, predicted, average="micro"), abs=1e-12)
  assert got["f1_macro"] == pytest.approx(skm.f1_score(y, predicted, average="macro", zero_division=0), abs=1e-12)
  np.testing.assert_allclose(got["f1_per_label"], skm.f1_score(y, predicted, average=None), atol=1e-12)


@pytest.mark.parametrize("task, logits_shape, y", [
    ("classify", (8, 4), np.arange(8) % 4), ("lm", (2, 4, 6), np.arange(8).reshape(2, 4) % 6),
    ("seq2seq", (2, 4, 6), np.arange(8).reshape(2, 4) % 6), ("binary", (8, 1), np.arange(8) % 2),
    ("multilabel", (8, 3), np.arange(24).reshape(8, 3) % 2), ("regress", (8, 2), np.linspace(0, 1, 16).reshape(8, 2)),
])
def test_an_evaluation_reports_the_metrics_its_task_names(task, logits_shape, y):
  """eval_scores' floats are eval_metric_names (what early stopping and checkpoint.keep_best accept), in order,
  with top-k accuracy after accuracy where the eval sums count it."""
  top_k = 2 if task in ("classify", "lm") else 0  # a language model's eval sums count no top-k hits
  logits = np.random.default_rng(0).normal(size=logits_shape).astype(np.float32)
  totals = eval_sums(task, jnp.asarray(logits), jnp.asarray(y), jnp.ones(y.shape, jnp.float32), top_k=top_k)
  metrics = scores.eval_scores(task, {k: np.asarray(v) for k, v in totals.items()}, "char", top_k)
  names = list(scores.eval_metric_names(task, "char"))
  if task == "classify":
    names.insert(2, scores.top_k_name(top_k))
  assert [k for k, v in metrics.items() if isinstance(v, float)] == names


@pytest.mark.parametrize("shape, mean", [((200,), 5.0), ((200, 3), 5.0), ((200,), 1e4)])
def test_regression_scores_equal_sklearns(shape, mean):
  rng = np.random.default_rng(2)
  y = (mean + 3 * rng.normal(size=shape)).astype(np.float32)
  outputs = (y + rng.normal(size=shape)).astype(np.float32).reshape(200, -1)
  # The shift the training loop uses: the training targets' mean (here of other draws), where float32 sums of
  # targets far from 0 would lose their variance (at mean 1e4 about 0: R^2 0.922 for scikit-learn's 0.867).
  y_train = (mean + 3 * rng.normal(size=(500, *shape[1:]))).astype(np.float32)
  options = evaluation_options(config_dict.ConfigDict({"loss": "mse", "eval_top_k": 0}),
                               types.SimpleNamespace(task="regress", y_train=y_train, num_outputs=1))
  np.testing.assert_allclose(options["y_shift"], y_train.mean(0), rtol=1e-6)
  f = lambda z, t, m: eval_sums("regress", jnp.asarray(z), jnp.asarray(t),
                                jnp.asarray(m.reshape((-1,) + (1,) * (t.ndim - 1)) * np.ones(t.shape, np.float32)),
                                y_shift=options["y_shift"])
  got = scores.regression_scores(_halves(f, outputs, y))
  pred = outputs.reshape(shape)
  assert got["mse"] == pytest.approx(skm.mean_squared_error(y, pred), rel=1e-5)
  assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-5)
  assert got["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-5)


def _run(tmp_path, arrays, task="", **train):
  tmp_path.mkdir(exist_ok=True)
  path = tmp_path / "data.npz"
  np.savez(path, **arrays)
  c = default_config()
  c.data.source, c.data.path, c.data.task = "npz", str(path), task
  c.model.family, c.model.hidden_sizes = "mlp", (64,)
  c.train.update(dict(steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=10, log_every=100, eval_every=300,
                      **train))
  return train_and_evaluate(c, str(tmp_path / "run"))


def _features(n, d, seed):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_regression_fits_a_linear_target_with_noise(tmp_path):
  x_train, x_test, w = _features(512, 8, 0), _features(256, 8, 1), _features(8, 1, 2)[:, 0]
  noise = lambda n, s: 0.1 * np.random.default_rng(s).normal(size=n)
  final = _run(tmp_path, dict(x_train=x_train, y_train=x_train @ w + noise(512, 3), x_test=x_test,
                              y_test=x_test @ w + noise(256, 4)), task="regress")
  assert final["r2"] >= 0.95, final
  assert set(final) == {"loss", "mse", "mae", "r2"}


def test_binary_and_multilabel_reach_stated_f1(tmp_path):
  x_train, x_test, w = _features(512, 8, 0), _features(256, 8, 1), _features(8, 3, 2)
  label = lambda x: (x @ w > 0).astype(np.int32)
  binary = _run(tmp_path / "binary", dict(x_train=x_train, y_train=label(x_train)[:, 0], x_test=x_test,
                                         y_test=label(x_test)[:, 0]), task="binary")
  assert binary["f1"] >= 0.9 and binary["roc_auc"] >= 0.95, binary
  multilabel = _run(tmp_path / "multi", dict(x_train=x_train, y_train=label(x_train), x_test=x_test,
                                             y_test=label(x_test)))  # (N, 3) of 0/1: inferred multilabel
  assert multilabel["f1_micro"] >= 0.9 and multilabel["f1_macro"] >= 0.9, multilabel


def test_binary_task_is_set_not_inferred(tmp_path):
  x = _features(64, 4, 0)
  y = (x[:, 0] > 0).astype(np.int64)
  arrays = dict(x_train=x, y_train=y, x_test=x, y_test=y)
  assert validate_arrays(arrays, None)["task"] == "classify"  # 0/1 integers: two classes unless told
  assert validate_arrays(arrays, None, task="binary")["task"] == "binary"


@pytest.mark.parametrize("task, y, message", [
    ("binary", np.arange(64) % 3, r"y_train must hold 0/1 labels of shape \(N,\) for data.task=binary"),
    ("multilabel", np.arange(64) % 2, r"y_train must hold 0/1 labels of shape \(N, num_labels\)"),
    ("", np.tile([[0, 2]], (64, 1)),
     r"y_train must be a 1-D array of class labels, got shape \(64, 2\) \(set data.task"),
    ("", np.linspace(0, 1, 64), r"y_train must hold integer class labels, found .* \(float targets: set data.task"),
    ("regress", np.array(["a"] * 64), "y_train must hold numbers for data.task=regress"),
])
def test_labels_that_do_not_fit_the_task_are_one_line_errors(task, y, message):
  x = _features(64, 4, 0)
  with pytest.raises(UserError, match=message) as e:
    validate_arrays(dict(x_train=x, y_train=y, x_test=x, y_test=y), None, task=task)
  assert "\n" not in str(e.value)
