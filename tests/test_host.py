"""The entry points' restart with glibc's huge-page tunable: a large buffer freed and allocated again
(as XLA's CPU runtime does with each step's temporaries) no longer faults in every 4 KiB page again."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Restarts itself like the entry points do, then allocates, touches and frees 64 MB ten times
# through malloc itself (numpy asks for huge pages on its own) and prints the page faults.
PROBE = """
import ctypes, os, resource
from jaxmodels import host
host.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  p = libc.malloc(64 * 2**20)
  ctypes.memset(p, 1, 64 * 2**20)
  libc.free(p)
print(os.environ.get("GLIBC_TUNABLES", "-"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(malloc_env: str) -> tuple[str, int]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["JAXMODELS_MALLOC"] = malloc_env
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  return out[0], int(out[1])


def transparent_huge_pages() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read()
  except OSError:
    return "[never]"


@pytest.mark.skipif(not sys.platform.startswith("linux") or "[never]" in transparent_huge_pages(),
                    reason="needs Linux with transparent huge pages (madvise or always)")
def test_restart_with_huge_pages_cuts_page_faults():
  tunables, faults = probe("")
  untouched, system_faults = probe("system")
  assert (tunables, untouched) == ("glibc.malloc.hugetlb=1", "-")
  if "[always]" in transparent_huge_pages():
    return  # the kernel gives huge pages unasked: there are no 4 KiB faults to save
  pages = 10 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  assert system_faults > pages / 2
  assert 4 * faults < system_faults
