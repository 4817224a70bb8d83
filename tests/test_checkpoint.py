"""Checkpoints: exact resume after SIGKILL and SIGTERM, torn and corrupt saves, retention, resharding, export."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, experiment, read_metrics

import jaxmodels
from jaxmodels.runs import checkpoint
from jaxmodels.runs.export import export, load_run_model
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.loop import train_and_evaluate

SCORES = ("loss", "accuracy", "perplexity", "bits_per_char")


def command(config, workdir, *overrides):
  return [sys.executable, f"experiments/{config}.py", f"--workdir={workdir}", *overrides]


def run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, **kw)


def run_until(cmd, line_prefix, sig):
  """Starts `cmd`, sends `sig` once a stdout line starts with `line_prefix`, returns (code, output)."""
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if line.startswith(line_prefix):
      p.send_signal(sig)
      break
  out = p.communicate(timeout=300)[0]
  return p.returncode, "".join(lines) + out


def scores(workdir):
  return [(r["step"], r["split"], *(r.get(k) for k in SCORES)) for r in read_metrics(workdir)]


def final_params(workdir):
  return jax.tree.leaves(jax.device_get(nnx_state(load_run_model(workdir))))


def nnx_state(model):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.to_pure_dict(nnx.state(model))


ARGS = ["--config.train.steps=200", "--config.checkpoint.every=50", "--config.train.log_every=10"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """digits_cnn trained 200 steps uninterrupted: what a stopped and resumed run must equal."""
  workdir = tmp_path_factory.mktemp("straight")
  assert run(command("digits_cnn", workdir, *ARGS)).returncode == 0
  return workdir


def assert_same_run(workdir, straight_workdir):
  assert scores(workdir) == scores(straight_workdir)
  for a, b in zip(final_params(workdir), final_params(straight_workdir)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigkill_after_step_120_resumes_bit_exactly(tmp_path, straight):
  code, out = run_until(command("digits_cnn", tmp_path, *ARGS), "step 120 train", signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  resumed = run(command("digits_cnn", tmp_path, *ARGS))
  assert resumed.returncode == 0, resumed.stderr
  # The newest committed save: 100 normally, 50 if the kill beat the async write of 100 to its commit.
  assert any(f"training steps {s}..200" in resumed.stdout for s in (50, 100, 150)), resumed.stdout
  assert_same_run(tmp_path, straight)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_exactly(tmp_path, straight):
  code, out = run_until(command("digits_cnn", tmp_path, *ARGS), "step 70 train", signal.SIGTERM)
  assert code == 75, out
  saved = checkpoint.Checkpoints(checkpoint.checkpoint_dir(tmp_path)).latest_step()
  assert 70 <= saved < 200 and saved % 50 != 0  # the signal's own save, not a periodic one
  assert f"saved step {saved}; rerun the same command to resume" in out
  assert run(command("digits_cnn", tmp_path, *ARGS)).returncode == 0
  assert_same_run(tmp_path, straight)


@pytest.mark.slow
def test_sigkill_during_async_save_restarts_from_previous_checkpoint(tmp_path):
  # A wide MLP, so each save (~70 MB with Adam's moments) is in flight long enough to be caught.
  args = ["--config.model.hidden_sizes=(2048,2048)", "--config.train.steps=1000", "--config.checkpoint.every=20",
          "--config.train.log_every=1000", "--config.train.eval_every=1000", "--config.checkpoint.keep=10"]
  ckdir = tmp_path / "checkpoints"
  p = subprocess.Popen(command("digits_mlp", tmp_path, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  in_flight = None
  deadline = time.monotonic() + 240
  while in_flight is None and time.monotonic() < deadline and p.poll() is None:
    names = os.listdir(ckdir) if ckdir.is_dir() else []
    done = [int(n) for n in names if n.isdigit()]
    tmp = [n for n in names if "tmp" in n]
    if done and tmp:
      p.kill()
      in_flight = tmp[0]
    time.sleep(0.002)
  p.wait()
  assert in_flight is not None, "never saw a save in flight"
  complete = max(int(n) for n in os.listdir(ckdir) if n.isdigit())
  r = run(command("digits_mlp", tmp_path, *args[:1], "--config.train.steps=100", *args[2:]))
  assert r.returncode == 0, r.stderr
  assert f"training steps {complete}..100" in r.stdout
  assert not [n for n in os.listdir(ckdir) if "tmp" in n]  # the torn write was cleaned up


def small_run(workdir, steps, **overrides):
  c = experiment("digits_mlp")
  c.train.update(dict(steps=steps, warmup_steps=2, log_every=5, eval_every=5))
  c.checkpoint.every = 10
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c, train_and_evaluate(c, str(workdir))


def test_corrupt_newest_checkpoint_is_reported_skipped_and_left_in_place(tmp_path):
  small_run(tmp_path, 20)
  for f in (tmp_path / "checkpoints" / "20").rglob("*"):  # damage the newest checkpoint's files
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  r = run(command("digits_mlp", tmp_path, "--config.train.steps=30", "--config.train.warmup_steps=2",
                  "--config.checkpoint.every=10", "--config.train.log_every=5", "--config.train.eval_every=5"))
  assert r.returncode == 0, r.stderr
  assert f"checkpoint {tmp_path}/checkpoints/20 cannot be read" in r.stdout and "left in place" in r.stdout
  assert "training steps 10..30" in r.stdout
  kept = sorted(n for n in os.listdir(tmp_path) if not n.startswith("confusion_"))  # one per evaluation
  assert kept == ["checkpoints", "config.json", "metrics.jsonl", "model.json", "tb"]
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [10, 20, 30]


def test_config_mismatch_names_the_keys_and_exits_2(tmp_path):
  small_run(tmp_path, 10)
  r = run(command("digits_mlp", tmp_path, "--config.train.steps=20", "--config.model.hidden_sizes=(64,)",
                  "--config.train.batch_size=32", "--config.train.warmup_steps=2"))
  assert r.returncode == 2
  assert "the config differs in keys that shape the state" in r.stderr
  assert "model.hidden_sizes (saved [256, 128], now [64])" in r.stderr
  assert "train.batch_size (saved 64, now 32)" in r.stderr


def test_nonfinite_loss_stops_before_saving_and_skip_mode_counts(tmp_path):
  overrides = ["--config.train.optimizer=sgd", "--config.train.learning_rate=1e12", "--config.train.steps=50",
               "--config.train.warmup_steps=0", "--config.train.schedule=constant", "--config.checkpoint.every=1",
               "--config.train.log_every=1000"]
  r = run(command("digits_mlp", tmp_path / "stop", *overrides))
  assert r.returncode == 3, r.stderr
  assert "jaxmodels: error: loss is nan at step" in r.stderr or "jaxmodels: error: loss is inf at step" in r.stderr
  bad_step = int(r.stderr.split(" at step ")[1].split(";")[0])
  steps = [int(n) for n in os.listdir(tmp_path / "stop" / "checkpoints") if n.isdigit()]
  assert steps and max(steps) < bad_step  # nothing saved from the diverged state
  # Skipping needs no save per step (50 of them were most of this run's time): one at the end.
  r = run(command("digits_mlp", tmp_path / "skip", *overrides, "--config.train.skip_nonfinite=true",
                  "--config.train.log_every=10", "--config.checkpoint.every=50"))
  assert r.returncode == 0, r.stderr
  assert sum(m.get("skipped", 0) for m in read_metrics(tmp_path / "skip") if m["split"] == "train") > 0


def test_keep_newest_and_best(tmp_path):
  _, _ = small_run(tmp_path, 60, checkpoint__keep=2, checkpoint__keep_best="accuracy",
                   checkpoint__best_mode="max", train__learning_rate=0.05, train__eval_every=10)
  evals = {r["step"]: r["accuracy"] for r in read_metrics(tmp_path) if r["split"] == "eval"}
  best = max(sorted(evals), key=lambda s: (evals[s], -s))
  kept = sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit())
  assert kept == sorted({50, 60, best})
  assert checkpoint.best_step(tmp_path / "checkpoints") == best  # what load_model(workdir, step="best") reads
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(jaxmodels.load_model(str(tmp_path), step="best")(x),
                                load_run_model(str(tmp_path), step=best)(x))


def test_restore_from_another_run_params_or_full(tmp_path):
  _, first = small_run(tmp_path / "a", 20)
  c, _ = small_run(tmp_path / "b", 5, checkpoint__restore_from=str(tmp_path / "a"))
  a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
  assert b[0]["step"] == 1  # trained parameters, fresh optimizer, step 0
  assert b[0]["loss"] < a[0]["loss"] - 0.5 and b[0]["loss"] == pytest.approx(first["loss"], abs=0.1)
  c, _ = small_run(tmp_path / "c", 25, checkpoint__restore_from=str(tmp_path / "a" / "checkpoints" / "20"),
                   checkpoint__restore_mode="full")
  assert read_metrics(tmp_path / "c")[0]["step"] == 25  # continues the other run's step count (21..25)


def test_export_and_load(tmp_path):
  small_run(tmp_path / "run", 10)
  out = tmp_path / "exported"
  r = run([sys.executable, "-m", "jaxmodels", "export", "--workdir", str(tmp_path / "run"), "--out", str(out)])
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ["config.json", "model.json", "params"]
  model, reference = jaxmodels.load_model(str(out)), load_run_model(str(tmp_path / "run"))
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(model(x), reference(x))
  np.testing.assert_array_equal(jaxmodels.load_model(str(tmp_path / "run"))(x), reference(x))  # a workdir too
  params = jaxmodels.load_params(str(out))
  assert set(params) == {"hidden", "out"} and params["out"]["kernel"].shape == (128, 10)


def test_fsdp_checkpoint_restores_onto_one_and_four_devices_and_pmap(tmp_path):
  # The schedule must not depend on train.steps; no dropout: pmap draws its masks per device.
  steps = dict(train__warmup_steps=0, train__schedule="constant", model__dropout=0.0)
  _, straight = small_run(tmp_path / "straight", 40, **steps)
  small_run(tmp_path / "fsdp", 20, parallel__strategy="fsdp", **steps)
  shutil.copytree(tmp_path / "fsdp", tmp_path / "dp4")
  shutil.copytree(tmp_path / "fsdp", tmp_path / "pmap")
  _, one = small_run(tmp_path / "fsdp", 40, **steps)  # 8 devices, fsdp -> 1 device
  assert one["loss"] == pytest.approx(straight["loss"], rel=1e-4)
  # -> the pmap strategy on 8 devices: its loop (transfer guard, saves, evaluation) compiles each step once
  _, pmapped = small_run(tmp_path / "pmap", 40, parallel__strategy="pmap", train__fail_on_recompile=True, **steps)
  assert pmapped["loss"] == pytest.approx(straight["loss"], rel=1e-4)
  assert [r["step"] for r in read_metrics(tmp_path / "pmap")][-2:] == [40, 40]  # train and eval rows
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  r = run(command("digits_mlp", tmp_path / "dp4", "--config.train.steps=40", "--config.train.warmup_steps=0",
                  "--config.train.schedule=constant", "--config.model.dropout=0.0",
                  "--config.train.log_every=5", "--config.train.eval_every=5", "--config.checkpoint.every=10",
                  "--config.parallel.strategy=dp"), env=env)
  assert r.returncode == 0, r.stderr
  assert "training steps 20..40" in r.stdout
  assert read_metrics(tmp_path / "dp4")[-1]["loss"] == pytest.approx(straight["loss"], rel=1e-4)


# What a run promises (docs/checkpoints.md): damaged checkpoints, readers during a run, one `load`, resumes that
# would change the data.

DAMAGE = {  # each of a model array file's kinds of damage: its bytes -> the damaged bytes
    "truncated": lambda b: b[: len(b) // 2],
    "zero-filled": lambda b: bytes(len(b)),
    "0xff in the middle": lambda b: b[: len(b) // 2] + b"\xff" * 8 + b[len(b) // 2 + 8:],
    "one flipped bit": lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:],
}
SMALL = ["--config.train.warmup_steps=2", "--config.checkpoint.every=10", "--config.train.log_every=5",
         "--config.train.eval_every=5"]


@pytest.fixture(scope="module")
def run20(tmp_path_factory):
  """digits_mlp trained 20 steps, checkpoints 10 and 20."""
  workdir = tmp_path_factory.mktemp("run20")
  small_run(workdir, 20)
  return workdir


def damage_model_array(step_dir, how) -> str:
  """Damages the largest array file of the step's model item; returns its path relative to the step."""
  arrays = [p for p in (step_dir / "model").rglob("*") if p.is_file() and "/d/" in str(p)]
  f = max(arrays, key=lambda p: p.stat().st_size)
  f.write_bytes(DAMAGE[how](f.read_bytes()))
  return str(f.relative_to(step_dir))


