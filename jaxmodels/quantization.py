"""Integer quantization of any model family through Google's `qwix`: quantization-aware training and PTQ.

QAT (`train.quantization.bits` = 8 or 4): `qat(model, ...)` intercepts the model's forward pass with
`qwix.QtProvider`, so every matmul and convolution of the modules not matched by `train.quantization.exclude`
computes on fake-quantized int weights (and activations, with `train.quantization.activations`) with
straight-through gradients. The parameters stay float32: a QAT run checkpoints, resumes and exports like any other.

PTQ (`jaxmodels compress --method ptq`): `ptq(model, ...)` replaces the kernel of every `nnx.Linear` and `nnx.Conv`
not excluded by qwix's per-channel int8 / int4 `QArray` (integer values + float32 scales, symmetric absmax,
one scale per output channel; per layer of a scanned stack too), then intercepts the forward pass with
`qwix.PtqProvider`, which computes each matmul on the stored integers. The parameters are then
`{"kernel": {"array": {"qvalue": int8|int4, "scale": float32}}}` and are saved so (jaxmodels.export).

What qwix does not do here, and what is done instead:
- qwix's PTQ creates quantized weights during a first forward call, by replacing the parameter on the module it
  runs in. The Transformer, ViT and LSTM run their layers on modules rebuilt from state inside `lax.scan` (or
  `nnx.split`/`merge` per layer), where that replacement is lost (and fails on scanned parameters). So the
  kernels are quantized here beforehand, with qwix's own `quantize` and `HowToQuantize` (qwix's
  `ptq.WithAux` is its documented-in-code carrier of a pre-quantized weight; it has no public alias), and qwix's
  PtqProvider then finds them already quantized. No quantizer is hand-written: the integer rounding and scales
  are qwix's.
- qwix's PTQ convolution quantizes both operands to the same type (`conv_general_dilated requires same act_qtype
  and weight_qtype`): convolutions always quantize their input activations too, dynamically (absmax per example),
  and at 4 bits stay int8, since XLA's CPU backend cannot run an int4 convolution.
- XLA's CPU backend cannot multiply int4 operands: 4-bit activations are refused there (`check`).
- Activations (`activations=True`) are quantized dynamically (a scale per row, computed on the fly, qwix's XLA
  default). qwix's static-range activation scales are also created as new parameters during the first call,
  which the rebuilt per-layer modules lose, so no calibration pass is run.
- Only `__call__` is intercepted by `qwix.quantize_model` on NNX models; `for_decoding` intercepts a language
  model's `decode` (the sampler's KV-cache step) on the same weights.
"""

import json
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src.core.qarray import HowToQuantize  # qwix's description of how an array is quantized
from qwix._src.providers.ptq import WithAux  # the carrier of a pre-quantized weight that PtqProvider accepts

from jaxmodels.errors import UserError

BITS = (4, 8)  # integer widths qwix quantizes to on every backend (int4 is stored as jnp.int4)
QTYPES = {8: jnp.int8, 4: jnp.int4}
# Convolutions are int8 at any width: qwix's PTQ convolution quantizes both operands to one type, and XLA's CPU
# backend cannot run an int4 convolution ("does not support custom element sizes").
CONV_QTYPE = jnp.int8


def module_path(path) -> str:
  """A module's path as qwix matches rules against it: names joined by '/' (e.g. stack/blocks/attn/query)."""
  return "/".join(map(str, path))


def _rules(bits: int, activations: bool, exclude: str, rule=qwix.QuantizationRule) -> list:
  """qwix rules, first match wins: excluded modules in float; convolutions in int8 with their inputs (CONV_QTYPE);
  every other matmul with `bits`-bit weights (and inputs)."""
  qtype = QTYPES[bits]
  act = qtype if activations else None
  return [rule(module_path=exclude),
          rule(module_path=".*", op_names=("conv_general_dilated",), weight_qtype=CONV_QTYPE, act_qtype=CONV_QTYPE),
          rule(module_path=".*", weight_qtype=qtype, act_qtype=act)]


def sample_input(input_shape, task: str) -> jax.Array:
  """A one-example batch of the model's input (token ids for language models): qwix traces the model on it once."""
  return jnp.zeros((1, *input_shape), jnp.int32 if task == "lm" else jnp.float32)


def check(bits: int, exclude: str, activations: bool = False) -> None:
  """Raises UserError for a width qwix does not offer here (int4 activations on the CPU) or a bad exclude regex."""
  if bits not in BITS:
    raise UserError(f"--bits {bits}: qwix quantizes to {' or '.join(map(str, BITS))} bits")
  if bits == 4 and activations and jax.default_backend() == "cpu":
    raise UserError("4-bit activations: XLA's CPU backend cannot multiply int4 operands (\"custom element sizes\"); "
                    "quantize activations at 8 bits, or only the weights at 4")
  try:
    re.compile(exclude)
  except re.error as e:
    raise UserError(f"exclude pattern {exclude!r} is not a regex: {e}") from None


def per_step_recurrence(model: nnx.Module) -> nnx.Module:
  """`model` with its recurrent stacks calling each cell's `dense_h` per time step: qwix quantizes the matmuls it
  sees inside a module's call, and their fused recurrence (jaxmodels.models.recurrent) computes that matmul on the
  kernel's value directly."""
  for _, module in nnx.iter_modules(model):
    if getattr(module, "fused_recurrence", False):
      module.fused_recurrence = False
  return model


def qat(model: nnx.Module, bits: int, activations: bool, exclude: str, x) -> nnx.Module:
  """`model` (a copy) whose forward pass fake-quantizes weights (and activations) to `bits` (qwix.QtProvider).

  `x`: a sample input batch (sample_input). The parameters keep their float dtype and tree.
  """
  check(bits, exclude, activations)
  # No eager first call (qwix's init, which QT needs only for static activation scales): run eagerly on the
  # Transformer LM and ViT, qwix's QT takes both operands of an attention einsum for weights and fails.
  return per_step_recurrence(qwix.quantize_model(
      model, qwix.QtProvider(_rules(bits, activations, exclude, qwix.QtRule)), x, skip_nnx_init=True))


def _how(module: nnx.Module, ndim: int, bits: int) -> HowToQuantize:
  """Per-output-channel absmax: a scale for every axis but the contracted ones (Linear: the input axis, the
  second last; Conv: spatial and input axes). Leading axes of a scanned stack get their own scales too."""
  linear = isinstance(module, nnx.Linear)
  contracted = {ndim - 2} if linear else set(range(ndim - 1))
  return HowToQuantize(qtype=QTYPES[bits] if linear else CONV_QTYPE,
                       channelwise_axes=tuple(a for a in range(ndim) if a not in contracted))


def ptq(model: nnx.Module, bits: int, activations: bool, exclude: str, x) -> nnx.Module:
  """`model` (a copy) with the kernels of its Linear and Conv modules (those whose path `exclude` does not match)
  stored as qwix QArrays of `bits`-bit integers and per-channel float32 scales, computing through
  qwix.PtqProvider. `x`: a sample input batch. Raises UserError for unsupported bits or a bad regex."""
  check(bits, exclude, activations)
  model = per_step_recurrence(nnx.clone(model))
  for path, module in model.iter_modules():
    if isinstance(module, (nnx.Linear, nnx.Conv)) and not re.fullmatch(exclude, module_path(path)):
      kernel = module.kernel
      how = _how(module, kernel.ndim, bits)
      quantized = qwix.quantize(kernel.get_value(), how.qtype, channelwise_axes=how.channelwise_axes)
      module.kernel = WithAux(jax.tree.map(nnx.Param, quantized), how)
  return qwix.quantize_model(model, qwix.PtqProvider(_rules(bits, activations, exclude)), x)


def for_decoding(model: nnx.Module, spec: dict, length: int = 2) -> nnx.Module:
  """A quantized language model (PTQ or QAT, per `spec`) whose `decode` runs quantized too: qwix intercepts one
  method per NNX model, `__call__` at quantization; this intercepts `decode` on the same weights."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  ptq_model = spec["method"] == "ptq"
  provider = (qwix.PtqProvider(_rules(spec["bits"], spec["activations"], spec["exclude"])) if ptq_model
              else qwix.QtProvider(_rules(spec["bits"], spec["activations"], spec["exclude"], qwix.QtRule)))
  return qwix.quantize_model(model, provider, tokens, model.init_cache(1, length), 0, methods=("decode",),
                             skip_nnx_init=not ptq_model)  # as in `qat`


SPEC_FILE = "quantization.json"  # written beside an export's params/: how to rebuild its quantized module


def spec_of(directory) -> dict | None:
  """The quantization of a run or export: {"method": "ptq"|"qat", "bits", "activations", "exclude"} or None."""
  from jaxmodels import storage  # pylint: disable=import-outside-toplevel
  path = storage.path(directory) / SPEC_FILE
  if path.is_file():
    return json.loads(path.read_text())
  config_path = storage.path(directory) / "config.json"
  q = json.loads(config_path.read_text()).get("train", {}).get("quantization") if config_path.is_file() else None
  if q and q.get("bits"):
    return {"method": "qat", "bits": q["bits"], "activations": q["activations"], "exclude": q["exclude"]}
  return None


def apply(model: nnx.Module, spec: dict | None, input_shape, task: str) -> nnx.Module:
  """`model` quantized as `spec` says (ptq or qat), or unchanged for None."""
  if not spec:
    return model
  quantize = ptq if spec["method"] == "ptq" else qat
  return quantize(model, spec["bits"], spec["activations"], spec["exclude"], sample_input(input_shape, task))
