"""Durable runs: nothing written before a run is accepted, one run per workdir, resumes that refuse rather than
discard, torn logs, and a whole run on gs:// against a local GCS emulator (fake-gcs-server)."""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, experiment, read_metrics

from jaxmodels import parallel, train
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.loop import train_and_evaluate


def small(steps, **overrides):
  """digits_mlp for `steps` steps, saving every 10."""
  c = experiment("digits_mlp")
  c.train.update(dict(steps=steps, warmup_steps=2, log_every=5, eval_every=10))
  c.checkpoint.every = 10
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def snapshot(workdir) -> dict:
  """Every file under `workdir` with its bytes."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in pathlib.Path(workdir).rglob("*") if p.is_file()}


def test_a_resume_that_changes_the_optimizer_tree_is_refused_and_nothing_moves(tmp_path, monkeypatch, capsys):
  train_and_evaluate(small(20), str(tmp_path))
  before = snapshot(tmp_path)
  # grad_clip adds an optax state: the saved optimizer tree no longer fits. Old code moved every checkpoint
  # to checkpoints_corrupt/, restarted at step 0 and truncated the metrics.
  with pytest.raises(UserError, match=r"cannot restore .*/checkpoints/20: its saved state does not match .*"
                                      r"opt_state/0/count.*config keys that changed: train.grad_clip"):
    train_and_evaluate(small(40, train__grad_clip=1.0), str(tmp_path))
  assert snapshot(tmp_path) == before
  # A longer run is accepted, restored without initialising a state first, and says its schedule changed.
  build = train.build_experiment

  def no_init(config):
    def init_state():
      raise AssertionError("a resume initialised a fresh state")
    return dataclasses.replace(build(config), init_state=init_state)
  monkeypatch.setattr(train.loop, "build_experiment", no_init)  # where train_and_evaluate reads it
  capsys.readouterr()
  train_and_evaluate(small(40), str(tmp_path))
  notes = [r for r in read_metrics(tmp_path) if r["split"] == "note"]
  assert len(notes) == 1 and notes[0]["step"] == 20
  assert "changed learning-rate schedule (train.steps (saved 20, now 40))" in notes[0]["note"]
  assert f"step 20 note: {notes[0]['note']}" in capsys.readouterr().out  # the sentence, not `note=...`
  assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20, 30, 40]


def text_config(path, seq_len=16):
  c = experiment("text_transformer")
  c.data.update(dict(path=str(path), seq_len=seq_len, val_fraction=0.2))
  c.model.update(dict(num_layers=1, num_heads=2, d_model=32, d_ff=64, max_len=64))
  c.train.update(dict(steps=2, batch_size=8, warmup_steps=1, log_every=1, eval_every=2))
  return c


def test_a_refused_resume_and_a_bad_config_write_nothing(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("abcdefghij" * 30, encoding="utf-8")
  b.write_text("klmnopqrst" * 30, encoding="utf-8")
  run = tmp_path / "run"
  train_and_evaluate(text_config(a), str(run))
  before = snapshot(run)
  with pytest.raises(UserError, match="data.path"):
    train_and_evaluate(text_config(b), str(run))
  assert snapshot(run) == before  # old code rewrote vocab.json, config.json and model.json first
  with pytest.raises(UserError, match="checkpoint.keep=0"):
    train_and_evaluate(small(10, checkpoint__keep=0), str(tmp_path / "fresh"))
  assert not (tmp_path / "fresh").exists()  # old code had written config.json and model.json


def test_a_workdir_that_is_a_file_or_under_one_is_a_one_line_error(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    storage.check_workdir(f)
  with pytest.raises(UserError, match="is a file, so the directory cannot be created"):
    storage.check_workdir(f / "run")
  r = subprocess.run([sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/digits_mlp.py",
                      f"--workdir={f}/run"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("jaxmodels: error: --workdir")
  assert f.read_text() == "x"
  if os.geteuid() != 0:  # root writes anywhere: only an unprivileged user can test a read-only directory
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="is not writable"):
      storage.check_workdir(ro / "run")


def test_one_run_per_workdir_and_a_dead_holder_is_taken_over(tmp_path, capsys):
  lock = storage.WorkdirLock(tmp_path)
  lock.acquire()
  with pytest.raises(UserError, match=rf"is in use by process {os.getpid()} on {socket.gethostname()}"):
    storage.WorkdirLock(tmp_path).acquire()
  with pytest.raises(UserError, match="is in use by process"):  # the whole run refuses, writing nothing
    train_and_evaluate(small(10), str(tmp_path))
  assert os.listdir(tmp_path) == ["LOCK"]
  lock.release()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  train_and_evaluate(small(10), str(tmp_path))
  assert f"taking over {tmp_path}/LOCK: process {dead.pid} on this host has ended" in capsys.readouterr().out
  assert not (tmp_path / "LOCK").exists()  # released at the end


def test_the_lock_renews_its_heartbeat_and_a_stale_lock_of_another_host_is_taken_over(tmp_path, capsys):
  lock = storage.WorkdirLock(tmp_path, refresh_s=0.05)
  lock.acquire()
  first = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
  time.sleep(0.3)
  assert json.loads((tmp_path / "LOCK").read_text())["heartbeat"] > first  # renewed while held
  lock.release()
  assert not (tmp_path / "LOCK").exists()
  other = storage.WorkdirLock(tmp_path, refresh_s=0.05)
  other.record = {"pid": 1, "host": "other-vm"}
  other.acquire()  # a live run on another host, renewing its heartbeat
  with pytest.raises(UserError, match="in use by process 1 on other-vm"):
    storage.WorkdirLock(tmp_path, refresh_s=0.2).acquire()
  other.release()
  (tmp_path / "LOCK").write_text(json.dumps({"pid": 1, "host": "old-vm", "heartbeat": time.time()}))
  lock = storage.WorkdirLock(tmp_path, refresh_s=0.2)
  lock.acquire()  # a preempted VM's lock: recent, but no longer renewed
  assert "process 1 on old-vm did not renew it for 0 s" in capsys.readouterr().out
  lock.release()
  (tmp_path / "LOCK").write_text(json.dumps({"pid": 1, "host": "old-vm", "heartbeat": time.time() - 3600}))
  lock = storage.WorkdirLock(tmp_path)
  lock.acquire()  # not renewed for an hour: taken over at once
  assert "process 1 on old-vm has not renewed it for 3600 s" in capsys.readouterr().out
  assert json.loads((tmp_path / "LOCK").read_text())["host"] == socket.gethostname()
  lock.release()


TAKE_OVERS = """
import json, multiprocessing, socket, subprocess, sys
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError
workdir, trials, processes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def contend(start, done, results):
  lock = storage.WorkdirLock(workdir, log=lambda _line: None)
  start.wait()
  try:
    lock.acquire()
    results.put(True)
  except UserError:
    results.put(False)
  done.wait()  # every contender has tried: only now may the holder release
  lock.release()

