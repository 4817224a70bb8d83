import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment, read_metrics

from jaxmodels import parallel
from jaxmodels.train.actions import summarize
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate


def test_digits_cnn_trains_well_above_chance(digits_cnn_run):
  _, final, _ = digits_cnn_run
  assert final["accuracy"] > 0.9  # chance is 0.1
  assert final["loss"] < 0.5


def test_run_outputs(digits_cnn_run):
  workdir, final, config = digits_cnn_run
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["train"]["steps"] == config.train.steps
  records = read_metrics(workdir)
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == [1, 25, 50, 75, 100, 125, 150]
  assert [r["step"] for r in evals] == [100, 150]
  for r in train[1:]:
    assert {"loss", "accuracy", "learning_rate", "examples_per_sec", "step_time_ms"} <= set(r)
    assert r["examples_per_sec"] > 0 and r["step_time_ms"] > 0
  assert train[-1]["loss"] < train[0]["loss"]
  assert evals[-1]["accuracy"] == pytest.approx(final["accuracy"])
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["150"]
  # Classification scores in the eval record; the confusion matrix of exact counts beside it.
  assert {"top5_accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted"} <= set(final)
  assert final["accuracy"] <= final["top5_accuracy"] <= 1 and len(evals[-1]["f1_per_class"]) == 10
  with open(os.path.join(workdir, "confusion_150.json"), encoding="utf-8") as f:
    confusion = np.array(json.load(f)["confusion"])
  assert confusion.shape == (10, 10) and confusion.sum() == 359  # every test example once, padding none
  assert np.trace(confusion) / 359 == pytest.approx(final["accuracy"])


def test_resume_from_final_checkpoint_reproduces_metrics(digits_cnn_run):
  workdir, final, config = digits_cnn_run
  again = train_and_evaluate(config, workdir)  # restores step 150: nothing left to train
  assert again == pytest.approx(final)


def test_grad_accumulation_matches_full_batch_step():
  config = experiment("digits_mlp")
  config.model.dropout = 0.0  # the two runs must compute the same math
  config.train.batch_size = 32
  states = []
  for accum in (1, 4):
    config.train.grad_accum_steps = accum
    exp = build_experiment(config)
    state = exp.init_state()
    state, metrics = exp.train_step(state, jax.device_put(exp.dataset.train_batch(0, 32)))
    states.append((state, metrics))
  (a, ma), (b, mb) = states
  assert summarize(np.stack(parallel.fetch([ma])))["loss"] == pytest.approx(summarize(np.stack(parallel.fetch([mb])))["loss"], rel=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_train_step_donates_state_and_never_recompiles():
  config = experiment("digits_mlp")
  exp = build_experiment(config)
  state = exp.init_state()
  old_leaf = jax.tree.leaves(state.params)[0]
  for step in range(3):
    state, _ = exp.train_step(state, jax.device_put(exp.dataset.train_batch(step, config.train.batch_size)))
  assert old_leaf.is_deleted()  # donated
  assert exp.train_step._cache_size() == 1
  assert int(state.step) == 3


def test_bfloat16_compute_trains_with_float32_state():
  config = experiment("digits_mlp")
  config.model.dtype = "bfloat16"
  exp = build_experiment(config)
  state = exp.init_state()
  state, metrics = exp.train_step(state, jax.device_put(exp.dataset.train_batch(0, config.train.batch_size)))
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert metrics.dtype == jnp.float32 and np.isfinite(summarize(np.stack(parallel.fetch([metrics])))["loss"])