@pytest.mark.parametrize("how", [*DAMAGE, "truncated, saved without checksums"])
def test_damaged_array_file_is_named_in_one_line_and_eval_and_resume_use_the_previous_checkpoint(run20, tmp_path,
                                                                                                   how):
  shutil.copytree(run20, tmp_path, dirs_exist_ok=True)
  if how.endswith("without checksums"):  # a checkpoint written before checksums existed: Orbax's read error
    for manifest in (tmp_path / "checkpoints").glob(f"*/{checkpoint.CHECKSUMS}"):
      manifest.unlink()
  name = damage_model_array(tmp_path / "checkpoints" / "20", how.split(",")[0])
  r = run([sys.executable, "-m", "jaxmodels", "eval", "--workdir", str(tmp_path)])
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and f"checkpoint {tmp_path}/checkpoints/20 cannot be read" in warnings[0], r.stdout
  if how.endswith("without checksums"):
    assert "OUT_OF_RANGE" in warnings[0] and "/checkpoints/20/model/" in warnings[0]
  else:
    assert f"{tmp_path}/checkpoints/20/{name}" in warnings[0]
  assert "eval: step 10 " in r.stdout and (tmp_path / "eval_10.json").is_file()
  r = run(command("digits_mlp", tmp_path, "--config.train.steps=30", *SMALL))
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  assert "training steps 10..30" in r.stdout and "checkpoints/20 cannot be read" in r.stdout
  assert (tmp_path / "checkpoints" / "20").is_dir()  # left in place


