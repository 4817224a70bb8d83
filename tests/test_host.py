"""The entry points' restart with glibc's huge-page tunable: a large buffer freed and allocated again
(as XLA's CPU runtime does with each step's temporaries) no longer faults in every 4 KiB page again."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from jaxmodels.runtime import host

# Restarts itself like the entry points do, then allocates, touches and frees 64 MB ten times
# through malloc itself (numpy asks for huge pages on its own) and prints the GLIBC_TUNABLES it started with
# (/proc/self/environ), its page faults, and the GLIBC_TUNABLES it and a child process it starts see.
PROBE = """
import ctypes, os, resource, subprocess, sys
from jaxmodels.runtime import host
host.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  p = libc.malloc(64 * 2**20)
  ctypes.memset(p, 1, 64 * 2**20)
  libc.free(p)
started = [v for v in open("/proc/self/environ", "rb").read().decode().split("\\0") if v.startswith("GLIBC_TUNABLES=")]
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', '-'))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(started[0].partition("=")[2] if started else "-", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      os.environ.get("GLIBC_TUNABLES", "-"), child)
"""


def probe(malloc_env: str, **env_vars) -> tuple[str, int, str, str]:
  """(GLIBC_TUNABLES the probe's final process started with, its page faults, GLIBC_TUNABLES in its os.environ,
  GLIBC_TUNABLES in a child process it starts), "-" for unset."""
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  env.update(JAXMODELS_MALLOC=malloc_env, **env_vars)
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  return out[0], int(out[1]), out[2], out[3]


def transparent_huge_pages() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read()
  except OSError:
    return "[never]"


@pytest.mark.skipif(not sys.platform.startswith("linux") or "[never]" in transparent_huge_pages(),
                    reason="needs Linux with transparent huge pages (madvise or always)")
def test_restart_with_huge_pages_cuts_page_faults():
  tunables, faults, _, _ = probe("")
  untouched, system_faults, _, _ = probe("system")
  assert (tunables, untouched) == ("glibc.malloc.hugetlb=1", "-")
  if "[always]" in transparent_huge_pages():
    return  # the kernel gives huge pages unasked: there are no 4 KiB faults to save
  pages = 10 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  assert system_faults > pages / 2
  assert 4 * faults < system_faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/environ")
def test_huge_page_restart_does_not_reach_child_processes_and_is_cpu_only():
  # Restarted with the tunable, the process hides it again: neither its environment nor a child's holds it.
  started, _, tunables, child = probe("")
  assert (started, tunables, child) == ("glibc.malloc.hugetlb=1", "-", "-")
  # A user's own tunables stay as they were.
  assert probe("", GLIBC_TUNABLES="glibc.malloc.arena_max=2")[2:] == ("glibc.malloc.arena_max=2",) * 2
  # Not on a TPU or GPU backend: no restart at all.
  assert probe("", JAX_PLATFORMS="tpu")[0] == "-"


def test_cpu_backend_follows_jax_platforms_and_accelerator_device_files(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host.glob, "glob", lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
  assert not host.cpu_backend()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host.cpu_backend()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host.cpu_backend()
