"""Host-process settings that the `jaxmodels` entry points apply before JAX starts its runtime.

Written by hand because no JAX-ecosystem library covers it: XLA's CPU runtime
allocates each execution's temporary buffer (tens of MB for a small model, GBs
for a large one) with `posix_memalign` from a worker thread. glibc serves a
request that large with a fresh `mmap` and unmaps it when the step frees it, so
every step pays a page fault and the kernel's zeroing for each page of its
temporary memory. For text_transformer at batch 12 on the development CPU that
was a 76 MB map per step, 18 K page faults, and 80 -> 64 ms of step time once
removed. `keep_freed_memory` makes glibc keep freed memory for reuse instead.

Researchers who call jaxmodels from their own scripts can call it themselves,
first thing, before any JAX array exists.
"""

import ctypes
import os
import platform

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def keep_freed_memory() -> bool:
  """One malloc arena, no mmap'd chunks, no trimming: a step's buffers reuse the last step's pages.

  The process keeps its peak heap rather than returning it to the OS between
  steps (it needs that memory again at the next step). Applies on Linux with
  glibc only, before JAX creates its worker threads (their arenas are chosen at
  their first allocation); JAXMODELS_MALLOC=system leaves the allocator alone.
  Returns whether the settings are in effect.
  """
  global _applied  # pylint: disable=global-statement
  if _applied:
    return True
  if os.environ.get("JAXMODELS_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  _applied = bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                  and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
  return _applied