dead = subprocess.Popen([sys.executable, "-c", "pass"])
dead.wait()
fork = multiprocessing.get_context("fork")  # this process has imported nothing that runs threads
holders = []
for _ in range(trials):
  record = json.dumps({"pid": dead.pid, "host": socket.gethostname()})
  # gs://: written by another process, so that this one starts no gcsfs event-loop thread before forking
  subprocess.run([sys.executable, "-c", f"from etils import epath; epath.Path({workdir!r}).joinpath('LOCK')"
                  f".write_text({record!r})"], check=True)
  start, done, results = fork.Barrier(processes), fork.Barrier(processes), fork.Queue()
  ps = [fork.Process(target=contend, args=(start, done, results)) for _ in range(processes)]
  for p in ps:
    p.start()
  holders.append(sum(results.get(timeout=60) for _ in ps))
  for p in ps:
    p.join()
print(json.dumps(holders))
"""


def test_concurrent_take_overs_of_a_dead_holders_lock_give_exactly_one_holder(tmp_path):
  """50 times, 4 processes take over the same dead holder's LOCK at once. Old code (read, unlink, re-create)
  gave the lock to two of them in about one trial in ten."""
  r = subprocess.run([sys.executable, "-c", TAKE_OVERS, str(tmp_path), "50", "4"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout) == [1] * 50
  assert sorted(os.listdir(tmp_path)) == []  # each holder released; no temporary file left


@pytest.mark.slow
def test_concurrent_take_overs_on_gs_give_exactly_one_holder(gcs_env):
  """The same on a bucket (a local GCS emulator): the take-over is an upload with ifGenerationMatch."""
  r = subprocess.run([sys.executable, "-c", TAKE_OVERS, "gs://bkt/locked", "8", "3"], cwd=ROOT, env=gcs_env,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout) == [1] * 8


def test_an_empty_or_torn_lock_is_taken_over_once_older_than_the_staleness_window(tmp_path, capsys):
  """A kill during an old heartbeat's truncate-then-write left LOCK empty or torn: old code said 'in use by
  process ? on ?' forever. Young, it may still be being written; older than stale_s, it is taken over."""
  for torn in (b"", b'{"pid": 12, "ho'):
    (tmp_path / "LOCK").write_bytes(torn)
    with pytest.raises(UserError, match="is in use by process"):
      storage.WorkdirLock(tmp_path, stale_s=600).acquire()
    assert (tmp_path / "LOCK").read_bytes() == torn
    os.utime(tmp_path / "LOCK", (time.time() - 3600, time.time() - 3600))
    lock = storage.WorkdirLock(tmp_path, stale_s=600)
    lock.acquire()
    assert "holds no readable record and was last written 3600 s ago" in capsys.readouterr().out
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "LOCK").exists()