def test_damaged_newest_metadata_export_and_load_model_use_the_previous_checkpoint(run20, tmp_path):
  shutil.copytree(run20, tmp_path / "run")
  for manifest in (tmp_path / "run" / "checkpoints").glob(f"*/{checkpoint.CHECKSUMS}"):
    manifest.unlink()  # the metadata's own failure, as in runs saved before checksums
  (tmp_path / "run" / "checkpoints" / "20" / "model" / "_METADATA").unlink()
  r = run([sys.executable, "-m", "jaxmodels", "export", "--workdir", str(tmp_path / "run"), "--out",
           str(tmp_path / "out")])
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  assert "checkpoints/20 cannot be read" in r.stdout
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  at10 = load_run_model(str(run20), step=10)(x)
  np.testing.assert_array_equal(jaxmodels.load_model(str(tmp_path / "out"))(x), at10)
  np.testing.assert_array_equal(jaxmodels.load_model(str(tmp_path / "run"))(x), at10)


def test_eval_and_export_beside_a_run_saving_every_step_with_keep_1(tmp_path):
  workdir = tmp_path / "run"
  p = subprocess.Popen(command("digits_mlp", workdir, "--config.train.steps=100000", "--config.checkpoint.every=1",
                               "--config.checkpoint.keep=1", "--config.train.log_every=1000",
                               "--config.train.eval_every=100000"),
                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while not (workdir / "checkpoints").is_dir() or not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]:
      assert p.poll() is None
      time.sleep(0.2)
    for i in range(3):
      for cmd in (["eval", "--workdir", str(workdir)],
                  ["export", "--workdir", str(workdir), "--out", str(tmp_path / f"o{i}")]):
        r = run([sys.executable, "-m", "jaxmodels", *cmd])
        assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert p.poll() is None  # the run was saving all along
  finally:
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)


