"""`jaxmodels bench`: how long a train step takes to trace, lower and compile, what it costs, how fast it runs.

`compile_stats` measures any jitted function: each stage (trace, lower, compile)
the median of `repeat` cold runs with the in-memory caches cleared and the
persistent cache off, then XLA's own analyses of the optimized module (HLO
counts, cost, memory and the fits-in-HBM verdict). `compile_point` builds the
experiment's real train step (the `train` code path, under its `parallel`
settings) from abstract inputs and measures it through `compile_stats`.
`step_point` times the compiled step on real data and reports model FLOP
utilisation. Field names are stable: results files are
compared across versions (`--baseline`).
"""

import csv
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from jaxmodels.bench.summary import model_summary, preset_overrides
from jaxmodels.config import parse_override, validate, with_values
from jaxmodels.models import flops
from jaxmodels.parallel import pipeline
from jaxmodels.runtime import compilation, extras, hbm, storage
from jaxmodels.runtime.errors import UserError
from jaxmodels.runtime.host import accelerator_present
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate

__all__ = ["abstract_args", "compare_pure_jax", "COMPARED", "compile_point", "compile_stats", "CompileArgs",
           "data_point", "growth_exponent", "hlo_counts", "loop_point", "measure_compile", "parse_sweeps",
           "pipeline_fields", "plot", "pure_jax_mlp_step", "regressions", "run_compile", "run_data", "run_step",
           "split_values", "step_point", "STEPS_PER_PEAK_SAMPLE", "TABLE", "table", "time_steps", "topology_devices",
           "warm_cache_compile_s", "write_csv", "xla_flops"]

STEPS_PER_PEAK_SAMPLE = 5  # steps between the CPU peak samples of `step_point`
# Lower is better for each; --baseline compares these.
COMPARED = ("trace_s", "lower_s", "compile_s", "warm_cache_compile_s", "step_s", "temp_bytes", "hlo_ops")
TABLE = ("trace_s", "lower_s", "compile_s", "warm_cache_compile_s", "hlo_ops", "fusions", "flops", "temp_bytes",
         "needed_bytes", "headroom_bytes", "fits", "step_s", "pipeline_bubble")


def topology_devices(name: str):
  """The devices of a TPU topology that is not attached, for ahead-of-time compiles.

  `name` is a slice ('v5e:2x2') or several identical slices joined over DCN ('v5e:2x2,slices=2'); a
  multislice mesh needs `parallel.dcn_mesh` to say which axis crosses the slices. A name is described once per
  process: every call returns the same devices, so shardings made over one call's devices hold for the next.
  """
  if problem := compilation.libtpu_problem():
    warnings.warn(f"--topology {name}: {problem}", RuntimeWarning, stacklevel=2)
  topology, _, slices = name.partition(",slices=")
  if slices and not (slices.isdigit() and int(slices) > 0):
    raise UserError(f"--topology {name}: expected NAME or NAME,slices=N with N a positive integer")
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads, so a second process with
  # libtpu loaded could not describe a topology; an ahead-of-time compile claims no chip, so allow it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a TPU VM libtpu asks the metadata server for the worker hostnames, gets a warning back as the name, and
  # logs an E0000 "unexpected worker hostname" error; this host alone is the right answer for an absent slice.
  if not accelerator_present():
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    return _described(topology, int(slices or 1))
  except (RuntimeError, ValueError, ImportError) as e:  # JaxRuntimeError is a RuntimeError; no libtpu: ImportError
    # libtpu loaded and refused the name (INVALID_ARGUMENT): the name is at fault, not the install.
    hint = ("expected GENERATION:CHIPS as v5e:2x2 or v5p:2x2x1, a chip count the generation's hosts divide"
            if str(e).startswith("INVALID_ARGUMENT") else "It needs libtpu: pip install 'jaxmodels[tpu]'")
    raise UserError(f"--topology {name}: cannot describe this TPU topology ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}). {hint}") from None


@functools.cache
def _described(topology: str, slices: int) -> list:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=slices).devices


def abstract_args(exp):
  """(state, batch) as ShapeDtypeStructs carrying the layout's shardings."""
  state = jax.eval_shape(exp.init_state)
  local = exp.dataset.train_batch(0, exp.config.train.batch_size)
  return state, exp.layout.abstract_batch(local)


