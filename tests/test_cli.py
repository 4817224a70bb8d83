"""The command line as a user meets it: subprocesses, exit codes, one-line errors."""

import io
import os
import subprocess
import sys
import threading

import numpy as np
from conftest import ROOT, read_metrics

from jaxmodels.parallel import launch

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


def test_output_into_a_closed_pipe_ends_quietly():
  """`jaxmodels --help | head -1`: the reader is gone before the command writes. Old code: a BrokenPipeError
  traceback (and a second one from the flush at exit)."""
  for args in (["--help"], ["train", "--help"]):
    read, write = os.pipe()
    os.close(read)  # the reader (head) has exited
    try:
      r = subprocess.run([*JAXMODELS, *args], cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True,
                         timeout=300, check=False)
    finally:
      os.close(write)
    assert r.returncode == 1 and r.stderr == "", r.stderr


def test_ctrl_c_during_a_commands_imports_is_one_line_and_exit_130():
  """SIGINT while `jaxmodels train` imports its modules (JAX and the rest). Old code: a KeyboardInterrupt
  traceback. The interrupt is raised where the command's module is imported."""
  script = ("import sys, types\nimport jaxmodels.cli\nmain = sys.modules['jaxmodels.cli.main']\n"
            "def interrupted(name):\n  raise KeyboardInterrupt\n"
            "main.importlib = types.SimpleNamespace(import_module=interrupted)\n"
            "sys.argv = ['jaxmodels', 'train', '--config', 'experiments/digits_mlp.py']\nmain.entry()\n")
  r = run([sys.executable, "-c", script], env={**os.environ, "JAXMODELS_MALLOC": "system"})
  assert r.returncode == 130 and r.stderr == "jaxmodels: interrupted\n", r.stderr


def test_launch_drops_gloos_routine_connected_lines_and_keeps_the_rest():
  """Every `jaxmodels launch` printed '[Gloo] Rank i is connected to 1 peer ranks...' for each process (and
  the preemption service's 'expected upon program shutdown' warning)."""
  lines = [b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
           b"[Gloo] Rank 0 is connected to 0 peer ranks. Expected number of connected peer ranks is : 1\n",
           b"W1207 17:25:00.123456  4242 preemption_notifier.cc:89] Preemption sync protocol cancelled by notifier: "
           b"CANCELLED: Cancelled call to retrieve preemption notice. This is expected upon program shutdown.\n",
           b"step 1 train: loss=2.3\n"]
  out = io.StringIO()
  stdout, sys.stdout = sys.stdout, out
  try:
    launch._forward(1, io.BytesIO(b"".join(lines)), threading.Lock())  # pylint: disable=protected-access
  finally:
    sys.stdout = stdout
  assert out.getvalue() == "".join(f"[1] {line.decode()}" for line in (lines[1], lines[3]))


def test_commands_that_read_a_run_use_the_persistent_compilation_cache(digits_cnn_run, tmp_path):
  """eval compiles its step once per machine: a second eval of the run (or of a run like it) loads it."""
  workdir, _, _ = digits_cnn_run
  cache = tmp_path / "xla"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own setting would turn the cache on for any process
  env["JAXMODELS_CACHE_DIR"] = str(cache)
  r = run([*JAXMODELS, "eval", "--workdir", workdir], env=env)
  assert r.returncode == 0, r.stderr
  assert cache.is_dir() and any(cache.iterdir()), "eval wrote nothing into JAXMODELS_CACHE_DIR"