def test_load_model_and_params_take_a_workdir_a_step_or_an_export_and_say_what_they_expected(run20, tmp_path):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  at10 = load_run_model(str(run20), step=10)
  np.testing.assert_array_equal(jaxmodels.load_model(str(run20), step=10)(x), at10(x))
  np.testing.assert_array_equal(jaxmodels.load_model(str(run20 / "checkpoints" / "10"))(x), at10(x))
  params = jaxmodels.load_params(str(run20))  # a workdir's newest checkpoint, as a dict
  newest = nnx.to_pure_dict(nnx.state(load_run_model(str(run20)), nnx.Param))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(newest)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(UserError, match="expected a training workdir .config.json and checkpoints/. or an export"):
    jaxmodels.load_model(str(tmp_path))
  with pytest.raises(UserError, match="has no checkpoint 7 .saved steps: 10, 20."):
    jaxmodels.load_model(str(run20), step=7)
  with pytest.raises(UserError, match="kept no best checkpoint"):
    jaxmodels.load_model(str(run20), step="best")


def test_library_evaluation_writes_nothing_into_the_run(run20):
  from jaxmodels.tools.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  before = sorted(os.listdir(run20))
  assert evaluate_run(str(run20))[0] == 20
  assert sorted(os.listdir(run20)) == before