def hlo_counts(optimized_text: str) -> tuple[int, int]:
  """(instructions, fusion instructions) of an optimized HLO module's text."""
  instructions = re.findall(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S.*?\s([\w\-]+)\(", optimized_text, re.M)
  return len(instructions), sum(1 for op in instructions if op == "fusion")


def _stages(fn, args, kwargs):
  """One cold trace / lower / compile of `fn` (jitted or pmapped) on `args`: JAX's in-memory caches (traces,
  lowerings, executables) are cleared first. Returns (lowered, compiled, (trace_s, lower_s, compile_s))."""
  jax.clear_caches()
  t0 = time.perf_counter()
  if hasattr(fn, "trace"):
    traced = fn.trace(*args, **kwargs)
    t1 = time.perf_counter()
    lowered = traced.lower()
  else:  # jax.pmap's wrapper traces inside `lower`: its trace seconds are the ones JAX reports
    with compilation.CompileTimer() as timer:
      lowered = fn.lower(*args, **kwargs)
    t1 = t0 + timer.seconds["trace_s"]
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return lowered, compiled, (t1 - t0, t2 - t1, t3 - t2)


def _environment(devices, topology: str | None, repeat: int) -> dict:
  device = (devices or jax.devices())[0]
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": "tpu (ahead of time)" if topology else jax.default_backend(),
          "device_kind": device.device_kind, "device_count": len(devices or jax.devices()),
          "topology": topology or "", "repeat": repeat}


def _placed(args, devices):
  """`args` as ShapeDtypeStructs for a compile on `devices` (a topology's). A leaf whose sharding lies on those
  devices keeps it and the others follow them (no sharding of their own); where none does, every array leaf
  goes to the first device. Non-array leaves are left as they are."""
  on = set(devices)
  arrays = [x for x in jax.tree.leaves(args) if hasattr(x, "shape") and hasattr(x, "dtype")]
  placed = lambda x: getattr(x, "sharding", None) is not None and set(x.sharding.device_set) <= on
  other = None if any(placed(x) for x in arrays) else jax.sharding.SingleDeviceSharding(devices[0])

  def place(x):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed(x) else other)

  return jax.tree.map(place, args)


@contextlib.contextmanager
def _persistent_cache(directory: str | None):
  """For the block, the persistent compilation cache in `directory` (thresholds zero: everything is cached), or
  off (None), even in a process that has used another already; the previous setting afterwards.

  JAX decides once per process whether the cache is used and opens its directory once (at its first compile),
  so changing `jax_enable_compilation_cache` or the directory afterwards alone changes nothing (repeats 2..N of
  a "cold" compile were cache hits); its (private) reset makes it decide again. There is no public API for it.
  """
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel

  saved = {k: getattr(jax.config, k) for k in ("jax_enable_compilation_cache", "jax_compilation_cache_dir")}
  compilation_cache.reset_cache()
  jax.config.update("jax_enable_compilation_cache", directory is not None)
  if directory is not None:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    yield
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def measure_compile(fn, args, kwargs, repeat: int, devices=None, topology: str | None = None):
  """`compile_stats`'s measurement, for a function and `devices` (a topology's, or None: the local ones) already
  resolved: returns (record, lowered, compiled), the last two None when XLA refused the program for lack of
  memory (the record then holds `hbm.refused`'s fields)."""
  if repeat < 1:
    raise UserError(f"repeat={repeat}: expected at least 1")
  if not (hasattr(fn, "trace") or hasattr(fn, "lower")):
    fn = jax.jit(fn)
  if devices:
    args, kwargs = _placed((args, kwargs), devices)
  device = (devices or jax.devices())[0]
  environment = _environment(devices, topology, repeat)
  try:
    with _persistent_cache(None):
      runs = [_stages(fn, args, kwargs) for _ in range(repeat)]
  except jax.errors.JaxRuntimeError as e:
    if not hbm.is_oom(e):
      raise
    return {**environment, **hbm.refused(e, device)}, None, None
  lowered, compiled, _ = runs[-1]
  trace_s, lower_s, compile_s = (statistics.median(r[2][i] for r in runs) for i in range(3))
  hlo_ops, fusions = hlo_counts(compiled.as_text())
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  record = {
      **environment, "trace_s": trace_s, "lower_s": lower_s, "compile_s": compile_s, "hlo_ops": hlo_ops,
      "fusions": fusions, "flops": float(cost.get("flops", math.nan)),
      "bytes_accessed": float(cost.get("bytes accessed", math.nan)),
      "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes), "temp_bytes": int(memory.temp_size_in_bytes),
      "generated_code_bytes": int(memory.generated_code_size_in_bytes),
      # An ahead-of-time executable has no client to load into, so the persistent cache cannot serve it.
      "warm_cache_compile_s": math.nan if devices else warm_cache_compile_s(fn, args, kwargs),
      **hbm.verdict(memory, device),
  }
  return record, lowered, compiled


