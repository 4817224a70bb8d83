"""The command line as a user meets it: subprocesses, exit codes, one-line errors."""

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT, read_metrics

JAXMODELS = [sys.executable, "-m", "jaxmodels"]


def run(args, **kw):
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, **kw)


def test_bad_data_gives_one_line_error_and_writes_nothing(tmp_path):
  data = tmp_path / "bad.npz"
  np.savez(data, x_train=np.ones((4, 3)), y_train=np.zeros(4, int), x_test=np.full((2, 3), np.nan),
           y_test=np.zeros(2, int))
  workdir = tmp_path / "run"
  r = run([*JAXMODELS, "train", "--config", "experiments/digits_mlp.py", f"--workdir={workdir}",
           "--config.data.source=npz", f"--config.data.path={data}"])
  assert r.returncode == 2
  assert r.stderr.strip() == "jaxmodels: error: x_test contains NaN or inf (6 entries)"
  assert not workdir.exists()


def test_misspelled_override_and_unknown_command():
  r = run([*JAXMODELS, "train", "--config", "experiments/digits_mlp.py", "--config.train.stepz=3"])
  assert r.returncode == 2 and 'Did you mean "steps"' in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  r = run([*JAXMODELS, "fly"])
  assert r.returncode == 2 and "unknown command 'fly'" in r.stderr
  r = run([*JAXMODELS, "train", "--config", "experiments/nope.py"])
  assert r.returncode == 2 and "config file not found" in r.stderr


def test_experiment_runs_as_a_script_with_overrides(tmp_path):
  workdir = tmp_path / "mlp"
  r = run([sys.executable, "experiments/digits_mlp.py", f"--workdir={workdir}", "--config.train.steps=30",
           "--config.train.log_every=10", "--config.train.warmup_steps=5",
           "--config.model.hidden_sizes=(32,)"])
  assert r.returncode == 0, r.stderr
  assert "final: step 30 test" in r.stdout
  assert [m["step"] for m in read_metrics(workdir) if m["split"] == "train"] == [1, 10, 20, 30]
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "confusion_30.json", "metrics.jsonl", "model.json",
                                        "tb"]


def test_command_flag_errors_are_one_line(capsys, tmp_path):
  from jaxmodels import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["jaxmodels", "sample", "--prompt", "x"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "the following arguments are required: --workdir" in err[0]
  assert cli.main(["jaxmodels", "sample", "--workdir", str(tmp_path), "--prompt", "x", "--temperature", "nan"]) == 2
  assert "--temperature a finite number" in capsys.readouterr().err
  assert cli.main(["jaxmodels", "launch", "--processes", "two", "--", "train"]) == 2
  assert "invalid int value: 'two'" in capsys.readouterr().err
  assert cli.main(["jaxmodels", "bench", "step", "--config", "experiments/digits_mlp.py", "--steps", "0"]) == 2
  assert "--steps 0: expected at least 1" in capsys.readouterr().err
