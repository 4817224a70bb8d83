"""`jaxmodels plan`: which setting of an experiment fits the chips, and which of those is fastest.

Every candidate, a point of the cartesian product of the `--try` lists, is
validated first, then its train step is compiled ahead of time (for a TPU
`--topology`, or the attached devices) in a worker process of its own: a
compile of a large step holds gigabytes of host memory, a process gives them
back, and a hung compile can be stopped at its timeout. Each compiled step
gets a memory verdict (`jaxmodels.runtime.hbm`); those that fit are ranked by XLA's
estimated step time or, where XLA gives none, by FLOPs and bytes accessed per
device. XLA's cost analysis counts a loop body once, so its figures are
multiplied by the loops' trip counts: `train.grad_accum_steps` micro-batches
and, for a transformer with `model.scan_layers`, `model.num_layers` layers (under
a `stage` mesh axis, the pipeline's iterations times a stage's layers) (an
upper bound: the embedding, head and optimizer update run once). `--try
parallel.mesh=stages` proposes the pipeline-parallel meshes (`stage_meshes`),
`--try parallel.mesh=contexts` the context-parallel ones (`context_meshes`).
"""

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

import jax

from jaxmodels.bench import timing as bench
from jaxmodels.config import load_experiment, validate, with_values
from jaxmodels.config.validate import config_task
from jaxmodels.models import flops
from jaxmodels.parallel import pipeline
from jaxmodels.parallel.sharding import parse_mesh
from jaxmodels.runtime import extras, hbm, storage
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.experiment import build_experiment

__all__ = ["candidates", "chip_peak_flops", "command_line", "compile_all", "compile_candidate", "context_meshes",
           "CONTEXT_SEARCH", "default_workers", "label", "loop_trips", "others", "PlanArgs", "plot", "rank", "roofline_s", "run_plan", "stage_meshes",
           "STAGE_SEARCH", "table", "worker", "WORKER_HOST_BYTES"]

WORKER_HOST_BYTES = 4 * hbm.GiB  # host memory one ahead-of-time compile of a large step may hold


@dataclasses.dataclass
class PlanArgs:
  config_path: str
  overrides: list  # the --config.K=V flags, passed on to the workers and to the best setting's command line
  tries: list
  topology: str = ""
  global_batch: int = 0
  out: str = ""
  plot: str = ""
  workers: int = 0  # 0: default_workers()
  timeout: float = 600.0


