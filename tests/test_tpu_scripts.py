"""tpu/ scripts against a fake gcloud that records its arguments and plays a preemption."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

FAKE_GCLOUD = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
state_file = os.environ["FAKE_STATE"]
state = open(state_file).read().strip() if os.path.exists(state_file) else "READY"
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(state)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    sys.exit(0 if os.environ.get("FAKE_QUEUED") else 1)
elif "ssh" in args and any("python3" in a for a in args):
    fails = int(os.environ.get("FAKE_FAIL_RUNS", "0"))
    done = len([l for l in open(os.environ["FAKE_LOG"]) if "python3" in l]) - 1
    if done < fails:
        open(state_file, "w").write("PREEMPTED")
        print("worker 0: preempted", file=sys.stderr)
        sys.exit(255)
    print("final: step 10 test loss=1.0")
elif args[:4] in (["compute", "tpus", "tpu-vm", "create"], ["compute", "tpus", "queued-resources", "create"]):
    open(state_file, "w").write("READY")
'''
SCRIPTS = ["create", "setup", "run", "ssh", "logs", "delete"]


@pytest.fixture
def gcloud(tmp_path):
  """(environment, calls()): PATH starts with a fake gcloud; calls() lists the argument lists it received."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.jsonl"),
         "FAKE_STATE": str(tmp_path / "state"), "TPU_POLL_S": "0"}
  env.pop("DRY_RUN", None)

  def calls():
    path = tmp_path / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  return env, calls


def script(name, *args, env):
  return subprocess.run([os.path.join(ROOT, "tpu", f"{name}.sh"), *args], capture_output=True, text=True,
                        env=env, timeout=60, check=False)


def test_create_spot_uses_a_queued_resource_and_waits_for_ready(gcloud):
  env, calls = gcloud
  r = script("create", "exp1", "--type", "v5litepod-8", "--zone", "us-west4-a", "--spot", env=env)
  assert r.returncode == 0, r.stderr
  assert calls()[0] == ["compute", "tpus", "queued-resources", "create", "exp1", "--node-id", "exp1", "--zone",
                        "us-west4-a", "--accelerator-type", "v5litepod-8", "--runtime-version",
                        "tpu-ubuntu2204-base", "--spot"]
  assert calls()[1][:5] == ["compute", "tpus", "tpu-vm", "describe", "exp1"]
  assert "+ gcloud compute tpus queued-resources create exp1" in r.stderr  # printed before running


def test_create_on_demand_with_runtime_version(gcloud):
  env, calls = gcloud
  r = script("create", "exp1", "--type", "v4-32", "--zone", "us-central2-b", "--version", "tpu-vm-v4-base",
             env=env)
  assert r.returncode == 0, r.stderr
  assert calls()[0] == ["compute", "tpus", "tpu-vm", "create", "exp1", "--zone", "us-central2-b",
                        "--accelerator-type", "v4-32", "--version", "tpu-vm-v4-base"]


def test_setup_copies_to_every_worker_and_installs_the_tpu_extra(gcloud):
  env, calls = gcloud
  r = script("setup", "exp1", "--zone", "us-west4-a", env=env)
  assert r.returncode == 0, r.stderr
  scp, ssh = calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "exp1:~/jaxmodels.tgz"
  assert "--worker=all" in scp and scp[scp.index("--zone") + 1] == "us-west4-a"
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "exp1"] and "--worker=all" in ssh
  assert "pip install -q -e '.[tpu]'" in ssh[-1]


def test_run_sends_the_experiment_and_overrides_to_all_workers(gcloud):
  env, calls = gcloud
  r = script("run", "exp1", "--zone", "us-west4-a", "--", "experiments/text_transformer.py", "--workdir",
             "gs://bucket/run1", "--config.model.num_layers=8", env=env)
  assert r.returncode == 0, r.stderr
  (ssh,) = calls()
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "exp1"] and "--worker=all" in ssh
  remote = ssh[-1]
  assert ("python3 experiments/text_transformer.py --workdir gs://bucket/run1 --config.model.num_layers=8"
          in remote)
  assert "JAXMODELS_DISTRIBUTED=auto" in remote and "JAXMODELS_CACHE_DIR=" in remote
  assert "final: step 10" in r.stdout
  logs = os.listdir(os.path.join(ROOT, "tpu", "logs"))
  assert any(name.startswith("exp1-") for name in logs)


def test_run_retries_after_preemption(gcloud):
  env, calls = gcloud
  env = {**env, "FAKE_FAIL_RUNS": "1"}
  r = script("run", "exp1", "--zone", "z1", "--retries", "2", "--type", "v5litepod-8", "--spot", "--",
             "experiments/digits_cnn.py", "--workdir", "gs://b/r", env=env)
  assert r.returncode == 0, r.stderr
  verbs = [" ".join(c[:4]) for c in calls()]
  assert verbs == [
      "compute tpus tpu-vm ssh",  # the run, preempted
      "compute tpus tpu-vm describe",  # -> PREEMPTED
      "compute tpus tpu-vm delete",
      "compute tpus queued-resources describe",
      "compute tpus queued-resources create",  # --spot: recreated as a queued resource
      "compute tpus tpu-vm describe",  # -> READY
      "compute tpus tpu-vm scp",
      "compute tpus tpu-vm ssh",  # setup
      "compute tpus tpu-vm ssh",  # the same command again: resumes from gs://b/r
  ]
  assert calls()[0][-1] == calls()[-1][-1]
  assert "recreating it and rerunning (retry 1 of 2)" in r.stderr


def test_run_gives_up_without_retries(gcloud):
  env, _ = gcloud
  r = script("run", "exp1", "--zone", "z1", "--", "experiments/digits_cnn.py", env={**env, "FAKE_FAIL_RUNS": "1"})
  assert r.returncode == 2 and "run failed (VM state: PREEMPTED)" in r.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_clear_errors(gcloud, name):
  env, calls = gcloud
  r = script(name, "--zone", "z1", env=env)
  assert r.returncode == 2 and "missing NAME" in r.stderr
  r = script(name, "exp1", env=env)
  assert r.returncode == 2 and "missing --zone" in r.stderr
  r = script(name, "exp1", "--zone", "z1", "--bogus", env=env)
  assert r.returncode == 2 and "unknown flag --bogus" in r.stderr
  assert calls() == []
  r = script(name, "--help", env=env)
  assert r.returncode == 0 and r.stdout.startswith(f"usage: tpu/{name}.sh")


def test_no_gcloud_on_path(tmp_path):
  bin_dir = tmp_path / "bin"  # the tools the script needs, and no gcloud
  bin_dir.mkdir()
  for tool in ("bash", "dirname", "basename"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  env = {**os.environ, "PATH": str(bin_dir)}
  r = script("delete", "exp1", "--zone", "z1", env=env)
  assert r.returncode == 2 and "gcloud not found on PATH" in r.stderr


def test_dry_run_prints_without_calling(gcloud):
  env, calls = gcloud
  r = script("delete", "exp1", "--zone", "z1", env={**env, "DRY_RUN": "1"})
  assert r.returncode == 0
  assert "+ gcloud compute tpus tpu-vm delete exp1 --zone z1 --quiet" in r.stderr
  assert calls() == []


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(
      __import__("sys").executable))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (make test installs it through the dev extra)")
  scripts = [os.path.join(ROOT, "tpu", f"{n}.sh") for n in [*SCRIPTS, "common"]]
  r = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout
