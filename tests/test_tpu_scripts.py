"""tpu/ scripts against a fake gcloud that records its arguments and plays a preemption."""

import json
import os
import shutil
import subprocess

import pytest
from conftest import ROOT

FAKE_GCLOUD = r"""#!/usr/bin/env python3
# A fake gcloud with one worker: `tpu-vm ssh --command C` runs C with bash in a fake VM home ($FAKE_VM), so
# run.sh's real start, follow and status commands run; FAKE_DROP_FOLLOWS drops that many log-following
# connections. The VM's state is in $FAKE_STATE; queued resources go through the states in FAKE_QR_STATES.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
state_file = os.environ["FAKE_STATE"]
state = open(state_file).read().strip() if os.path.exists(state_file) else "READY"
vm = os.environ["FAKE_VM"]

def count(name):
    path = os.path.join(os.path.dirname(state_file), name)
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    return n

def dropped():
    print("ssh: connection to worker 0 lost", file=sys.stderr)
    sys.exit(255)

if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(state)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    fmt = next((a for a in args if a.startswith("--format")), "")
    if "failedData" in fmt:
        print(os.environ.get("FAKE_QR_REASON", ""))
    elif "state.state" in fmt:
        states = os.environ.get("FAKE_QR_STATES", "ACTIVE").split(",")
        print(states[min(count("qr_polls"), len(states)) - 1])
    else:
        sys.exit(0 if os.environ.get("FAKE_QUEUED") else 1)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = args[args.index("--command") + 1] if "--command" in args else ""
    if state != "READY":
        dropped()
    if "tail -n" in command and count("follows") <= int(os.environ.get("FAKE_DROP_FOLLOWS", "0")):
        dropped()
    if "uv venv" in command:  # setup: the real one downloads; here the stub venv is already in place
        sys.exit(0)
    rc = subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": vm}).returncode
    if "jaxmodels-job" in command:  # a status probe: a held job may now finish
        open(os.path.join(vm, "release"), "w").close()
    sys.exit(rc)
elif args[:4] in (["compute", "tpus", "tpu-vm", "create"], ["compute", "tpus", "queued-resources", "create"]):
    open(state_file, "w").write("READY")
"""
# The experiment's interpreter in the fake VM's venv: the n-th job started does FAKE_JOBS's n-th outcome.
FAKE_PYTHON = r"""#!/usr/bin/env bash
n=$(( $(cat "$HOME/starts" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$HOME/starts"
outcome="$(echo "${FAKE_JOBS:-ok}" | cut -d, -f"$n")"
ps -o sid= -p $$ | tr -d ' ' > "$HOME/sid"
echo "job $n: $* (JAXMODELS_DISTRIBUTED=$JAXMODELS_DISTRIBUTED)"
case "$outcome" in
  ok) ;;
  hold) while [ ! -f "$HOME/release" ]; do sleep 0.05; done ;;
  died) kill -9 "$PPID"; kill -9 $$ ;;
  preempt) echo PREEMPTED > "$FAKE_STATE"; kill -9 "$PPID"; kill -9 $$ ;;
  exit*) echo "jaxmodels: error: bad input"; exit "${outcome#exit}" ;;
esac
echo "final: step 10 test loss=1.0"
"""
SCRIPTS = ["create", "setup", "run", "ssh", "logs", "delete"]