def compile_stats(fn, *args, repeat: int = 3, topology: str | None = None, **kwargs) -> dict:
  """What compiling `fn(*args, **kwargs)` costs, and whether the program fits a device: a research function's
  `jaxmodels bench compile` (which measures the experiment's train step through it).

      stats = compile_stats(jax.jit(step), params, batch, repeat=3)
      stats = compile_stats(step, jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16), topology="v5e:2x2")

  `fn` is a plain function (jitted here), a `jax.jit`-wrapped one (its static and donated arguments apply) or a
  `jax.pmap`-wrapped one; `args` and `kwargs` are concrete arrays or `jax.ShapeDtypeStruct`s (any pytree of
  them; nothing runs, and no argument is donated). `repeat` and `topology` are this function's own keywords,
  never passed to `fn`. Each stage is the median of `repeat` cold runs: JAX's in-memory caches cleared before
  each (`jax.clear_caches`), the persistent compilation cache off. `topology` (a TPU slice that is not attached,
  'v5e:2x2' or 'v5e:2x2,slices=2', see `topology_devices`; needs libtpu) compiles ahead of time for it: an
  argument whose sharding lies on the topology's devices (a `NamedSharding` over a `Mesh` of
  `topology_devices(name)`) keeps it, any other goes to its first chip. None: the local devices.

  Returns a dict (the fields of `bench compile`'s results records; docs/benchmarking.md lists them):

  - `trace_s`, `lower_s`, `compile_s`: seconds to trace to a jaxpr, lower to StableHLO, and compile with XLA
    (medians); `warm_cache_compile_s`: seconds to compile again from a warm persistent cache (nan with a topology).
  - `hlo_ops`, `fusions`: instructions, and fusion instructions among them, of XLA's optimized module.
  - `flops` (FLOP) and `bytes_accessed` (bytes): XLA's cost analysis of the program ONE device runs (multiply by
    the devices for a sharded program); a `lax.scan` (or `while`) body is counted once, not once per iteration.
  - `argument_bytes`, `output_bytes`, `alias_bytes` (outputs living in donated arguments), `temp_bytes`,
    `generated_code_bytes`: XLA's memory analysis, bytes per device.
  - `needed_bytes` (per device: arguments + outputs not aliased + temporaries + code), `device_memory_bytes`,
    `device_memory_source`, `headroom_bytes`, `fits` (True/False, None where the device's memory is unknown, as
    on a CPU): `jaxmodels.runtime.hbm.verdict`. A program XLA refuses for lack of memory gives `fits` False, the
    figures of XLA's message, its first line as `oom`, and no timings.
  - `jax`, `jaxlib`, `backend`, `device_kind`, `device_count` (the topology's or the local devices), `topology`,
    `repeat`.

  Raises UserError for `repeat` < 1 or a topology that cannot be described; XLA's own errors otherwise.
  """
  devices = topology_devices(topology) if topology else None
  return measure_compile(fn, args, kwargs, repeat, devices, topology)[0]


def pipeline_fields(config, exp) -> dict:
  """{'pipeline_bubble': (stages - 1) / (microbatches x repeats + stages - 1)} for an experiment whose mesh has a
  `stage` axis (`jaxmodels.parallel.pipeline.Schedule.bubble_fraction`), else {}."""
  p = config.parallel
  schedule = pipeline.schedule_for(getattr(exp.layout, "mesh", None), p.pipeline_microbatches, p.pipeline_repeats)
  return {} if schedule is None else {"pipeline_bubble": schedule.bubble_fraction}


def compile_point(config, repeat: int = 3, topology: str | None = None, dump_dir: str | None = None,
                  label: str = "point", steps: int = 10, log=None) -> dict:
  """Compile (and, without a topology, run) the experiment's train step; returns one results record. `log`
  (print) gets the model summary line and preset notes (jaxmodels.bench.summary) before the compile.

  The step is built once from abstract inputs (`abstract_args`) and measured by `compile_stats` (its fields),
  plus `label`, with a `stage` mesh axis `pipeline_bubble` (the schedule's idle fraction,
  `jaxmodels.parallel.pipeline.Schedule.bubble_fraction`), and the analytic `model_flops`, and without a
  topology `step_point`'s fields. A compile or run that XLA refuses for lack of memory returns a record with fits
  False, the figures of XLA's message and its first line as `oom`.
  """
  devices = topology_devices(topology) if topology else None
  if topology and config.parallel.strategy == "pmap":
    raise UserError("--topology compiles jit strategies; pmap has no ahead-of-time path")
  exp = build_experiment(config, devices=devices)
  if log is not None:
    log("\n".join([model_summary(exp), *preset_overrides(config)]))
  stats, lowered, compiled = measure_compile(exp.train_step, abstract_args(exp), {}, repeat, devices, topology)
  record = {"label": label, **stats, **pipeline_fields(config, exp)}
  if compiled is None:
    return record
  record["model_flops"], record["hardware_flops"] = exp.model_flops, exp.hardware_flops
  if not topology:
    try:
      record.update(step_point(exp, steps=steps, warmup=2))
    except jax.errors.JaxRuntimeError as e:
      if not hbm.is_oom(e):
        raise
      record.update(fits=False, oom=hbm.first_line(e))  # compiled, then refused its buffers when it ran
  if dump_dir:
    dump = storage.path(dump_dir)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"{label}.pre.hlo.txt").write_text(lowered.as_text(dialect="hlo"))
    (dump / f"{label}.post.hlo.txt").write_text(compiled.as_text())
  return record


def warm_cache_compile_s(fn, args, kwargs) -> float:
  """Seconds to compile `fn` (jitted) with the persistent cache warm: populate a fresh cache dir, clear memory,
  compile again."""
  with tempfile.TemporaryDirectory() as cache, _persistent_cache(cache):
    _stages(fn, args, kwargs)
    return _stages(fn, args, kwargs)[2][2]


def step_point(exp, steps: int = 20, warmup: int = 3) -> dict:
  """Median and spread of the compiled step's wall time on one device-resident batch, throughput and MFU.

  On a device the peak table does not list (a CPU), the peak is a float32 matmul
  measured between every `STEPS_PER_PEAK_SAMPLE` steps, and MFU divides by the median of
  those samples: a shared machine's speed drifts, and step and peak then drift together.
  """
  t = exp.config.train
  state, batch = exp.init_state(), exp.batch(0)
  for _ in range(warmup):
    state, m = exp.train_step(state, batch)
  jax.block_until_ready(m)
  listed = flops.datasheet_peak()
  times, peaks = [], []
  for i in range(steps):
    if listed is None and i % STEPS_PER_PEAK_SAMPLE == 0:
      peaks.append(flops.matmul_flops())
    t0 = time.perf_counter()
    state, m = exp.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  if listed is None:
    peak, peak_source = statistics.median(peaks), f"a float32 2048x2048 matmul timed in this process, median of {len(peaks)} between steps"
  else:
    peak, peak_source = flops.peak_flops(exp.layout.device_count)
  out = {"step_s": step_s, "step_ms": 1e3 * step_s, "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
         "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "examples_per_sec": t.batch_size / step_s,
         "model_flops": exp.model_flops, "peak_flops": peak, "peak_source": peak_source,
         "mfu": exp.model_flops / step_s / peak, "hardware_flops": exp.hardware_flops,
         "hfu": exp.hardware_flops / step_s / peak}
  if exp.dataset.task == "lm":
    out["tokens_per_sec"] = t.batch_size * exp.config.data.seq_len / step_s
  return out


def xla_flops(exp) -> float:
  """XLA's FLOP count of the compiled train step on all its devices (the cross-check of the analytic count).

  XLA counts the program one device runs, so this multiplies by the step's devices.
  """
  cost = exp.train_step.lower(*abstract_args(exp)).compile().cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", math.nan)) * exp.layout.device_count


def pure_jax_mlp_step(exp):
  """A hand-written pure JAX + Optax train step with the same math as an MLP experiment's step.

  Same parameters (as plain arrays), same optimizer (`exp.tx`), same dropout
  masks (the key of step s is `fold_in(PRNGKey(seed + 1), s)`, and hidden layer
  i draws `bernoulli(fold_in(key, i))`, as nnx.Dropout does from that key), same
  outputs (the state with its step counter, and loss, accuracy, gradient norm):
  what remains of the difference in step time is the framework's host overhead.
  Raises UserError for a family other than mlp.
  """
  m = exp.config.model
  if m.family != "mlp":
    raise UserError("--compare-pure-jax needs model.family=mlp")
  act, keep = getattr(jax.nn, m.activation), 1.0 - m.dropout
  seed = exp.config.train.seed
  state = exp.init_state()
  layers = [*state.params["hidden"].values(), state.params["out"]]
  params = [(jnp.array(l["kernel"]), jnp.array(l["bias"])) for l in layers]

  def loss_fn(params, batch, key):
    h = batch["x"].reshape(batch["x"].shape[0], -1)
    for i, (w, b) in enumerate(params[:-1]):
      h = act(h @ w + b)
      if m.dropout:
        h = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, i), keep, h.shape), h / keep, 0)
    logits = h @ params[-1][0] + params[-1][1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), logits

  tx = exp.tx

  def step(state, batch):
    count, p, opt_state = state
    key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), count)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
    updates, opt_state = tx.update(grads, opt_state, p)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    metrics = jnp.stack([loss, accuracy, optax.tree.norm(grads), jnp.zeros(())])
    return (count + 1, optax.apply_updates(p, updates), opt_state), metrics

  return jax.jit(step, donate_argnums=0), (jnp.zeros((), jnp.int32), params, tx.init(params))


def time_steps(step, state, batch, steps: int) -> tuple[float, object]:
  """Seconds per step over `steps` back-to-back calls (dispatch included), after one warm-up call."""
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / steps, state


def compare_pure_jax(exp, steps: int = 2000, repeats: int = 5) -> dict:
  """Median seconds per step of the jaxmodels step and of `pure_jax_mlp_step`, interleaved, and their ratio."""
  pure, pure_state = pure_jax_mlp_step(exp)
  ours_state, batch = exp.init_state(), exp.batch(0)
  ours_t, pure_t = [], []
  for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
    t, ours_state = time_steps(exp.train_step, ours_state, batch, steps)
    ours_t.append(t)
    t, pure_state = time_steps(pure, pure_state, batch, steps)
    pure_t.append(t)
  ours, theirs = statistics.median(ours_t), statistics.median(pure_t)
  return {"jaxmodels_us": 1e6 * ours, "pure_jax_us": 1e6 * theirs, "overhead_ratio": ours / theirs}


def parse_sweeps(config, sweeps: list[str], flag: str = "--sweep") -> list[dict]:
  """`["model.num_layers=1,2", "model.scan_layers=true,false"]` -> the cartesian product as dicts.

  Each sweep is `GROUP.KEY=V1,V2,...` (see `split_values` for the quoting rule), each value parsed as the override
  `GROUP.KEY=V` is (`config.parse_override`). Raises UserError naming the sweep (as `flag`, the command's name for
  it) for an unknown or repeated key or a value of the wrong type.
  """
  axes, seen = [], set()
  for s in sweeps:
    key, _, values = s.partition("=")
    if key in seen:
      raise UserError(f"{flag} {key} is given twice: list all its values in one {flag}")
    seen.add(key)
    if not values:
      raise UserError(f"{flag} {s!r}: expected GROUP.KEY=V1,V2,... with a key of the config")
    texts = split_values(values, f"{flag} {key}")
    try:
      axes.append([parse_override(config, f"{key}={text}") for text in texts])
    except UserError as e:
      raise UserError(f"{flag} {s!r}: {e}") from None
  return [dict(p) for p in itertools.product(*axes)] if axes else [{}]


