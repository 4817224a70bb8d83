"""Tracking: TensorBoard scalars hold the values of metrics.jsonl; `jaxmodels plot` draws runs' curves;
`jaxmodels eval` reproduces a run's final evaluation."""

import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from jaxmodels.train import train_and_evaluate
from conftest import experiment, read_metrics


def read_scalars(directory) -> dict:
  """{(tag, step): value} of every event file in `directory`: TFRecords of tensorboard Event protos
  (8-byte length, 4-byte CRC, the Event, 4-byte CRC)."""
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        out[(value.tag, event.step)] = value.simple_value
  return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  c = experiment("digits_mlp")
  c.train.update(dict(steps=20, warmup_steps=2, log_every=5, eval_every=10))
  workdir = tmp_path_factory.mktemp("mlp")
  return str(workdir), train_and_evaluate(c, str(workdir)), c


def test_tensorboard_scalars_equal_metrics_jsonl(mlp_run):
  workdir, _, _ = mlp_run
  scalars = read_scalars(os.path.join(workdir, "tb"))
  expected = {(f"{r['split']}/{k}", r["step"]): v for r in read_metrics(workdir) for k, v in r.items()
              if k != "step" and isinstance(v, (int, float))}
  assert {"train/loss", "eval/loss", "eval/f1_macro", "train/learning_rate"} <= {tag for tag, _ in expected}
  assert set(scalars) == set(expected)
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6), key  # event files hold float32
