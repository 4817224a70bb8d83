"""Tracking: TensorBoard scalars hold the values of metrics.jsonl; `jaxmodels plot` draws runs' curves;
`jaxmodels eval` reproduces a run's final evaluation."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, experiment, read_metrics
from tensorboardX.proto import event_pb2

from jaxmodels.runtime.errors import UserError
from jaxmodels.train.loop import train_and_evaluate


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


def test_eval_command_reproduces_the_final_eval_and_reads_other_data(mlp_run, tmp_path):
  from jaxmodels.tools.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  workdir, final, _ = mlp_run
  step, metrics = evaluate_run(workdir, write=True)
  assert step == 20
  assert {k: v for k, v in metrics.items() if isinstance(v, float)} == pytest.approx(final)
  assert os.path.isfile(os.path.join(workdir, "eval_20.json"))
  # Other data of the same shapes: the digits test split alone as an npz.
  from jaxmodels.data.arrays import load_digits  # pylint: disable=import-outside-toplevel
  arrays = load_digits(0.2, 0)
  np.savez(tmp_path / "other.npz", **arrays)
  _, other = evaluate_run(workdir, 20, ("--config.data.source=npz", f"--config.data.path={tmp_path / 'other.npz'}"))
  assert other["loss"] == pytest.approx(final["loss"], rel=1e-5)  # the same test examples, read from the file
  with pytest.raises(UserError, match="bad override '--config.train.steps=3'"):
    evaluate_run(workdir, None, ("--config.train.steps=3",))
  with pytest.raises(UserError, match="has no checkpoint 7 .saved steps: 20"):
    evaluate_run(workdir, 7)


def test_a_run_saved_before_newer_config_keys_still_evaluates(mlp_run, tmp_path):
  """Keys added after a run was saved take their defaults (e.g. runs of an older jaxmodels)."""
  from jaxmodels.tools.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  workdir, final, _ = mlp_run
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  saved = json.loads((old / "config.json").read_text())
  for key in ("ema_decay", "loss_scale_period", "quantization", "pruning", "distill"):
    del saved["train"][key]
  (old / "config.json").write_text(json.dumps(saved))
  _, metrics = evaluate_run(str(old))
  assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_plot_command_writes_a_png_of_curves_and_confusion(mlp_run, tmp_path):
  from jaxmodels.cli.main import main  # pylint: disable=import-outside-toplevel
  workdir, _, _ = mlp_run
  out = tmp_path / "curves.png"
  assert main(["jaxmodels", "plot", workdir, workdir, "--metric", "loss", "--out", str(out), "--confusion"]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert main(["jaxmodels", "plot", workdir, "--metric", "r2", "--out", str(out)]) == 2  # no such metric


def test_the_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (the dev extra), ~2 s of CPU in every training process;
  the writer is made without it, and torch still imports afterwards."""
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: nothing could import it")
  script = ("import sys; from jaxmodels.train.metrics import TensorBoard; tb = TensorBoard(sys.argv[1], 0);"
            "tb.write({'step': 1, 'split': 'train', 'loss': 1.5}); tb.close(); print('torch' in sys.modules);"
            "import torch; print(torch.ones(2).sum().item())")
  r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                     check=False, env={**os.environ, "PYTHONPATH": ROOT})
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["False", "2.0"]
  assert read_scalars(tmp_path / "tb") == {("train/loss", 1): 1.5}
