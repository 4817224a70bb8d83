"""`jaxmodels launch`: a multi-host job simulated on one machine, one CPU process per "host".

Each process runs `python -m jaxmodels COMMAND ...` with the JAXMODELS_* job
variables (see `distributed.py`) pointing at a coordinator on 127.0.0.1, its
own number of CPU devices, and its output forwarded line by line behind a
`[i]` prefix. If any process fails, the others are stopped (SIGTERM, then
SIGKILL) and the launcher exits with its code. A process that exits 75 (it was
preempted and saved) is not a failure: every process saves the same step and
exits 75 (see `train._Signals`), so the launcher waits for the others to finish
their saves. A signal to the launcher is passed on to every process, which save
and exit 75 in the same way.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxmodels.parallel.distributed import (
  ENV_COORDINATOR,
  ENV_NUM_PROCESSES,
  ENV_PROCESS_ID,
)
from jaxmodels.runtime.errors import Preempted

__all__ = ["free_port", "launch", "ROUTINE_LINES", "SAVE_GRACE_S"]

SAVE_GRACE_S = 300.0  # how long preempted processes may take to agree on a step and save it


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Lines a healthy job prints on every run, dropped from the forwarded output: gloo's report that a rank reached
# all its peers (printed by the C++ library itself, with no switch to turn it off), and the absl warning of JAX's
# preemption service that its pending call was cancelled at exit, which says itself that it "is expected upon
# program shutdown". A rank that did not reach them all ("connected to 0 peer ranks. Expected ... : 1"), any
# other preemption message and every other line still show.
ROUTINE_LINES = re.compile(rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                           rb"Expected number of connected peer ranks is : \1\s*$"
                           rb"|.*preemption notice\. This is expected upon program shutdown")


def _forward(i: int, stream, lock) -> None:
  for line in iter(stream.readline, b""):
    if ROUTINE_LINES.match(line):
      continue
    with lock:
      sys.stdout.write(f"[{i}] {line.decode(errors='replace')}")
      sys.stdout.flush()


def _stop(procs, grace_s: float = 5.0) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def launch(num_processes: int, args: list[str], devices_per_process: int = 1, port: int | None = None) -> int:
  """Runs `jaxmodels ARGS` as a job of `num_processes` CPU processes; returns the job's exit code."""
  port = port or free_port()
  lock = threading.Lock()
  procs, threads = [], []
  flags = os.environ.get("XLA_FLAGS", "")
  for i in range(num_processes):
    env = {**os.environ, ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes),
           ENV_PROCESS_ID: str(i), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()}
    # Own session: the whole process group can be stopped, leaving no orphans.
    p = subprocess.Popen([sys.executable, "-m", "jaxmodels", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
    print(f"[launch] process {i}: pid {p.pid}", flush=True)
    t = threading.Thread(target=_forward, args=(i, p.stdout, lock), daemon=True)
    t.start()
    threads.append(t)

  def on_signal(signum, _frame):
    _stop(procs, SAVE_GRACE_S)  # each process saves the step all of them agree on, then exits 75
    codes = {p.returncode for p in procs}
    sys.exit(Preempted.exit_code if codes == {Preempted.exit_code} else 128 + signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    code = 0
    preempted_at = None
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0, Preempted.exit_code)]
      if preempted_at is None and any(p.poll() == Preempted.exit_code for p in procs):
        preempted_at = time.monotonic()  # the others are saving the same step: let them finish
      if preempted_at is not None and time.monotonic() - preempted_at > SAVE_GRACE_S:
        with lock:
          print(f"jaxmodels launch: a process was preempted, the others did not save within {SAVE_GRACE_S:.0f} s; "
                "stopping them", file=sys.stderr, flush=True)
        _stop(procs)
        code = 1
        break
      if failed:
        code = failed[0].returncode
        with lock:
          print(f"jaxmodels launch: process {procs.index(failed[0])} exited with {code}; stopping the others",
                file=sys.stderr, flush=True)
        _stop(procs)
        break
      time.sleep(0.1)
    for t in threads:
      t.join(timeout=5)
    code = code or next((p.returncode for p in procs if p.returncode), 0)
    return code if code > 0 else (1 if code else 0)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