def split_values(text: str, key: str = "--sweep") -> list[str]:
  """A sweep's values: split on commas outside brackets and quotes; one pair of quotes around a value is removed.

  `1,2,4` -> ['1', '2', '4']; `(64,),(128,64)` -> ['(64,)', '(128,64)'];
  `'data=2,tensor=4','data=8'` -> ['data=2,tensor=4', 'data=8'] (a string
  holding a comma must be quoted, inside the shell's own quotes). Raises
  UserError, naming `key` (the flag and config key), for unbalanced brackets or quotes.
  """
  values, current, depth, quote = [], "", 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(current)
      current = ""
      continue
    current += ch
  if quote or depth:
    raise UserError(f"{key}: unbalanced {'quote' if quote else 'brackets'} in {text!r}")
  values.append(current)
  return [v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v for v in values]


def regressions(results: list[dict], baseline: list[dict], threshold: float) -> list[str]:
  """'label metric: old -> new (+x%)' for each compared metric that grew by more than `threshold`."""
  old = {json.dumps(r["config"], sort_keys=True): r for r in baseline}
  out = []
  for r in results:
    b = old.get(json.dumps(r["config"], sort_keys=True))
    if b is None:
      continue
    for metric in COMPARED:
      if metric in r and metric in b and b[metric] and r[metric] > b[metric] * (1 + threshold):
        out.append(f"{r['label']} {metric}: {b[metric]:.4g} -> {r[metric]:.4g} "
                   f"(+{100 * (r[metric] / b[metric] - 1):.0f}%)")
  return out


def table(results: list[dict]) -> str:
  cols = [c for c in TABLE if any(c in r for r in results)]
  rows = [["point", *cols]] + [[r["label"], *(_fmt(r.get(c)) for c in cols)] for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                   for row in rows)


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_csv(results: list[dict], path: str) -> None:
  keys = sorted({k for r in results for k in r if k != "config"})
  text = io.StringIO()
  w = csv.DictWriter(text, fieldnames=["label", *(k for k in keys if k != "label")])
  w.writeheader()
  for r in results:
    w.writerow({k: v for k, v in r.items() if k != "config"})
  storage.path(path).write_text(text.getvalue())