@pytest.fixture
def gcloud(tmp_path):
  """(environment, calls()): PATH starts with a fake gcloud; calls() lists the argument lists it received."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  venv_bin = tmp_path / "vm" / "jaxmodels" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python3").write_text(FAKE_PYTHON)
  (venv_bin / "python3").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.jsonl"),
         "FAKE_STATE": str(tmp_path / "state"), "FAKE_VM": str(tmp_path / "vm"), "TPU_POLL_S": "0",
         "TPU_LOG_DIR": str(tmp_path / "logs")}
  env.pop("DRY_RUN", None)

  def calls():
    path = tmp_path / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  return env, calls


def script(name, *args, env):
  return subprocess.run([os.path.join(ROOT, "tpu", f"{name}.sh"), *args], capture_output=True, text=True,
                        env=env, timeout=60, check=False)


def verbs(calls):
  return [" ".join(c[:4]) for c in calls]


def test_create_spot_uses_a_queued_resource_and_waits_for_ready(gcloud):
  env, calls = gcloud
  r = script("create", "exp1", "--type", "v5litepod-8", "--zone", "us-west4-a", "--spot",
             env={**env, "FAKE_QR_STATES": "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"})
  assert r.returncode == 0, r.stderr
  assert calls()[0] == ["compute", "tpus", "queued-resources", "create", "exp1", "--node-id", "exp1", "--zone",
                        "us-west4-a", "--accelerator-type", "v5litepod-8", "--runtime-version",
                        "tpu-ubuntu2204-base", "--spot"]
  assert verbs(calls()[1:]) == ["compute tpus queued-resources describe"] * 3 + ["compute tpus tpu-vm describe"]
  assert "+ gcloud compute tpus queued-resources create exp1" in r.stderr  # printed before running


@pytest.mark.parametrize("final", ["FAILED", "SUSPENDED"])
def test_create_reports_and_deletes_a_queued_resource_that_fails(gcloud, final):
  env, calls = gcloud
  r = script("create", "exp1", "--type", "v5litepod-8", "--zone", "z1", "--spot",
             env={**env, "FAKE_QR_STATES": f"WAITING_FOR_RESOURCES,{final}", "FAKE_QR_REASON": "no capacity"})
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (f"create.sh: error: queued resource exp1 is {final} (no capacity); "
                                               f"deleted it, nothing is billed")
  assert calls()[-1] == ["compute", "tpus", "queued-resources", "delete", "exp1", "--zone", "z1", "--quiet",
                         "--force"]
  assert "compute tpus tpu-vm describe" not in verbs(calls())  # never polled the VM that will not come


def test_create_on_demand_with_runtime_version(gcloud):
  env, calls = gcloud
  r = script("create", "exp1", "--type", "v4-32", "--zone", "us-central2-b", "--version", "tpu-vm-v4-base",
             env=env)
  assert r.returncode == 0, r.stderr
  assert calls()[0] == ["compute", "tpus", "tpu-vm", "create", "exp1", "--zone", "us-central2-b",
                        "--accelerator-type", "v4-32", "--version", "tpu-vm-v4-base"]


def test_setup_copies_to_every_worker_and_installs_the_tpu_extra_on_a_supported_python(gcloud):
  env, calls = gcloud
  r = script("setup", "exp1", "--zone", "us-west4-a", env=env)
  assert r.returncode == 0, r.stderr
  scp, ssh = calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "exp1:~/jaxmodels.tgz"
  assert "--worker=all" in scp and scp[scp.index("--zone") + 1] == "us-west4-a"
  assert not os.path.exists(os.path.dirname(scp[4]))  # the local archive is removed afterwards
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "exp1"] and "--worker=all" in ssh
  # The image's python3 is 3.10: the package goes into a venv on uv's Python 3.11 (requires-python >= 3.11).
  assert "uv venv -q --allow-existing --python 3.11 .venv" in ssh[-1]
  assert "uv pip install -q -e '.[tpu]' --python .venv/bin/python3" in ssh[-1]
  with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
    assert 'requires-python = ">=3.11"' in f.read()


def run_experiment(env, *flags):
  return script("run", "exp1", "--zone", "us-west4-a", *flags, "--", "experiments/text_transformer.py",
                "--workdir", "gs://bucket/run1", "--config.model.num_layers=8", env=env)


def test_run_starts_the_job_detached_and_follows_its_log(gcloud, tmp_path):
  env, calls = gcloud
  r = run_experiment(env)
  assert r.returncode == 0, r.stderr
  start, follow, status = calls()
  assert start[:5] == follow[:5] == ["compute", "tpus", "tpu-vm", "ssh", "exp1"]
  assert all("--worker=all" in c for c in (start, follow, status))
  assert "nohup setsid bash -c" in start[-1] and "tail -n +1 -F --pid=" in follow[-1]
  vm = tmp_path / "vm" / "jaxmodels"
  # The job ran in a session of its own (its wrapper, whose pid run.pid holds, leads it): no SSH hang-up reaches it.
  assert (tmp_path / "vm" / "sid").read_text().strip() == (vm / "run.pid").read_text().strip()
  assert (vm / "run.exit").read_text().strip() == "0"
  log = (vm / "run.log").read_text()
  assert ("job 1: experiments/text_transformer.py --workdir gs://bucket/run1 --config.model.num_layers=8 "
          "(JAXMODELS_DISTRIBUTED=auto)") in log
  assert "final: step 10" in r.stdout and "final: step 10" in log
  (local,) = os.listdir(tmp_path / "logs")
  assert local.startswith("exp1-") and "final: step 10" in (tmp_path / "logs" / local).read_text()


def test_run_reattaches_after_a_dropped_connection(gcloud, tmp_path):
  env, calls = gcloud
  r = run_experiment({**env, "FAKE_JOBS": "hold", "FAKE_DROP_FOLLOWS": "1"})
  assert r.returncode == 0, r.stderr
  assert "the connection dropped; the job is still running: reattaching" in r.stderr
  assert (tmp_path / "vm" / "starts").read_text().strip() == "1"  # followed again, not restarted
  assert "tail -n 20 -F" in calls()[-2][-1] and "final: step 10" in r.stdout


def test_run_refuses_to_start_a_second_job(gcloud, tmp_path):
  env, _ = gcloud
  holder = subprocess.Popen(["sleep", "60"])
  try:
    (tmp_path / "vm" / "jaxmodels" / "run.pid").write_text(str(holder.pid))
    r = run_experiment(env)
  finally:
    holder.kill()
    holder.wait()
  assert r.returncode == 2 and "could not start the job on exp1 (exit status 3)" in r.stderr
  assert f"a job is already running (pid {holder.pid}); stop it first" in r.stdout
  assert not (tmp_path / "vm" / "starts").exists()


def test_run_retries_after_preemption(gcloud, tmp_path):
  env, calls = gcloud
  r = script("run", "exp1", "--zone", "z1", "--retries", "2", "--type", "v5litepod-8", "--spot", "--",
             "experiments/digits_cnn.py", "--workdir", "gs://b/r", env={**env, "FAKE_JOBS": "preempt,ok"})
  assert r.returncode == 0, r.stderr
  assert verbs(calls()) == [
      "compute tpus tpu-vm ssh",  # start
      "compute tpus tpu-vm ssh",  # follow: the connection ends with the VM
      "compute tpus tpu-vm ssh",  # status: unreachable
      "compute tpus tpu-vm describe",  # -> PREEMPTED
      "compute tpus tpu-vm delete",
      "compute tpus queued-resources describe",
      "compute tpus queued-resources create",  # --spot: recreated as a queued resource
      "compute tpus queued-resources describe",  # -> ACTIVE
      "compute tpus tpu-vm describe",  # -> READY
      "compute tpus tpu-vm scp",
      "compute tpus tpu-vm ssh",  # setup
      "compute tpus tpu-vm ssh",  # the same command again: resumes from gs://b/r
      "compute tpus tpu-vm ssh",  # follow
      "compute tpus tpu-vm ssh",  # status: succeeded
  ]
  assert calls()[0][-1] == calls()[-3][-1]
  assert "recreating it and rerunning (retry 1 of 2)" in r.stderr


@pytest.mark.parametrize("outcome, status", [("died", "died"), ("exit137", "exit:137"), ("exit75", "exit:75")])
def test_run_restarts_a_job_that_died_on_a_ready_vm(gcloud, tmp_path, outcome, status):
  env, calls = gcloud
  r = run_experiment({**env, "FAKE_JOBS": f"{outcome},ok"}, "--retries", "1", "--type", "v5litepod-8")
  assert r.returncode == 0, r.stderr
  assert f"exp1 is READY but its job is {status}: starting it again (retry 1 of 1)" in r.stderr
  assert (tmp_path / "vm" / "starts").read_text().strip() == "2"
  assert not {"compute tpus tpu-vm delete", "compute tpus tpu-vm create"} & set(verbs(calls()))


def test_run_does_not_retry_a_bad_input_error(gcloud, tmp_path):
  env, _ = gcloud
  r = run_experiment({**env, "FAKE_JOBS": "exit2,ok"}, "--retries", "3", "--type", "v5litepod-8")
  assert r.returncode == 2 and "the job failed (exit status 2 on some worker; not retried)" in r.stderr
  assert "jaxmodels: error: bad input" in r.stdout
  assert (tmp_path / "vm" / "starts").read_text().strip() == "1"


@pytest.mark.parametrize("outcome, message", [("preempt", "run failed (job: unknown, VM state: PREEMPTED)"),
                                              ("died", "run failed (job: died, VM state: READY)")])
def test_run_gives_up_without_retries(gcloud, outcome, message):
  env, _ = gcloud
  r = script("run", "exp1", "--zone", "z1", "--", "experiments/digits_cnn.py", env={**env, "FAKE_JOBS": outcome})
  assert r.returncode == 2 and message in r.stderr


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


DRY_RUNS = {
    "create": ["exp1", "--type", "v5litepod-8", "--zone", "z1", "--spot"],
    "setup": ["exp1", "--zone", "z1"],
    "run": ["exp1", "--zone", "z1", "--retries", "1", "--type", "v5litepod-8", "--", "experiments/digits_cnn.py"],
    "ssh": ["exp1", "--zone", "z1", "--", "ls"],
    "logs": ["exp1", "--zone", "z1"],
    "delete": ["exp1", "--zone", "z1"],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_without_calling_or_writing(gcloud, tmp_path, name):
  env, calls = gcloud
  tmp = tmp_path / "tmpdir"
  tmp.mkdir()
  logs = os.path.join(ROOT, "tpu", "logs")
  before = set(os.listdir(logs)) if os.path.isdir(logs) else None
  env = {**env, "DRY_RUN": "1", "TMPDIR": str(tmp)}
  env.pop("TPU_LOG_DIR")
  r = script(name, *DRY_RUNS[name], env=env)
  assert r.returncode == 0, r.stderr
  assert "+ gcloud compute tpus" in r.stderr
  assert calls() == []
  assert not os.listdir(tmp)  # no archive, no temporary folder
  assert (set(os.listdir(logs)) if os.path.isdir(logs) else None) == before  # no tpu/logs, no log file


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(
      __import__("sys").executable))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (make test installs it through the dev extra)")
  scripts = [os.path.join(ROOT, "tpu", f"{n}.sh") for n in [*SCRIPTS, "common"]]
  r = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout
