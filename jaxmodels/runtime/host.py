"""Host-process settings that the `jaxmodels` entry points apply before JAX starts.

Written by hand because no JAX-ecosystem library covers it: XLA's CPU runtime
allocates each execution's temporary buffer (tens of MB for a small model, GBs
for a large one) with `posix_memalign` from a worker thread. glibc serves a
request that large with a fresh `mmap` and unmaps it when the step frees it, so
every step the kernel faults in and zeroes its whole temporary memory again,
one 4 KiB page at a time. For text_transformer at batch 12 on the development
CPU that was a 76 MB map and 18 K page faults per step. With glibc's
`glibc.malloc.hugetlb=1` tunable those maps are backed by transparent huge
pages (2 MiB, so ~40 faults): the step went from ~85 to ~61 ms.

Tunables are read when a process starts, so the entry points re-execute the
process once with the tunable set, on CPU backends only (an accelerator's step
temporaries live in device memory, and a TPU or GPU host gains nothing from the
restart). The restarted process puts GLIBC_TUNABLES back as it was, so the
processes a user's code starts do not inherit the tunable. (Keeping freed memory instead, through
mallopt's one-arena/no-mmap settings, saved as much step time but made XLA's
multi-threaded compiles ~40% slower.)

`cpu_only_platform` keeps libtpu quiet on machines without accelerators (see there).
"""

import glob
import os
import platform
import sys

__all__ = ["ACCELERATOR_DEVICE_FILES", "accelerator_present", "cpu_backend", "cpu_only_platform",
           "reexec_with_huge_pages", "SAVED_TUNABLES", "TUNABLE"]

TUNABLE = "glibc.malloc.hugetlb=1"
# Set only across the restart: GLIBC_TUNABLES as it was before it ("" when unset), restored by the restarted process.
SAVED_TUNABLES = "JAXMODELS_SAVED_GLIBC_TUNABLES"


def reexec_with_huge_pages() -> None:
  """Restarts this process with the same command line and `glibc.malloc.hugetlb=1` in GLIBC_TUNABLES.

  Returns without restarting when the tunable is already set, off Linux/glibc,
  with JAXMODELS_MALLOC=system, or when JAX will not run on the CPU
  (`cpu_backend`). The restarted process (this call, in it) restores
  GLIBC_TUNABLES to its value before the restart: glibc has read it by then, and
  child processes do not inherit it. Call it first thing, before any work that a
  restart would repeat. Kernels whose transparent huge pages are `never` and
  glibc older than 2.35 ignore the tunable; the restart then costs only itself.
  """
  if SAVED_TUNABLES in os.environ:  # the restarted process: glibc has read the tunable; hide it from children
    saved = os.environ.pop(SAVED_TUNABLES)
    if saved:
      os.environ["GLIBC_TUNABLES"] = saved
    else:
      os.environ.pop("GLIBC_TUNABLES", None)
    return
  if (os.environ.get("JAXMODELS_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc"
      or not cpu_backend()):
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  os.environ[SAVED_TUNABLES] = tunables
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


# Device files of accelerators: TPU chips (/dev/accel*, or /dev/vfio/N on newer TPU VMs), NVIDIA and AMD GPUs.
ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/kfd")


def accelerator_present() -> bool:
  """Whether the machine has a TPU or GPU device file (checked without importing JAX)."""
  return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def cpu_backend() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or it is unset and no accelerator is present."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_present()


def cpu_only_platform() -> None:
  """Sets JAX_PLATFORMS=cpu when the user has not chosen platforms and the machine has no accelerator.

  The `dev` extra installs libtpu (ahead-of-time TPU compiles need it). Left to
  itself, JAX then starts libtpu's runtime on every CPU machine, which prints an
  `E0000 ... INVALID_ARGUMENT: unexpected worker hostname` line and a source
  trace before falling back to the CPU: noise that reads as a failure. Checked
  from the device files alone, so it runs before JAX is imported (jax reads
  JAX_PLATFORMS at import); when JAX is already imported but has not started a
  backend, its `jax_platforms` flag is set instead. The entry points and
  `import jaxmodels` call it. AOT topology compiles load libtpu explicitly and
  are unaffected.
  """
  if "JAX_PLATFORMS" in os.environ or accelerator_present():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax = sys.modules.get("jax")
  if jax is not None:  # imported already (research code importing jax first): set its flag while it still counts
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")