def growth_exponent(xs, ys) -> float:
  """Slope of log(y) against log(x): compile time ~ x ** exponent."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(results: list[dict], sweep_keys: list[str], path: str, metric: str = "compile_s") -> None:
  """Compile time against the first numeric swept key, one series per value of the others."""
  extras.require("matplotlib", "--plot").use("Agg")
  plt = extras.require("matplotlib.pyplot", "--plot")
  numeric = [k for k in sweep_keys
             if all(isinstance(r["config"][k], (int, float)) and not isinstance(r["config"][k], bool)
                    for r in results)]
  if not numeric:
    raise UserError("--plot needs a numeric --sweep key for its x axis")
  x_key, others = numeric[0], [k for k in sweep_keys if k != numeric[0]]
  fig, ax = plt.subplots(figsize=(6, 4))
  for series_key, group in itertools.groupby(
      sorted(results, key=lambda r: [str(r["config"][k]) for k in others]),
      key=lambda r: tuple((k, r["config"][k]) for k in others)):
    group = sorted(group, key=lambda r: r["config"][x_key])
    xs, ys = [r["config"][x_key] for r in group], [r.get(metric, math.nan) for r in group]
    name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in series_key) or metric
    exponent = f", ~x^{growth_exponent(xs, ys):.2f}" if len(xs) > 1 else ""
    ax.plot(xs, ys, marker="o", label=f"{name}{exponent}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel(x_key)
  ax.set_ylabel(f"{metric} (median)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with storage.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format=os.path.splitext(os.fspath(path))[1][1:] or "png")


@dataclasses.dataclass
class CompileArgs:
  sweeps: list
  repeat: int
  topology: str
  dump_hlo: str
  baseline: str
  max_regression: float
  out: str
  csv: str
  plot: str
  steps: int


def run_compile(config, a: CompileArgs, log=print) -> int:
  """The `bench compile` command: every sweep point, the table, files, and the regression gate."""
  if a.repeat < 1:
    raise UserError("--repeat must be at least 1")
  if a.plot:
    extras.check("matplotlib", "--plot")  # before the sweep, not after it
  points = parse_sweeps(config, a.sweeps)
  for point in points:  # every point's config is checked before the first compile writes anything
    try:
      validate(with_values(config, point))
    except UserError as e:
      raise UserError(f"sweep point {point}: {e}") from None
  labels = [" ".join(f"{k.split('.')[-1]}={v!r}" for k, v in point.items()) or f"point{i}"
            for i, point in enumerate(points)]
  log(f"{len(points)} sweep point(s):\n" + "\n".join(f"  [{i + 1}] {l}" for i, l in enumerate(labels)))
  results = []
  for i, (point, label) in enumerate(zip(points, labels)):
    log(f"[{i + 1}/{len(points)}] {label}")
    record = compile_point(with_values(config, point), a.repeat, a.topology or None, a.dump_hlo or None,
                           re.sub(r"[^\w.=,-]", "_", label), a.steps, log)
    record["config"] = point
    results.append(record)
  log(table(results))
  if a.out:
    storage.path(a.out).write_text(json.dumps(results, indent=1))
  if a.csv:
    write_csv(results, a.csv)
  if a.plot:
    plot(results, [s.partition("=")[0] for s in a.sweeps], a.plot)
  if a.baseline:
    worse = regressions(results, json.loads(storage.path(a.baseline).read_text()), a.max_regression)
    if worse:
      log(f"regressions beyond {100 * a.max_regression:.0f}% against {a.baseline}:\n  " + "\n  ".join(worse))
      return 1
    log(f"no regression beyond {100 * a.max_regression:.0f}% against {a.baseline}")
  return 0


def loop_point(config, steps: int) -> dict:
  """The training loop's median logged step time: `train` for `steps` steps into a temporary workdir.

  Five log intervals (`train.log_every` = steps // 5); the first step (compilation) is logged on its own and
  left out, and so are the evaluation and save at the end (outside the timed intervals).
  """

  if steps < 5:
    raise UserError(f"--loop needs --steps of at least 5 (five log intervals), got {steps}")
  config = config.copy_and_resolve_references()
  config.train.update(dict(steps=steps, log_every=steps // 5, eval_every=steps, profile_steps=()))
  config.train.early_stopping.metric = ""
  config.checkpoint.update(dict(every=0, restore_from=""))
  with tempfile.TemporaryDirectory() as workdir:
    train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]
  times = [r["step_time_ms"] for r in records if r.get("split") == "train" and "step_time_ms" in r]
  return {"loop_step_ms": statistics.median(times), "loop_intervals": len(times)}


def run_step(config, steps: int, compare: bool, log=print, loop: bool = False) -> dict:
  """The `bench step` command: step time, throughput, MFU, XLA's FLOP count, optional pure-JAX overhead, and with
  `loop` the training loop's median logged step time beside the compiled step's (`loop_point`)."""
  exp = build_experiment(config)
  for notice in exp.notices:
    log(f"note: {notice}")
  log("\n".join([model_summary(exp), *preset_overrides(config)]))
  r = step_point(exp, steps=steps)
  r["xla_flops"] = xla_flops(exp)
  scanned = [what for what, on in (("the scanned layers' body", config.model.family == "transformer"
                                    and config.model.scan_layers),
                                   ("the micro-batch loop's body", config.train.grad_accum_steps > 1)) if on]
  lines = [f"step: {r['step_ms']:.3f} ms median (p10 {r['step_ms_p10']:.3f}, p90 {r['step_ms_p90']:.3f} ms) over "
           f"{steps} steps on {exp.layout.device_count} x {jax.devices()[0].device_kind}",
           f"throughput: {r['examples_per_sec']:.4g} examples/s"
           + (f", {r['tokens_per_sec']:.4g} tokens/s" if "tokens_per_sec" in r else ""),
           f"model FLOPs/step: {r['model_flops']:.4g} FLOP analytic (jaxmodels.models.flops: matmuls and attention, "
           f"forward + backward), {r['xla_flops']:.4g} FLOP by XLA's cost analysis "
           f"(analytic / XLA = {r['model_flops'] / r['xla_flops']:.3f})"
           + (f"; XLA counts {' and '.join(scanned)} once, so its figure is low by about that many iterations"
              if scanned else ""),
           f"MFU: {100 * r['mfu']:.1f}% of a peak of {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_source']})"]
  if r["hardware_flops"] != r["model_flops"]:
    lines.append(f"hardware FLOPs/step: {r['hardware_flops']:.4g} FLOP with model.remat={config.model.remat}'s "
                 f"recomputation; HFU: {100 * r['hfu']:.1f}%")
  if compare:
    r.update(compare_pure_jax(exp))
    lines.append(f"host overhead: jaxmodels {r['jaxmodels_us']:.1f} us/step, pure JAX {r['pure_jax_us']:.1f} "
                 f"us/step, ratio {r['overhead_ratio']:.2f}x")
  if loop:
    r.update(loop_point(config, steps))
    r["loop_ratio"] = r["loop_step_ms"] / r["step_ms"]
    lines.append(f"train loop: {r['loop_step_ms']:.3f} ms median logged step time over {r['loop_intervals']} "
                 f"intervals of {steps // 5} steps, against the step's {r['step_ms']:.3f} ms: "
                 f"{r['loop_ratio']:.3f}x")
  log("\n".join(lines))
  return r




def data_point(exp, steps: int = 20, step_s: float = 0.0) -> dict:
  """The input pipeline's rate against the step's: batches/s of host loading alone, of the loader as training
  runs it (prefetch thread, device transfer), and of the compiled step on a device-resident batch (or
  1 / `step_s` when a step time in seconds is given: nothing is compiled). `bytes_per_batch` is what the source
  reads per batch: the bytes its token streams fetch (`data.source=tokens`: ids from a disk or a bucket), else
  the host batch's arrays."""
  stream = getattr(exp.dataset, "train", None)
  counted = lambda: getattr(stream, "bytes_read", 0)  # only token streams count their reads

  def rate(load, first: int) -> float:
    load(first)  # start-up (worker processes, first file reads) is not throughput
    t0 = time.perf_counter()
    for s in range(first + 1, first + 1 + steps):
      jax.block_until_ready(load(s))
    return steps / (time.perf_counter() - t0)

  before = counted()
  host = rate(exp.host_batch, 0)
  per_batch = (counted() - before) / (steps + 1) or sum(np.asarray(v).nbytes for v in exp.host_batch(0).values())
  loader = rate(exp.batch, steps + 1)
  exp.stop_loader()  # before step_point's batch 0 restarts it: image workers are stopped from one thread at a time
  step = 1.0 / (step_s or step_point(exp, steps=steps)["step_s"])
  return {"host_batches_per_sec": host, "loader_batches_per_sec": loader, "step_batches_per_sec": step,
          "bytes_per_batch": per_batch, "loader_mb_per_sec": loader * per_batch / 1e6}


def run_data(config, steps: int, log=print, step_s: float = 0.0) -> dict:
  """The `bench data` command: does the loader keep up with the step (measured, or `step_s` seconds)?"""
  exp = build_experiment(config)
  r = data_point(exp, steps, step_s)
  t = config.train
  unit, per_batch = {"lm": ("tokens", t.batch_size * config.data.seq_len)}.get(
      exp.dataset.task, ("images" if config.data.source == "images" else "examples", t.batch_size))
  ratio = r["loader_batches_per_sec"] / r["step_batches_per_sec"]
  verdict = (f"the loader keeps up ({ratio:.2f}x the step's rate)" if ratio >= 1 else
             f"the input pipeline is the bottleneck ({ratio:.2f}x the step's rate): raise data.workers (images) or "
             f"data.prefetch, or prepare the data ahead")
  log("\n".join([
      f"loader: {r['loader_batches_per_sec']:.4g} batches/s, {r['loader_batches_per_sec'] * per_batch:.4g} {unit}/s, "
      f"{r['loader_mb_per_sec']:.4g} MB/s read ({r['bytes_per_batch'] / 1e3:.4g} kB a batch; "
      f"data.prefetch={config.data.prefetch}, put on {exp.layout.device_count} device(s); host loading alone "
      f"{r['host_batches_per_sec']:.4g} batches/s)",
      f"step:   {r['step_batches_per_sec']:.4g} batches/s, {r['step_batches_per_sec'] * per_batch:.4g} {unit}/s "
      f"consumed ({f'--step-time {step_s:g} s' if step_s else f'median of {steps} steps'})",
      verdict]))
  return {**r, "unit": unit, "per_batch": per_batch}
