"""Early stopping: a run whose eval loss is flat stops after `patience` evaluations, saves, says why, keeps and
names its best checkpoint; resumed, it trains no further."""

import os

import pytest
from conftest import experiment, read_metrics

from jaxmodels.config import validate
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.loop import train_and_evaluate


def test_flat_eval_loss_stops_after_patience_and_stays_stopped(tmp_path, capsys):
  c = experiment("digits_mlp")
  # A learning rate that leaves the loss flat: no evaluation after the first improves by min_delta.
  c.train.update(dict(steps=100, learning_rate=1e-9, warmup_steps=0, log_every=10, eval_every=5))
  c.train.early_stopping.update(dict(metric="loss", mode="min", patience=2, min_delta=1e-3))
  c.checkpoint.every = 50
  final = train_and_evaluate(c, str(tmp_path))
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "eval"] == [5, 10, 15]
  (stop,) = [r for r in records if r["split"] == "stop"]
  assert stop["step"] == 15 and "has not improved" in stop["reason"] and "in 2 evaluations" in stop["reason"]
  assert max(r["step"] for r in records) == 15
  # The best (step 5, the first evaluation) and the stop step are saved; the final line names the best.
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["5", "15"]
  out = capsys.readouterr().out
  assert "final: step 15 " in out and f"best checkpoint {tmp_path}/checkpoints/5 (loss=" in out
  # Resumed (even with more steps allowed), it takes no further step and reports the same evaluation.
  c.train.steps = 200
  again = train_and_evaluate(c, str(tmp_path))
  assert again == pytest.approx(final)
  assert max(r["step"] for r in read_metrics(str(tmp_path))) == 15
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["5", "15"]


def test_early_stopping_and_keep_best_must_agree():
  c = experiment("digits_mlp")
  c.train.early_stopping.metric = "loss"
  c.checkpoint.keep_best = "accuracy"
  with pytest.raises(UserError, match="checkpoint.keep_best='accuracy' .* differs from train.early_stopping.metric"):
    validate(c)