def test_a_torn_last_metrics_record_is_dropped_on_resume(tmp_path, capsys):
  train_and_evaluate(small(10), str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 15, "split": "tr')  # a kill mid-write
  train_and_evaluate(small(20), str(tmp_path))  # old code: JSONDecodeError traceback
  assert "warning: dropped line" in capsys.readouterr().out
  assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20]


def test_pmap_restore_keeps_each_device_copy_on_its_device():
  layout = parallel.PmapLayout(jax.local_devices())
  sharding = layout.checkpoint_sharding()
  # A restored leaf: one copy per device (marked by its device index, to tell which copy ends up where).
  copies = [jax.device_put(np.full((3,), i, np.float32), d) for i, d in enumerate(sharding.mesh.devices.flat)]
  restored = jax.make_array_from_single_device_arrays((3,), sharding, copies)
  state = layout.from_checkpoint({"w": restored})["w"]
  # Old code gathered device 0's copy, stacked all copies there and scattered them back.
  assert [s.device for s in state.addressable_shards] == layout.devices
  np.testing.assert_array_equal(np.asarray(state), np.repeat(np.arange(len(layout.devices)), 3).reshape(-1, 3))


# ---- gs:// against a local GCS emulator (the gcs_env fixture of conftest.py) ----

def _jaxmodels(env, *args, **kw):
  return subprocess.run([sys.executable, "-m", "jaxmodels", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False, **kw)


def _python(env, code):
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


TEXT = ["train", "--config", "experiments/text_transformer.py", "--config.train.steps=60",
        "--config.data.seq_len=32", "--config.model.num_layers=1", "--config.model.d_model=32",
        "--config.model.d_ff=64", "--config.train.batch_size=8", "--config.train.warmup_steps=5",
        "--config.train.log_every=10", "--config.train.eval_every=30", "--config.train.eval_batch_size=512",
        "--config.checkpoint.every=20"]
SCORES = ("step", "split", "loss", "accuracy", "perplexity")


@pytest.mark.slow
def test_a_gs_run_survives_sigkill_resumes_exactly_and_samples_exports_and_compresses(tmp_path, gcs_env):
  assert _jaxmodels(gcs_env, *TEXT, f"--workdir={tmp_path / 'straight'}").returncode == 0
  p = subprocess.Popen([sys.executable, "-m", "jaxmodels", *TEXT, "--workdir=gs://bkt/run"], cwd=ROOT, env=gcs_env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in p.stdout:
    if line.startswith("step 50 train"):
      p.kill()
      break
  p.communicate(timeout=60)
  assert p.returncode == -signal.SIGKILL
  resumed = _jaxmodels(gcs_env, *TEXT, "--workdir=gs://bkt/run")
  assert resumed.returncode == 0, resumed.stderr
  assert "taking over gs://bkt/run/LOCK: process" in resumed.stdout
  assert any(f"training steps {s}..60" in resumed.stdout for s in (20, 40)), resumed.stdout
  sample = _jaxmodels(gcs_env, "sample", "--workdir=gs://bkt/run", "--prompt=def ", "--length=20",
                      "--temperature=0")
  local_sample = _jaxmodels(gcs_env, "sample", f"--workdir={tmp_path / 'straight'}", "--prompt=def ",
                            "--length=20", "--temperature=0")
  assert sample.returncode == 0, sample.stderr
  assert sample.stdout == local_sample.stdout and sample.stdout.startswith("def ")
  exported = _jaxmodels(gcs_env, "export", "--workdir=gs://bkt/run", "--out=gs://bkt/exported")
  assert exported.returncode == 0, exported.stderr
  compressed = _jaxmodels(gcs_env, "compress", "--workdir=gs://bkt/run", "--method=ptq", "--activations",
                          "--out=gs://bkt/int8")
  assert compressed.returncode == 0, compressed.stderr
  check = _python(gcs_env, "import json, jaxmodels, numpy as np; from etils import epath;"
                           "p = epath.Path('gs://bkt'); lines = (p / 'run/metrics.jsonl').read_text().splitlines();"
                           "print(json.dumps(sorted(x.name for x in (p / 'run').iterdir())));"
                           "print(json.dumps([json.loads(l) for l in lines]));"
                           "print(json.dumps([jaxmodels.load_model(f'gs://bkt/{d}')(np.zeros((1, 32), np.int32)).shape"
                           "                  for d in ('exported', 'int8')]));"
                           "print((p / 'int8/compression.json').read_text().replace(chr(10), ''))")
  assert check.returncode == 0, check.stderr
  names, records, shapes, report = (json.loads(line) for line in check.stdout.strip().splitlines()[-4:])
  # no lock left; tb holds the events
  assert names == ["checkpoints", "config.json", "metrics.jsonl", "model.json", "tb", "vocab.json"]
  straight = read_metrics(tmp_path / "straight")
  assert [[r.get(k) for k in SCORES] for r in records] == [[r.get(k) for k in SCORES] for r in straight]
  assert [s[:2] for s in shapes] == [[1, 32], [1, 32]]  # the export and the int8 one (static inputs) load from gs://
  assert report["after"]["loss"] == pytest.approx(report["before"]["loss"], abs=0.05) and report["after"]["bytes"] > 0


def test_an_empty_workdir_and_a_resume_past_train_steps_are_refused_writing_nothing(tmp_path):
  with pytest.raises(UserError, match="--workdir is empty"):
    train_and_evaluate(small(10), "")
  run = tmp_path / "run"
  train_and_evaluate(small(20), str(run))
  before = snapshot(run)
  with pytest.raises(UserError, match="checkpoint at step 20, past train.steps=10"):
    train_and_evaluate(small(10), str(run))
  assert snapshot(run) == before  # config.json still says 20 steps


def test_a_signal_before_the_loop_releases_the_lock_and_exits_75(tmp_path):
  """SIGTERM while the run restores (the lock held, nothing trained): exit 75 and no LOCK left behind."""
  script = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
from jaxmodels import cli
from jaxmodels.train import loop
def restore(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)
loop._restore = restore
sys.exit(cli.main(["jaxmodels", "train", "--config", "experiments/digits_mlp.py", "--workdir", {str(tmp_path)!r}]))
"""
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 75, r.stdout + r.stderr
  assert "signal 15 before training started" in r.stdout
  assert os.listdir(tmp_path) == []  # the lock is released; nothing was written


# ---- write errors: one line naming the path and the cause, exit 1, the workdir as it was ----

DIGITS = ["train", "--config", "experiments/digits_mlp.py", "--config.train.steps=30", "--config.checkpoint.every=10",
          "--config.train.warmup_steps=2"]


def _one_line(r, prefix):
  assert r.returncode == 1, r.stdout + r.stderr
  assert r.stderr.startswith(prefix) and r.stderr.count("\n") == 1, r.stderr
  assert "Traceback" not in r.stdout + r.stderr


def test_a_directory_the_run_writes_that_cannot_be_written_is_refused_before_the_run_is_accepted(tmp_path, tmpfs):
  """Old code accepted a run whose checkpoints/ it could not write, rewrote config.json and model.json, trained
  and ended in a 413-line traceback."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "checkpoints").write_text("not a directory")  # where the run's checkpoints go
  (run / "config.json").write_text("{}")
  before = snapshot(run)
  r = _jaxmodels(None, *DIGITS, f"--workdir={run}")
  _one_line(r, f"jaxmodels: error: cannot write {run}/checkpoints: {run}/checkpoints is a file")
  assert snapshot(run) == before
  (run / "checkpoints").unlink()
  tmpfs(64, read_only=True, at=run / "checkpoints")  # a read-only disk (root ignores permission bits)
  r = _jaxmodels(None, *DIGITS, f"--workdir={run}")
  _one_line(r, f"jaxmodels: error: cannot write {run}/checkpoints: {run}/checkpoints is not writable "
               f"(read-only file system)")
  assert snapshot(run) == {"config.json": b"{}"}


def test_a_full_disk_is_one_line_and_leaves_the_workdir_as_it_was(tmp_path, tmpfs):
  """A disk that fills during a checkpoint save (old code: a 643-line RESOURCE_EXHAUSTED traceback) and a fresh
  workdir on a disk with 8 KiB free (old code: an ENOSPC traceback after writing config.json and an empty
  model.json)."""
  disk = tmpfs(400)
  r = _jaxmodels(None, *DIGITS, f"--workdir={disk}/run")
  _one_line(r, f"jaxmodels: error: cannot write checkpoints in {disk}/run/checkpoints: No space left on device")
  assert os.listdir(disk / "run" / "checkpoints") == []  # the failed save's partial files are removed
  assert not (disk / "run" / "LOCK").exists()
  small_disk = tmpfs(32)
  (small_disk / "filler").write_bytes(b"x" * (24 << 10))  # 8 KiB left
  r = _jaxmodels(None, *DIGITS, f"--workdir={small_disk}/run")
  _one_line(r, f"jaxmodels: error: cannot write {small_disk}/run/")
  assert r.stderr.endswith(": No space left on device\n")
  assert os.listdir(small_disk) == ["filler"]  # the workdir the run created is gone again: nothing half written


@pytest.mark.parametrize("abandoned", [False, True])
def test_a_process_that_abandoned_io_ends_after_its_atexit_handlers_and_skips_finalization(abandoned):
  # TensorStore reports an abandoned read when it ends, also during interpreter finalization, when sys's hooks are
  # gone and it prints a raw traceback (as a CI run printed: 'RuntimeError: Event loop is closed'). A process
  # that abandoned I/O ends after its atexit handlers, without finalization, where `Finalized.__del__` would run.
  script = f"""
import atexit
from jaxmodels.runtime import storage
class Finalized:
  def __del__(self):
    print("finalization ran", flush=True)
kept = Finalized()
atexit.register(lambda: print("atexit ran", flush=True))
if {abandoned}:
  storage.abandoned_io()
print("done", flush=True)
storage.end_process(3)
"""
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 3, r.stderr
  assert r.stdout.split() == ["done", "atexit", "ran", *([] if abandoned else ["finalization", "ran"])], r.stdout