def default_workers(topology: str) -> int:
  """Parallel compiles: one per two CPU cores and per WORKER_HOST_BYTES of available host memory, at least one;
  one without a topology (the compiles then share the attached devices)."""
  if not topology:
    return 1
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  try:
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    available = WORKER_HOST_BYTES
  return max(1, min(cpus // 2, available // WORKER_HOST_BYTES))


STAGE_SEARCH = "stages"  # `--try parallel.mesh=stages`: the stage splits `stage_meshes` proposes


def stage_meshes(config, device_count: int) -> list[str]:
  """The `parallel.mesh` values `--try parallel.mesh=stages` stands for: `stage=S,fsdp=-1` (pipeline stages, FSDP
  over the rest) for every S >= 2 dividing `device_count` whose schedule the config can run (S x
  parallel.pipeline_repeats dividing model.num_layers, its micro-batches dividing the batch), fewest stages
  first; none for another family than the Transformer LM."""
  p, t = config.parallel, config.train
  if config.model.family != "transformer" or config_task(config.data) != "lm":
    return []
  meshes = []
  for s in range(2, device_count + 1):
    try:
      if device_count % s == 0:
        pipeline.Schedule(s, p.pipeline_microbatches or s, p.pipeline_repeats).check(
            config.model.num_layers, t.batch_size // t.grad_accum_steps)
        meshes.append(f"stage={s},fsdp=-1")
    except ValueError:
      continue
  return meshes


CONTEXT_SEARCH = "contexts"  # `--try parallel.mesh=contexts`: the context splits `context_meshes` proposes


def context_meshes(config, device_count: int) -> list[str]:
  """The `parallel.mesh` values `--try parallel.mesh=contexts` stands for: `context=C,fsdp=-1` (each sequence
  split over C devices, FSDP over the rest) for every C >= 2 dividing `device_count` that the config validates
  with (the Transformer LM without sliding windows, soft caps or experts, data.seq_len divisible by 2 x C) and
  whose other device_count / C devices split train.batch_size / train.grad_accum_steps and
  train.eval_batch_size, fewest context devices first."""
  t, meshes = config.train, []
  strategy = _jit_strategy(config)
  for c in range(2, device_count + 1):
    rest = device_count // c
    if device_count % c or (t.batch_size // t.grad_accum_steps) % rest or t.eval_batch_size % rest:
      continue
    mesh = f"context={c},fsdp=-1"
    try:  # the refusals of context parallelism are validation's (jaxmodels.config.validate)
      validate(with_values(config, {"parallel.mesh": mesh, **strategy}))
    except UserError:
      continue
    meshes.append(mesh)
  return meshes


# Each search's mesh proposer, and what its meshes need (for the error where it proposes none).
_SEARCHES = {STAGE_SEARCH: (stage_meshes, "a stage split that divides the layers and the batch (Transformer LM)"),
             CONTEXT_SEARCH: (context_meshes, "a context split that divides data.seq_len into 2 x context chunks "
                                              "and leaves devices that divide the batch (Transformer LM without "
                                              "sliding windows, soft caps or experts)")}


def _jit_strategy(config) -> dict:
  """{} where the config's strategy is a jit one (dp, fsdp, tp), else {"parallel.strategy": "fsdp"}."""
  return {} if config.parallel.strategy in ("dp", "fsdp", "tp") else {"parallel.strategy": "fsdp"}


def _expand_searches(config, points: list[dict], device_count: int) -> list[dict]:
  """Each point trying `parallel.mesh=stages` or `=contexts` replaced by one point per mesh that search's
  function proposes for it (with a jit strategy). UserError where a search proposes none for any point."""
  out, found = [], {}
  for point in points:
    search = point.get("parallel.mesh")
    if search not in _SEARCHES:
      out.append(point)
      continue
    c = with_values(config, {k: v for k, v in point.items() if k != "parallel.mesh"})
    meshes = _SEARCHES[search][0](c, device_count)
    found[search] = found.get(search, 0) + len(meshes)
    out += [{**point, **_jit_strategy(c), "parallel.mesh": mesh} for mesh in meshes]
  for search, count in found.items():
    if not count:
      raise UserError(f"--try parallel.mesh={search}: no split of the {device_count} device(s) fits: it needs "
                      f"{_SEARCHES[search][1]}")
  return out


def candidates(config, a: PlanArgs) -> list[dict]:
  """The points to compile, each a {key: value} dict, every one validated. Raises UserError."""
  points = bench.parse_sweeps(config, a.tries, flag="--try")
  if a.global_batch:
    if any("train.batch_size" in p for p in points):
      raise UserError("--global-batch and --try train.batch_size=...: give one of them")
    points = [{**p, "train.batch_size": a.global_batch} for p in points]
  if any(p.get("parallel.mesh") in _SEARCHES for p in points):
    points = _expand_searches(config, points, len(bench.topology_devices(a.topology)) if a.topology
                            else jax.device_count())
  for point in points:
    c = with_values(config, point)
    try:
      validate(c)
    except UserError as e:
      raise UserError(f"candidate {label(point)}: {e}") from None
    if a.topology and c.parallel.strategy == "pmap":
      raise UserError(f"candidate {label(point)}: --topology compiles jit strategies; pmap has no ahead-of-time path")
  return points


def label(point: dict) -> str:
  return " ".join(f"{k.split('.')[-1]}={_flag_value(v)}" for k, v in point.items()) or "as configured"


def _flag_value(v) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  return "none" if v is None else str(v)


def command_line(a: PlanArgs, point: dict) -> str:
  """The `jaxmodels train` command of one candidate."""
  return shlex.join(["jaxmodels", "train", "--config", a.config_path, *a.overrides,
                     *(f"--config.{k}={_flag_value(v)}" for k, v in point.items())])


def loop_trips(config) -> int:
  """How many times the loops XLA's cost analysis counts once run per step (see the module docstring); under a
  `stage` axis the pipeline's iterations times each stage's layers."""
  layers = config.model.num_layers if config.model.family == "transformer" and config.model.scan_layers else 1
  if layers > 1 and config.model.num_experts:  # the scan's body holds moe_every blocks (models.moe)
    layers //= config.model.moe_every
  p = config.parallel
  stages = parse_mesh(p.mesh, p.strategy)["stage"]
  if stages > 1 and layers > 1:
    schedule = pipeline.Schedule(stages, p.pipeline_microbatches or stages, p.pipeline_repeats)
    layers = schedule.iterations * layers // (stages * schedule.repeats)
  return config.train.grad_accum_steps * layers


def compile_candidate(config, topology: str) -> dict:
  """Compiles one candidate's train step (in this process); its record: status ('fits', 'too big' or 'unknown'),
  compile_s, the memory verdict and XLA's per-device cost figures, scaled by `loop_trips`."""
  devices = bench.topology_devices(topology) if topology else jax.devices()
  t0 = time.perf_counter()
  try:
    exp = build_experiment(config, devices=devices if topology else None)
    compiled = exp.train_step.lower(*bench.abstract_args(exp)).compile()
  except jax.errors.JaxRuntimeError as e:
    if not hbm.is_oom(e):
      raise
    return {"status": "too big", "compile_s": time.perf_counter() - t0, **hbm.refused(e, devices[0])}
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  trips = loop_trips(config)
  seconds = float(cost.get("optimal_seconds", -1.0))
  verdict = hbm.verdict(memory, devices[0])
  return {
      "status": {True: "fits", False: "too big", None: "unknown"}[verdict["fits"]], "compile_s": compile_s,
      **verdict, "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes), "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes), "generated_code_bytes": int(memory.generated_code_size_in_bytes),
      "loop_trips": trips, "flops_per_device": trips * float(cost.get("flops", math.nan)),
      "bytes_accessed_per_device": trips * float(cost.get("bytes accessed", math.nan)),
      "xla_step_s": trips * seconds if seconds > 0 else None,  # XLA gives -1 or a negative figure when it has none
      "model_flops": exp.model_flops, "device_kind": devices[0].device_kind, "device_count": len(devices),
      **bench.pipeline_fields(config, exp),
  }


def worker() -> None:
  """A worker process's entry: compiles the candidate its request file (argv[1]) names, writes the record.

  Any failure becomes the record's one-line `reason`: the planner reports it beside the other candidates.
  """

  request = json.loads(storage.path(sys.argv[1]).read_text())
  try:
    config = load_experiment(request["config_path"], request["overrides"])
    validate(config)  # as the planner's own config was: validation also expands a model.preset
    record = compile_candidate(with_values(config, request["point"]), request["topology"])
  except Exception as e:  # pylint: disable=broad-except  # reported per candidate, with its one-line reason
    record = {"status": "failed", "reason": f"{type(e).__name__}: {hbm.first_line(e)[:300]}"}
  storage.path(request["out"]).write_text(json.dumps(record))


def _start(a: PlanArgs, point: dict, directory: str, i: int):
  request, out = os.path.join(directory, f"{i}.request.json"), os.path.join(directory, f"{i}.json")
  with open(request, "w", encoding="utf-8") as f:
    json.dump({"config_path": a.config_path, "overrides": a.overrides, "point": point, "topology": a.topology,
               "out": out}, f)
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
  if a.topology:
    env["JAX_PLATFORMS"] = "cpu"  # an ahead-of-time compile needs no chip: claim none
  log = open(os.path.join(directory, f"{i}.log"), "wb")  # pylint: disable=consider-using-with
  process = subprocess.Popen([sys.executable, "-c", "from jaxmodels.bench.plan import worker; worker()", request],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
  return process, log, out, time.monotonic()


def _finish(process, log, out: str, timed_out: bool, timeout: float) -> dict:
  log.close()
  if timed_out:
    return {"status": "failed", "reason": f"no result within --timeout {timeout:g} s"}
  if os.path.exists(out):
    with open(out, encoding="utf-8") as f:
      return json.load(f)
  with open(log.name, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return {"status": "failed", "reason": f"worker exited with code {process.returncode}: "
                                        f"{(lines or ['no output'])[-1][:300]}"}


def compile_all(a: PlanArgs, points: list[dict], workers: int, log=print) -> list[dict]:
  """Each point's record (`compile_candidate`), compiled by up to `workers` worker processes at once."""
  records: list[dict | None] = [None] * len(points)
  with tempfile.TemporaryDirectory(prefix="jaxmodels-plan-") as directory:
    waiting, running = list(range(len(points))), {}
    while waiting or running:
      while waiting and len(running) < workers:
        i = waiting.pop(0)
        running[i] = _start(a, points[i], directory, i)
      time.sleep(0.2)
      for i, (process, handle, out, started) in list(running.items()):
        timed_out = process.poll() is None and time.monotonic() - started > a.timeout
        if timed_out:
          process.kill()
          process.wait()
        if process.poll() is not None:
          del running[i]
          records[i] = {"setting": label(points[i]), "config": points[i],
                        **_finish(process, handle, out, timed_out, a.timeout)}
          r = records[i]
          log(f"[{sum(r is not None for r in records)}/{len(points)}] {r['setting']}: {r['status']}"
              + (f" ({r['reason']})" if "reason" in r else f", {hbm.gib(r.get('needed_bytes'))} per device"))
  return records


def chip_peak_flops(device_kind: str) -> float | None:
  """A chip's datasheet bf16 peak FLOP/s (jaxmodels.models.flops.PEAK_FLOPS), None for a CPU."""
  return hbm.listed(flops.PEAK_FLOPS, device_kind)


def roofline_s(record: dict) -> float | None:
  """max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per device: a lower bound on the step time that
  ignores communication; None for a device without datasheet figures."""
  peak, bandwidth = chip_peak_flops(record["device_kind"]), hbm.listed(hbm.BANDWIDTH, record["device_kind"])
  if not (peak and bandwidth):
    return None
  return max(record["flops_per_device"] / peak, record["bytes_accessed_per_device"] / bandwidth)


def rank(records: list[dict]) -> tuple[list[dict], str]:
  """The fitting records, best first, and what ranked them. Adds to each its `est_step_s` and `est_mfu` (the
  analytic model FLOPs over that time and the devices' peak), None where there is no estimate."""
  fitting = [r for r in records if r["status"] == "fits"]
  by_xla = bool(fitting) and all(r.get("xla_step_s") for r in fitting)
  for r in fitting:
    peak, step = chip_peak_flops(r["device_kind"]), r["xla_step_s"] if by_xla else roofline_s(r)
    r["est_step_s"] = step
    r["est_mfu"] = r["model_flops"] / (step * r["device_count"] * peak) if step and peak else None
  if by_xla:
    return sorted(fitting, key=lambda r: r["est_step_s"]), "XLA's estimated step time"
  if all(r["est_step_s"] for r in fitting):
    return (sorted(fitting, key=lambda r: r["est_step_s"]),
            "the roofline max(FLOPs/peak, bytes accessed/HBM bandwidth) per device (XLA gives no step time)")
  return (sorted(fitting, key=lambda r: (r["flops_per_device"], r["bytes_accessed_per_device"])),
          "FLOPs per device, then bytes accessed per device (XLA gives no step time; no datasheet peak)")


def table(ranked: list[dict], ranked_by: str) -> str:
  """The fitting settings, best first (`rank`'s order and estimates)."""
  rows = [["#", "setting", "bytes/device", "headroom", "est. step", "MFU", "FLOPs/device", "bytes acc./device",
           "compile"]]
  for i, r in enumerate(ranked):
    step, mfu = r["est_step_s"], r["est_mfu"]
    rows.append([str(i + 1), r["setting"], hbm.gib(r["needed_bytes"]), hbm.gib(r["headroom_bytes"]),
                 f"{1e3 * step:.1f} ms" if step else "-", f"{100 * mfu:.0f}%" if mfu else "-",
                 f"{r['flops_per_device']:.3g}", f"{r['bytes_accessed_per_device']:.3g}", f"{r['compile_s']:.1f} s"])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.ljust(w) if i == 1 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
           for row in rows]
  return f"fitting settings, ranked by {ranked_by}:\n" + "\n".join(lines)


def others(records: list[dict]) -> str:
  """One line per candidate that does not fit or failed."""
  lines = []
  for r in records:
    if r["status"] == "too big":
      lines.append(f"  does not fit: {r['setting']}: needs {hbm.gib(r['needed_bytes'])}"
                   + (f" ({r['needed_what']})" if "needed_what" in r else "")
                   + f" of {hbm.gib(r['device_memory_bytes'])}")
    elif r["status"] != "fits":
      lines.append(f"  {r['status']}: {r['setting']}: "
                   + r.get("reason", f"{hbm.gib(r.get('needed_bytes'))} needed; {r.get('device_memory_source')}"))
  return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
  """Bytes per device of every candidate (a bar each, by fit) against the device's memory."""
  extras.require("matplotlib", "--plot").use("Agg")
  plt = extras.require("matplotlib.pyplot", "--plot")
  shown = [r for r in records if r.get("needed_bytes")]
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(shown)), 4.5))
  colors = {"fits": "tab:green", "too big": "tab:red"}
  ax.bar(range(len(shown)), [r["needed_bytes"] / hbm.GiB for r in shown],
         color=[colors.get(r["status"], "tab:gray") for r in shown])
  capacities = {r["device_memory_bytes"] for r in shown if r.get("device_memory_bytes")}
  for capacity in capacities:
    ax.axhline(capacity / hbm.GiB, color="black", linestyle="--", label=f"device memory {capacity / hbm.GiB:.2f} GiB")
  ax.set_xticks(range(len(shown)), [r["setting"].replace(" ", "\n") for r in shown], fontsize=7)
  ax.set_ylabel("bytes per device (GiB; refused: XLA's figure)")
  if capacities:
    ax.legend()
  fig.tight_layout()
  with storage.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format=os.path.splitext(os.fspath(path))[1][1:] or "png")


