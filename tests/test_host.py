"""The host allocator setting of the entry points: freed step buffers are reused, not unmapped and faulted in again."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Allocates and frees a 64 MB buffer ten times (as XLA's CPU runtime does with a step's temporaries)
# and prints the page faults that took.
PROBE = """
import resource, sys
import numpy as np
from jaxmodels import host
applied = host.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  a = np.ones(16 * 2**20, np.float32)
  del a
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(malloc_env: str) -> tuple[str, int]:
  env = {**os.environ, "JAXMODELS_MALLOC": malloc_env}
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting applies to glibc only")
def test_keep_freed_memory_reuses_pages():
  applied, faults = probe("")
  untouched, system_faults = probe("system")
  assert (applied, untouched) == ("True", "False")
  # glibc maps each 64 MB buffer afresh and faults all of it in again; kept, only the first one faults
  assert 5 * faults < system_faults
