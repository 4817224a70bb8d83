"""Compile observability: the persistent compilation cache, compile timings and recompilation alarms.

JAX reports the time of each tracing, lowering and XLA compilation through
`jax.monitoring`; `CompileTimer` collects them. `RecompileAlarm` watches the
train and eval steps: when one compiles again after its first compile (a changed
shape, dtype, sharding or static argument), it names the function and what
changed, and raises instead under `train.fail_on_recompile`. No per-step host
sync is involved: the check reads the jit cache size, a C++ counter, or for a
pmapped step (a plain Python function over an inner jit) whether the call
reported a trace, lowering or compile event.
"""

import importlib.metadata
import os
import re
import sys
import threading
import warnings

import jax
from jax import monitoring

from jaxmodels.runtime.errors import UserError

__all__ = ["COMPILE_EVENT", "CompileTimer", "DEFAULT_CACHE_DIR", "enable_persistent_cache", "libtpu_problem",
           "LOWER_EVENT", "RecompileAlarm", "signature", "TRACE_EVENT"]

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxmodels", "xla")


def enable_persistent_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory`, else JAXMODELS_CACHE_DIR, else JAX's own
  JAX_COMPILATION_CACHE_DIR, else ~/.cache/jaxmodels/xla.

  Thresholds are zero, so even the small steps of a laptop run are cached. Call
  it before any array exists. Returns the directory; None, after a one-line note on stderr, where the directory
  cannot be made (a read-only home, JAXMODELS_CACHE_DIR under a file): the command runs without the cache.
  """
  directory = os.path.expanduser(directory or os.environ.get("JAXMODELS_CACHE_DIR")
                                 or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # a cache only saves compile time: no reason to refuse to train, eval or sample
    print(f"jaxmodels: note: no persistent compilation cache: cannot make {directory} (set JAXMODELS_CACHE_DIR to "
          f"a writable directory): {e.strerror or e}", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def libtpu_problem() -> str | None:
  """Why the installed libtpu does not fit this jax (None when it does, or when none is installed).

  jax pins the libtpu it was built against (its `tpu` extra). A different libtpu
  still loads, but its profiler plugin has another ABI and `jax.profiler`
  segfaults once the plugin is loaded (seen with jax 0.10.2 + libtpu 0.0.52:
  "Unexpected PLUGIN_Profiler_Api size"). Neither jax nor libtpu checks this.
  """
  try:
    installed = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None
  for requirement in importlib.metadata.requires("jax") or []:
    pin = re.match(r"libtpu\s*==\s*([\w.]+?)(\.\*)?\s*;.*extra\s*==\s*.tpu.", requirement)
    if pin:
      version, wildcard = pin.groups()
      if installed == version or (wildcard and installed.startswith(version + ".")):
        return None
      return (f"libtpu {installed} is installed, but jax {jax.__version__} is built for libtpu "
              f"{version}{wildcard or ''}; fix it with: pip install 'jax[tpu]=={jax.__version__}'")
  return None


_EVENTS = {TRACE_EVENT: "trace_s", LOWER_EVENT: "lower_s", COMPILE_EVENT: "compile_s"}
_active_timers: list["CompileTimer"] = []
_listening = False


def _listener(event: str, duration: float, **_) -> None:
  if event in _EVENTS:
    thread = threading.get_ident()
    for timer in _active_timers:
      if timer.thread == thread:
        timer.seconds[_EVENTS[event]] += duration
        timer.events += 1


class CompileTimer:
  """Sums the trace / lower / compile seconds JAX reports while it is active (a context manager).

  Only compiles run by the thread that entered it count (JAX reports them on the
  compiling thread), so a background thread's compile, such as an async
  checkpoint's, is not mistaken for the step's. One process-wide listener feeds
  every active timer: jax.monitoring listeners cannot be removed, so they are
  registered once.
  """

  def __init__(self):
    self.seconds = dict.fromkeys(_EVENTS.values(), 0.0)
    self.events = 0  # trace, lower and compile events seen
    self.thread = threading.get_ident()

  def __enter__(self):
    global _listening  # pylint: disable=global-statement
    if not _listening:
      monitoring.register_event_duration_secs_listener(_listener)
      _listening = True
    self.thread = threading.get_ident()
    _active_timers.append(self)
    return self

  def __exit__(self, *exc):
    _active_timers.remove(self)


def signature(tree) -> dict[str, str]:
  """'path' -> 'dtype[shape] spec' for every array leaf: what a jit cache is keyed on."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  spec = lambda x: getattr(getattr(x, "sharding", None), "spec", "")
  return {jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)} {spec(x)}".strip()
          for path, x in leaves if hasattr(x, "shape")}


class RecompileAlarm:
  """Warns (or raises) when a watched jitted function compiles a second time."""

  def __init__(self, fail: bool = False, log=None):
    self.fail, self.log = fail, log
    self.compiles: dict[str, int] = {}
    self._first: dict[str, dict] = {}

  def check(self, name: str, fn, args, step: int, timer: CompileTimer | None = None) -> None:
    """Call after `fn(*args)`; compares the jit cache size with the last call's.

    A function without a jit cache counter (`jax.pmap`'s wrapper) counts as
    compiled when `timer`, a CompileTimer around the call, saw a trace, lowering
    or compile event; without a timer it is not watched.
    """
    seen = self.compiles.get(name, 0)
    if hasattr(fn, "_cache_size"):
      size = fn._cache_size()  # pylint: disable=protected-access
    elif timer is not None:
      size = seen + (timer.events > 0)
    else:
      return
    if size == seen:
      return
    self.compiles[name] = size
    if seen == 0:
      self._first[name] = signature(args)
      return
    now = signature(args)
    first = self._first[name]
    changed = [f"{k}: {first.get(k, 'absent')} -> {v}" for k, v in now.items() if first.get(k) != v]
    changed += [f"{k}: {v} -> absent" for k, v in first.items() if k not in now]
    what = "; ".join(changed[:5]) or "a static argument or the jit cache (no array argument changed)"
    message = f"{name} recompiled (compile #{size}) at step {step}: {what}"
    if self.fail:
      raise UserError(f"{message} (train.fail_on_recompile=true)")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    if self.log is not None:
      self.log(f"warning: {message}")
