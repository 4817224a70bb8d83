"""`jaxmodels compress`: a trained run compressed, exported, and compared with the original.

    jaxmodels compress --workdir runs/digits_cnn --method ptq --bits 8 --out exported/digits_cnn-int8
    jaxmodels compress --workdir runs/digits_cnn --method prune --sparsity 0.9 --out exported/digits_cnn-90

writes OUT in the format of `jaxmodels export` (jaxmodels.load_model(OUT) returns the compressed module; `eval` and
`sample` take OUT as --workdir) plus `OUT/compression.json`, the table `report` prints: parameters, non-zero
parameters, bytes of the exported parameters on disk (the compressed export against an export of the original),
the eval metrics of the run's eval split, and the median inference time of one eval batch, before and after.

Methods are entries of METHODS: a function (model, options, experiment) -> (compressed model, quantization spec
or None). `ptq` is post-training quantization through qwix (jaxmodels.compress.quantization): int8 or int4 weights, per
output channel; `--activations` also quantizes the input of each Linear and Conv, with one static scale per input
tensor (per layer of a stack) calibrated on the run's first `--calibration-batches` training batches, or with
`--activations dynamic` a scale per row computed on the fly. Quantized weights stay quantized on disk: int8 arrays
(int4: jnp.int4 arrays, which Orbax stores packed, two to a byte) and float32 scales, with the static input
scales beside them. `prune` is one-shot magnitude pruning (jaxmodels.optim.pruning's masks and exclusions: no embeddings, norm
scales or biases): unstructured to `--sparsity` per tensor or globally (`--scope`), or N:M (`--pattern 2:4`); the
pruned weights are exactly zero in a dense export (fine-tuning after it: train.pruning with checkpoint.restore_from).
"""

import json
import shutil
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.compress import quantization
from jaxmodels.config import default_config
from jaxmodels.config.experiments import saved_config
from jaxmodels.models import lora
from jaxmodels.models.forward import forward
from jaxmodels.optim import pruning
from jaxmodels.runs import export
from jaxmodels.runs.state import split_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError
from jaxmodels.tools.evaluate import evaluate_model
from jaxmodels.train.actions import scalars
from jaxmodels.train.experiment import build_experiment

__all__ = ["ACTIVATIONS", "CALIBRATION_BATCHES", "compress", "disk_bytes", "evaluation", "FLAGS", "format_table",
           "measure", "METHODS", "report"]


def _ptq(model: nnx.Module, options: dict, exp):
  spec = dict(method="ptq", bits=options["bits"], activations=options["activations"], exclude=options["exclude"])
  calibration = None
  if options["activations"] == "static":  # the first training batches, as the run saw them
    spec["calibration_batches"] = options["calibration_batches"]
    calibration = (exp.host_batch(step) for step in range(options["calibration_batches"]))
  sample = quantization.sample_batch(exp.dataset.input_shape, exp.dataset.task)
  return quantization.ptq(model, spec["bits"], spec["activations"], spec["exclude"], sample, calibration), spec


def _prune(model: nnx.Module, options: dict, exp):  # pylint: disable=unused-argument
  graphdef, params, model_state = split_model(model)
  if not any(jax.tree.leaves(pruning.prunable(params, options["pattern"]))):
    raise UserError(f"--pattern {options['pattern']}: no prunable kernel of this model has an input size divisible "
                    f"by {options['pattern'].split(':')[1]}, so nothing would be pruned"
                    if options["pattern"] != "unstructured" else "this model has no prunable kernel")
  pruned = pruning.prune(params, options["sparsity"], options["pattern"], options["scope"])
  return nnx.merge(graphdef, pruned, model_state), None


METHODS = {"ptq": _ptq, "prune": _prune}
ACTIVATIONS = ("static", "dynamic")  # ptq --activations: scales calibrated beforehand, or per row on the fly
CALIBRATION_BATCHES = 8  # training batches a static-activation ptq calibrates its input scales on
FLAGS = {"ptq": ("bits", "activations", "calibration_batches"),  # each method's own options
         "prune": ("sparsity", "pattern", "scope")}


