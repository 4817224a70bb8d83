"""SLURM, for real: munged, slurmctld and slurmd on 127.0.0.1 run `slurm/train.sbatch` as a 2-task job.

The daemons come from Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them); where they are not
installed the test is skipped, saying so. The fixture writes its own slurm.conf and munge key in a temporary
directory and runs the daemons as the current user, so nothing outside that directory is touched.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, _free_port, read_metrics

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo")

SLURM_CONF = """\
ClusterName=jaxmodels-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
FirstJobId={first_job}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# The node's CPUs as written here, not as probed: a 2-core machine still runs 2 tasks of 1 CPU each.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _pid(path) -> int | None:
  try:
    with open(path, encoding="utf-8") as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
  """The environment of a one-node SLURM cluster on 127.0.0.1 (SLURM_CONF), its daemons started here and stopped
  after the module's tests; jobs run this checkout's jaxmodels with 4 simulated CPU devices per task."""
  missing = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
  if missing:
    pytest.skip(f"SLURM is not installed here (no {', '.join(missing)}): `apt-get install -y slurm-wlm munge` "
                f"provides it (.ci/run does so where apt-get works)")
  d = tmp_path_factory.mktemp("slurm")
  for sub in ("state", "spool"):
    (d / sub).mkdir()
  (d / "munge.key").write_bytes(os.urandom(1024))
  os.chmod(d / "munge.key", 0o400)
  conf = d / "slurm.conf"
  user = subprocess.check_output(["id", "-un"], text=True).strip()  # the daemons and the jobs run as this user
  # A job's coordinator port is derived from its id (jax's SlurmCluster): a random first id keeps two test
  # sessions on one machine apart.
  conf.write_text(SLURM_CONF.format(user=user, ctld_port=_free_port(), d_port=_free_port(), dir=d,
                                    first_job=int.from_bytes(os.urandom(2), "little") + 1000))
  env = {**os.environ, "SLURM_CONF": str(conf), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/sbin", os.environ.get("PATH", "")]),
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
  pid_files = [d / "munged.pid", d / "slurmctld.pid", d / "slurmd.pid"]
  try:
    for cmd in (["munged", "--force", f"--key-file={d / 'munge.key'}", f"--socket={d / 'munge.socket'}",
                 f"--pid-file={pid_files[0]}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
                ["slurmctld", "-i"], ["slurmd", "-N", "localhost"]):
      subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)  # each daemonizes once ready
    for _ in range(300):
      state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False)
      if state.stdout.strip() == "idle":
        break
      time.sleep(0.2)
    else:
      pytest.fail(f"the SLURM node never became idle: {state.stdout}{state.stderr}"
                  f"{(d / 'slurmctld.log').read_text()[-2000:]}")
    yield env
  finally:
    subprocess.run(["scancel", "--user", user], env=env, capture_output=True, check=False)
    for pid in map(_pid, reversed(pid_files)):  # the daemons this fixture started, by the pids they wrote
      if pid:
        try:
          os.kill(pid, 15)
        except ProcessLookupError:
          pass


TRAIN = ["--config", "experiments/text_transformer.py", "--config.parallel.strategy=dp",
         "--config.data.seq_len=16", "--config.model.num_layers=1", "--config.model.d_model=16",
         "--config.model.d_ff=32", "--config.model.max_len=16", "--config.train.batch_size=8",
         "--config.train.eval_batch_size=64", "--config.train.steps=20",
         "--config.train.warmup_steps=2", "--config.train.log_every=5", "--config.train.eval_every=20",
         "--config.checkpoint.every=100"]


def sbatch(env, out, *args) -> str:
  """Submits slurm/train.sbatch as one node's 2 tasks of 1 CPU (no GPUs) running `jaxmodels train ARGS`."""
  r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0",
                      "--cpus-per-task=1", "--time=10", f"--output={out}", "slurm/train.sbatch", *args],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == 0, r.stderr
  return r.stdout.strip().split(";")[0]


def job_end(env, job: str, timeout_s: float = 500) -> tuple[str, str]:
  """(JobState, ExitCode) of `job` once it has ended."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    info = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                          check=False).stdout
    state = re.search(r"JobState=(\S+)", info)
    if state and state.group(1) not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
      return state.group(1), re.search(r"ExitCode=(\S+)", info).group(1)
    time.sleep(0.5)
  raise AssertionError(f"job {job} still running after {timeout_s} s")


@pytest.mark.slow
def test_a_two_task_slurm_job_matches_one_process_saves_on_scancel_term_and_resumes(tmp_path, slurm_env):
  """2 tasks of 4 CPU devices each, jax.distributed initialised from SLURM's variables: `scancel --signal=TERM`
  saves one checkpoint on both tasks and ends the job with exit code 75; resubmitted, the job resumes from it and
  ends with the losses of one process on 8 devices."""
  workdir = tmp_path / "run"
  job = sbatch(slurm_env, tmp_path / "first.out", *TRAIN, f"--workdir={workdir}")
  # TERM once the job has joined jax.distributed (the line follows): JAX's preemption service owns SIGTERM from
  # then on, so however fast the steps run, the tasks agree on a step of the loop and save it there.
  deadline = time.monotonic() + 400
  while not re.search(r"^0: .*training steps 0\.\.20 into", (tmp_path / "first.out").read_text()
                      if (tmp_path / "first.out").exists() else "", re.M):
    assert time.monotonic() < deadline, "the job never started training"
    time.sleep(0.1)
  subprocess.run(["scancel", "--signal=TERM", job], env=slurm_env, check=True, timeout=60)
  single = subprocess.run([sys.executable, "-m", "jaxmodels", "train", *TRAIN, f"--workdir={tmp_path / 'single'}"],
                          cwd=ROOT, env={**slurm_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          capture_output=True, text=True, timeout=600, check=False)
  assert single.returncode == 0, single.stderr
  assert job_end(slurm_env, job) == ("FAILED", "75:0")
  first = (tmp_path / "first.out").read_text()
  saved = re.findall(r"^(\d): preemption notice: saved step (\d+); rerun the same command to resume", first, re.M)
  assert sorted(task for task, _ in saved) == ["0", "1"] and saved[0][1] == saved[1][1], first
  step = int(saved[0][1])
  assert 1 <= step < 20 and sorted(os.listdir(workdir / "checkpoints")) == [str(step)]

  again = sbatch(slurm_env, tmp_path / "second.out", *TRAIN, f"--workdir={workdir}")
  assert job_end(slurm_env, again) == ("COMPLETED", "0:0"), (tmp_path / "second.out").read_text()
  assert f"training steps {step}..20" in (tmp_path / "second.out").read_text()
  by_step = lambda w: {(r["step"], r["split"]): r["loss"] for r in read_metrics(w) if "loss" in r}  # the last one
  multi, one = by_step(workdir), by_step(tmp_path / "single")
  assert sorted(multi) == sorted(one) and (20, "eval") in one
  for key, loss in one.items():
    assert multi[key] == pytest.approx(loss, rel=1e-4), key  # all-reduce order differs across processes
