"""Will a compiled step fit in device memory? Per-chip capacity, the bytes a step needs, and XLA's OOM messages.

A step needs, per device, its arguments, the outputs that do not reuse a donated
argument's buffer, its temporaries and its generated code, as XLA's memory
analysis of the compiled program reports them (`needed_bytes`). The capacity
comes from the attached device (`memory_stats()['bytes_limit']`, the allocator's
limit: on a GPU that is XLA's preallocated share) or, for a TPU compiled ahead of
time, from `CAPACITY`. A CPU reports no limit: its verdict is unknown, never "fits".

XLA itself refuses only a program whose temporaries exceed the chip's memory
(`RESOURCE_EXHAUSTED: ... HLO temporaries (48.14G) exceeds available HBM
(15.75G)`), so a step can compile and still fail on its first run; and a refused
compile is an exception, not a figure. `refused` turns that message into the same
record as a verdict (`fits: false`), and `explain` into one line for the CLI.
Hand-written: neither JAX nor XLA exposes a chip's capacity for a device it has
not attached, nor parses its own out-of-memory messages.
"""

import re

__all__ = ["BANDWIDTH", "CAPACITY", "capacity", "explain", "figures", "first_line", "GiB", "gib", "is_oom", "listed",
           "needed_bytes", "refused", "verdict"]

GiB = 2**30
# Per-chip memory, bytes, matched against `device.device_kind` (longest name first). Sources: TPU system
# architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e
# (Trillium) 32 GiB HBM per chip; for v5e the figure is the 15.75 GiB XLA reports as available when it refuses
# a program (libtpu 0.0.42, measured here), as XLA keeps 0.25 GiB. NVIDIA datasheets: A100 40 GB / 80 GB
# (nvidia.com/en-us/data-center/a100), H100 SXM 80 GB (.../h100), H200 141 GB (.../h200); an attached GPU's
# own `bytes_limit` is used before this table.
CAPACITY = {
    "TPU v4": 32 * GiB, "TPU v5 lite": int(15.75 * GiB), "TPU v5e": int(15.75 * GiB), "TPU v5p": 95 * GiB,
    "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB,
    "A100-SXM4-40GB": 40 * GiB, "A100-PCIE-40GB": 40 * GiB, "A100": 80 * GiB, "H100": 80 * 10**9,
    "H200": 141 * 10**9,
}
# HBM bandwidth per chip, bytes/s, from the same pages: v4 1200 GB/s, v5e 819 GB/s, v5p 2765 GB/s, v6e
# 1640 GB/s; A100 40 GB 1555 GB/s, A100 80 GB 2039 GB/s, H100 SXM 3.35 TB/s, H200 4.8 TB/s.
BANDWIDTH = {
    "TPU v4": 1200e9, "TPU v5 lite": 819e9, "TPU v5e": 819e9, "TPU v5p": 2765e9, "TPU v5": 2765e9,
    "TPU v6 lite": 1640e9, "TPU v6e": 1640e9, "A100-SXM4-40GB": 1555e9, "A100-PCIE-40GB": 1555e9, "A100": 2039e9,
    "H100": 3350e9, "H200": 4800e9,
}
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)(?:i?B)?"
# (pattern, what its first figure measures); the second figure, when present, is the memory available.
_OOM_MESSAGES = (
    (rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", "HLO temporaries alone"),
    (rf"Used {_SIZE} of {_SIZE} hbm", "the program"),
    (rf"Attempting to (?:allocate|reserve) {_SIZE}\.? .*?There (?:are|is) {_SIZE} free", "one allocation"),
    (rf"(?:trying|Failed) to allocate {_SIZE}(?: bytes)?", "one allocation"),
)


def listed(table: dict, device_kind: str):
  """The value of `table` (CAPACITY, BANDWIDTH) for a device kind, matching its longest listed name; None."""
  for kind, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
    if kind.lower() in device_kind.lower():
      return value
  return None


def capacity(device) -> tuple[int | None, str]:
  """(bytes of memory per device, where the figure comes from); (None, why) when unknown (CPUs)."""
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except RuntimeError:  # JaxRuntimeError: a device of an unattached topology has no memory statistics
    limit = None
  if limit and device.platform != "cpu":
    return int(limit), f"{device.device_kind}: memory_stats()['bytes_limit'] of the attached device"
  size = listed(CAPACITY, device.device_kind)
  if size:
    return size, f"{device.device_kind}: {size / GiB:.2f} GiB per chip (jaxmodels.runtime.hbm.CAPACITY)"
  return None, f"{device.device_kind}: unknown (the device reports no memory limit)"


def needed_bytes(memory) -> int:
  """Bytes per device a compiled step needs, from `compiled.memory_analysis()`: arguments + outputs that do
  not alias a donated argument + temporaries + generated code."""
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def verdict(memory, device) -> dict:
  """The memory fields of a results record for a compiled step (`memory`: its memory_analysis()).

  `fits` is True or False against the device's capacity, None where that is unknown.
  """
  need = needed_bytes(memory)
  have, source = capacity(device)
  return {"needed_bytes": need, "device_memory_bytes": have, "device_memory_source": source,
          "headroom_bytes": None if have is None else have - need, "fits": None if have is None else need <= have}


def is_oom(error: BaseException) -> bool:
  """Whether `error` is XLA's device out-of-memory error (a JaxRuntimeError with RESOURCE_EXHAUSTED about
  memory), at compile or at run time."""
  import jax  # pylint: disable=import-outside-toplevel
  text = str(error)
  return (isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in text
          and bool(re.search(r"memory|HBM|allocat", text, re.I)))


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


def figures(message: str) -> dict:
  """{'needed_bytes', 'available_bytes' (or None), 'needed_what'} read from an XLA out-of-memory message;
  {} when the message carries no figure."""
  for pattern, what in _OOM_MESSAGES:
    m = re.search(pattern, message, re.S)
    if m:
      g = m.groups()
      return {"needed_bytes": _bytes(*g[:2]), "available_bytes": _bytes(*g[2:4]) if len(g) > 2 else None,
              "needed_what": what}
  return {}


def first_line(error: BaseException) -> str:
  return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def refused(error: BaseException, device) -> dict:
  """The memory fields of a record for a compile or run that XLA refused for lack of memory (`is_oom`).

  `needed_bytes` is a lower bound when XLA names only part of the need (its temporaries).
  """
  f = figures(str(error))
  have, source = capacity(device)
  if f.get("available_bytes"):
    have, source = f["available_bytes"], f"{device.device_kind}: available memory as XLA's error states it"
  need = f.get("needed_bytes")
  return {"needed_bytes": need, "needed_what": f.get("needed_what", "unknown"), "device_memory_bytes": have,
          "device_memory_source": source,
          "headroom_bytes": None if need is None or have is None else have - need, "fits": False,
          "oom": first_line(error)}


def gib(n) -> str:
  return "-" if n is None else f"{n / GiB:.2f} GiB"


def explain(error: BaseException, plan_command: str) -> str:
  """One line for a run that died of `is_oom(error)`: the bytes needed and available, and the plan to run."""
  f = figures(str(error))
  need = (f"{f['needed_what']} need {gib(f['needed_bytes'])}" if f else "the step needs more memory")
  have = f" of {gib(f['available_bytes'])} available" if f.get("available_bytes") else ""
  return (f"the device ran out of memory: {need}{have} ({first_line(error)[:160]}). Find a setting that fits "
          f"with: {plan_command}")