def _ptq_options(workdir, bits: int | None, activations: str | None, calibration_batches: int | None) -> dict:
  """ptq's options (bits default: the run's QAT width, else 8; `exclude` from the run's train.quantization, else
  the default; calibration_batches default CALIBRATION_BATCHES, for static activations only); UserError for what
  qwix cannot do or options that contradict each other."""
  config_q = json.loads(storage.path(workdir).joinpath("config.json").read_text()).get("train", {}).get(
      "quantization", {}) if (storage.path(workdir) / "config.json").is_file() else {}
  exclude = config_q.get("exclude", default_config().train.quantization.exclude)
  bits = (config_q.get("bits") or 8) if bits is None else bits
  if activations not in (None, *ACTIVATIONS):
    raise UserError(f"--activations {activations}: expected {' or '.join(ACTIVATIONS)}")
  quantization.check(bits, exclude, activations)
  if calibration_batches is not None and activations != "static":
    raise UserError("--calibration-batches calibrates static input scales: it needs --activations (static)")
  options = dict(bits=bits, activations=activations or False, exclude=exclude)
  if activations == "static":
    options["calibration_batches"] = CALIBRATION_BATCHES if calibration_batches is None else calibration_batches
    if options["calibration_batches"] < 1:
      raise UserError(f"--calibration-batches {calibration_batches}: expected at least 1 training batch")
  return options


def _prune_options(sparsity: float | None, pattern: str | None, scope: str | None) -> dict:
  """prune's options: pattern default unstructured (which needs a sparsity), N:M's sparsity 1 - N/M, scope default
  train.pruning.scope's; UserError for a sparsity outside (0, 1) or options that contradict each other."""
  pattern = pattern or "unstructured"
  nm = pruning.parse_pattern(pattern, "--")
  if sparsity is None and nm is None:
    raise UserError("--method prune needs --sparsity S (unstructured, 0 < S < 1) or --pattern N:M (e.g. 2:4)")
  sparsity = 1 - nm[0] / nm[1] if sparsity is None else sparsity
  if not 0 < sparsity < 1:
    raise UserError(f"--sparsity {sparsity}: expected a number in (0, 1), the fraction of prunable weights zeroed")
  scope = scope or default_config().train.pruning.scope
  pruning.check(types.SimpleNamespace(sparsity=sparsity, pattern=pattern, scope=scope, start_step=0, end_step=0),
                "--")
  return dict(sparsity=sparsity, pattern=pattern, scope=scope)


def _check_out(out) -> None:
  path = storage.path(out)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"--out {out} already exists and is not an empty directory")


def disk_bytes(directory) -> int:
  """Bytes of the files under `directory` (local or gs://)."""
  total = 0
  for p in storage.path(directory).iterdir():
    total += disk_bytes(p) if p.is_dir() else p.stat().length
  return total


def _counts(params: dict) -> tuple[int, int, int]:
  """(parameters, non-zero parameters, array bytes): a quantized weight counts its integers, not its scales, as
  parameters; array bytes are every stored array's elements times its dtype's bits / 8 (int4: half a byte)."""
  n = nonzero = array_bytes = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array_bytes += leaf.size * jnp.dtype(leaf.dtype).itemsize if leaf.dtype != jnp.int4 else leaf.size // 2
    keys = [getattr(k, "key", k) for k in path]
    if "array" in keys and keys[-1] != "qvalue":  # a QArray's scale (and zero point)
      continue
    n += leaf.size
    nonzero += int(jnp.count_nonzero(leaf))
  return n, nonzero, array_bytes


def evaluation(workdir):
  """The run's experiment rebuilt on one device, for `report` (data, eval split, loss)."""
  config = saved_config(workdir, [])
  config.parallel.strategy, config.parallel.mesh, config.parallel.dcn_mesh = "single", "", ""
  return build_experiment(config)


def measure(exp, model: nnx.Module, repeats: int) -> tuple[dict, float]:
  """(eval metrics (floats) of `model` on the experiment's eval split, median seconds of one eval batch)."""
  metrics = scalars(evaluate_model(exp, model))
  graphdef, params, model_state = split_model(model)
  infer = jax.jit(lambda p, s, batch: forward(nnx.merge(graphdef, p, s), batch))
  size = exp.config.train.eval_batch_size
  batch = jax.device_put(next(iter(exp.dataset.eval_batches(size, exp.layout.local_rows(size)))))
  infer(params, model_state, batch).block_until_ready()  # compiled outside the timing
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    infer(params, model_state, batch).block_until_ready()
    times.append(time.perf_counter() - t0)
  return metrics, statistics.median(times)