@pytest.mark.parametrize("key,value", [("train.seed", 1), ("data.test_fraction", 0.3)])
def test_resume_refuses_a_key_that_splits_the_data_differently(tmp_path, key, value):
  small_run(tmp_path, 10)
  r = run(command("digits_mlp", tmp_path, "--config.train.steps=20", f"--config.{key}={value}", *SMALL))
  assert r.returncode == 2, r.stderr
  assert "keys that shape the state or split the data" in r.stderr and f"{key} (saved " in r.stderr


def test_resume_refuses_a_relative_data_path_that_names_other_data(tmp_path):
  from jaxmodels.data.arrays import load_digits  # pylint: disable=import-outside-toplevel
  arrays = load_digits(0.2, 0)
  for name, labels in (("a", arrays["y_train"]), ("b", arrays["y_train"][::-1]), ("c", arrays["y_train"])):
    (tmp_path / name).mkdir()
    np.savez(tmp_path / name / "data.npz", **{**arrays, "y_train": labels})
  args = ["--config.data.source=npz", "--config.data.path=data.npz", *SMALL]
  script = os.path.join(ROOT, "experiments", "digits_mlp.py")

  def train(cwd, steps):
    return subprocess.run([sys.executable, script, f"--workdir={tmp_path / 'run'}", f"--config.train.steps={steps}",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
  assert train(tmp_path / "a", 10).returncode == 0
  r = train(tmp_path / "b", 20)  # the same name, other labels
  assert r.returncode == 2, r.stderr
  assert (f"data.path='data.npz' now resolves to {tmp_path / 'b' / 'data.npz'}, the run trained on "
          f"{tmp_path / 'a' / 'data.npz'}: the same size, other content") in r.stderr
  r = train(tmp_path / "c", 20)  # the same data, elsewhere
  assert r.returncode == 0, r.stderr
  assert "training steps 10..20" in r.stdout


def test_a_checkpoint_deleted_while_it_is_read_makes_eval_read_the_newest(run20, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from jaxmodels.tools.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel
  shutil.copytree(run20, tmp_path, dirs_exist_ok=True)
  ckdir = tmp_path / "checkpoints"
  restore = ocp.CheckpointManager.restore

  def saved_and_removed_meanwhile(self, step, *args, **kwargs):
    if step == 20 and (ckdir / "20").is_dir():  # a run beside the reader saves step 30, retention removes 20
      shutil.copytree(ckdir / "20", ckdir / "30")
      shutil.rmtree(ckdir / "20")
    return restore(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", saved_and_removed_meanwhile)
  assert evaluate_run(str(tmp_path))[0] == 30


def test_a_damaged_export_is_refused_in_one_line_naming_the_file(run20, tmp_path):
  export(str(run20), str(tmp_path / "out"))
  arrays = [p for p in (tmp_path / "out" / "params").rglob("*") if p.is_file() and "/d/" in str(p)]
  f = max(arrays, key=lambda p: p.stat().st_size)
  f.write_bytes(DAMAGE["one flipped bit"](f.read_bytes()))
  for load in (jaxmodels.load_model, jaxmodels.load_params):
    with pytest.raises(UserError, match=f"damaged export: {f} differs from its checksum"):
      load(str(tmp_path / "out"))


def test_a_run_whose_every_checkpoint_is_damaged_refuses_to_start_over_them(run20, tmp_path):
  shutil.copytree(run20, tmp_path, dirs_exist_ok=True)
  for step in ("10", "20"):
    damage_model_array(tmp_path / "checkpoints" / step, "truncated")
  r = run(command("digits_mlp", tmp_path, "--config.train.steps=30", *SMALL))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert "none of the saved checkpoints (10, 20) is intact" in r.stderr.strip().splitlines()[-1]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]


def test_load_model_takes_a_step_as_an_int_or_its_digits_and_names_any_other_value(run20):
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  np.testing.assert_array_equal(jaxmodels.load_model(str(run20), step="10")(x), load_run_model(str(run20), step=10)(x))
  for step in (10.0, -1, "latest", True):
    with pytest.raises(UserError, match=r"^step=.*: expected a saved step \(an int\), 'best', or None"):
      jaxmodels.load_model(str(run20), step=step)