def run_plan(config, a: PlanArgs, log=print) -> int:
  """The `plan` command: compile every candidate, print the ranked table and the best command; 0 when a
  setting fits, 1 when none does."""
  if a.workers < 0 or a.timeout <= 0 or a.global_batch < 0:
    raise UserError("--workers must be at least 0 (0: default), --timeout positive, --global-batch positive")
  if a.plot:
    extras.check("matplotlib", "--plot")  # before the compiles, not after them
  points = candidates(config, a)
  if a.topology:
    devices = bench.topology_devices(a.topology)  # a bad topology fails here, once
    log(f"topology {a.topology}: {len(devices)} x {devices[0].device_kind}; "
        f"{hbm.capacity(devices[0])[1]}")
  workers = min(a.workers or default_workers(a.topology), len(points))
  log(f"{len(points)} candidate(s), {workers} worker process(es), {a.timeout:g} s each at most")
  records = compile_all(a, points, workers, log)
  ranked, ranked_by = rank(records)
  log(table(ranked, ranked_by))
  if len(ranked) < len(records):
    log(others(records))
  if ranked:
    log(f"best setting:\n  {command_line(a, ranked[0]['config'])}")
  elif any(r["status"] == "unknown" for r in records):  # compiled, but against no known memory: not "too big"
    log("no setting is known to fit: the devices report no memory limit (a CPU); compile for a TPU slice "
        "ahead of time with --topology (e.g. --topology v5e:2x2, pip install 'jaxmodels[tpu]') or run plan on "
        "the accelerator")
  else:
    log("no setting fits: try more FSDP (parallel.strategy=fsdp), pipeline stages (--try parallel.mesh=stages), "
        "model.remat=full, a larger train.grad_accum_steps or a smaller batch; for long sequences, context "
        "parallelism (--try parallel.mesh=contexts: each sequence split over several devices)")
  if a.out:
    storage.path(a.out).write_text(json.dumps({"ranked_by": ranked_by, "topology": a.topology,
                                               "best": ranked[0]["config"] if ranked else None,
                                               "candidates": records}, indent=1))
  if a.plot:
    plot(records, a.plot)
  return 0 if ranked else 1