def report(model: nnx.Module, exp, repeats: int = 5) -> dict:
  """One model's side of the report, for a model of the experiment `evaluation(workdir)` rebuilds: parameters,
  nonzero_parameters, array_bytes (the parameter arrays alone, at their stored widths), eval metrics (floats) and
  inference_ms (median of `repeats` runs of one eval batch, after a compile). The caller adds `bytes`, the
  exported parameters on disk (Orbax's metadata files included). Any compression method reports through it."""
  _, params, _ = split_model(model)
  n, nonzero, array_bytes = _counts(params)
  metrics, seconds = measure(exp, model, repeats)
  return {"parameters": n, "nonzero_parameters": nonzero, "array_bytes": array_bytes, **metrics,
          "inference_ms": 1e3 * seconds}


def format_table(rows: dict) -> str:
  """The report as a text table: one line per quantity, columns before, after and after/before."""
  lines = [f"{'':<22}{'before':>14}{'after':>14}{'after/before':>14}"]
  for key, before in rows["before"].items():
    after = rows["after"][key]
    ratio = f"{after / before:.3f}" if before else "-"
    fmt = (lambda v: f"{v:,}") if isinstance(before, int) else (lambda v: f"{v:.4g}")
    lines.append(f"{key:<22}{fmt(before):>14}{fmt(after):>14}{ratio:>14}")
  return "\n".join(lines)


def compress(workdir, method: str, out, *, bits: int | None = None, activations: str | None = None,
             calibration_batches: int | None = None, sparsity: float | None = None, pattern: str | None = None,
             scope: str | None = None, repeats: int = 5) -> dict:
  """Compresses the newest checkpoint of `workdir` with `method` into the export `out` (local or gs://) and returns
  the report (also printed and written to `out/compression.json`). ptq takes `bits` (8 or 4; default: the run's
  QAT width, else 8), `activations` (None: weights only; "static": one scale per input tensor, calibrated on the
  run's first `calibration_batches` training batches, default CALIBRATION_BATCHES; "dynamic": a scale per row,
  computed on the fly); prune takes `sparsity` (in (0, 1)), `pattern` (unstructured or N:M) and `scope` (layer or
  global).

  Raises UserError, before anything is written, for an unknown method, another method's option, unsupported bits,
  an unknown activations mode, calibration batches without static activations or fewer than 1, quantized inputs
  (--activations, a convolution) of a float16 model, a sparsity outside (0, 1), a bad or contradictory pattern, an
  N:M pattern that fits no kernel, an `out` that exists and is not empty, or a workdir without a config or
  checkpoint.
  """
  if method not in METHODS:
    raise UserError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
  given = dict(bits=bits, activations=activations, calibration_batches=calibration_batches, sparsity=sparsity,
               pattern=pattern, scope=scope)
  for other, names in FLAGS.items():
    for name in names:
      if other != method and given[name] is not None:
        raise UserError(f"--{name.replace('_', '-')} is an option of --method {other}, not of --method {method}")
  options = (_ptq_options(workdir, bits, activations, calibration_batches) if method == "ptq" else
             _prune_options(sparsity, pattern, scope))
  _check_out(out)
  # raises for a workdir without config or checkpoint; a LoRA run's adapters merged into their kernels
  before = lora.merge_lora(export.load_run_model(workdir))
  exp = evaluation(workdir)
  after, qspec = METHODS[method](before, options, exp)
  # Measured before anything is written: a model the report cannot run fails here, not after a half-written OUT.
  measured = {"before": report(before, exp, repeats), "after": report(after, exp, repeats)}
  baseline = tempfile.mkdtemp(prefix="jaxmodels-baseline-")  # the uncompressed export, measured then removed
  try:
    export.save_model(baseline, before)
    before_bytes = disk_bytes(f"{baseline}/params")
  finally:
    shutil.rmtree(baseline, ignore_errors=True)
  # Accepted: from here on OUT is written.
  out_path = storage.path(out)
  with export.writing_out(out):
    export.save_model(out, after)
    export.copy_run_files(workdir, out, lora_merged=True)
    if qspec:
      (out_path / quantization.SPEC_FILE).write_text(json.dumps(qspec))
    rows = {name: {"bytes": size, **measured[name]}
            for name, size in (("before", before_bytes), ("after", disk_bytes(out_path / "params")))}
    shown = {k: v for k, v in options.items() if k != "exclude"}
    result = {"method": method, "options": shown, "workdir": str(workdir), **rows}
    (out_path / "compression.json").write_text(json.dumps(result, indent=2))
  print(format_table(rows))
  return result
