"""Integer quantization of any model family through Google's `qwix`: quantization-aware training and PTQ.

QAT (`train.quantization.bits` = 8 or 4): `qat(model, ...)` intercepts the model's forward pass with qwix's
`QtProvider`, so the matmul of every `nnx.Linear` and the convolution of every `nnx.Conv` not matched by
`train.quantization.exclude` computes on fake-quantized int weights (per output channel, symmetric absmax; and on
dynamically quantized inputs with `train.quantization.activations`), with straight-through gradients (the
backward pass multiplies the float operands). Everything else stays float: embeddings, norms, and attention's
activation x activation einsums (q.k and p.v). The parameters stay float32: a QAT run checkpoints, resumes and
exports like any other.

PTQ (`jaxmodels compress --method ptq`): `ptq(model, ...)` replaces the kernel of every `nnx.Linear` and `nnx.Conv`
not excluded by qwix's per-channel int8 / int4 `QArray` (integer values + float32 scales, symmetric absmax,
one scale per output channel; per layer of a scanned stack too), then intercepts the forward pass with
`qwix.PtqProvider`, which computes each matmul on the stored integers. The parameters are then
`{"kernel": {"array": {"qvalue": int8|int4, "scale": float32}}}` and are saved so (jaxmodels.export).

What qwix does not do here, and what is done instead:
- qwix's QT tells a weight from an activation by `flax_util.find_param`: the operand is the module's parameter
  by identity, or, failing that, by shape (any parameter of the current module of the same shape). A Transformer
  computes its projections on token rows x_MD; where batch x length equals d_model, the rows of a square
  projection (query, attention output) have its kernel's shape, qwix takes both operands for weights and fails
  ("lhs and rhs cannot be both weights"; an unlucky shape elsewhere quantizes an activation as a weight). No rule
  or option turns the shape fallback off, so QAT's rules match only the paths of the model's `nnx.Linear` and
  `nnx.Conv` modules (`_qat_rules`), and `_QtProvider` takes the right operand of a Linear's one matmul
  (flax's `inputs @ kernel`) for the weight, as qwix itself does for every convolution. The quantization and its
  gradients remain qwix's (`dot_general_qt`); AQT was not needed.
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
  model's `decode` (the sampler's KV-cache step) on the same weights. An encoder-decoder's `generate` (greedy
  decoding, not used by training or eval) runs in float.
"""

import json
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src.core.dot_general_qt import DotGeneralQtConfig  # qwix's quantized-training matmul settings
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


def _rules(bits: int, activations: bool, exclude: str) -> list:
  """PTQ's qwix rules, first match wins: excluded modules in float; convolutions in int8 with their inputs
  (CONV_QTYPE); every other matmul with `bits`-bit weights (and inputs)."""
  qtype = QTYPES[bits]
  act = qtype if activations else None
  rule = qwix.QuantizationRule
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


class _QtProvider(qwix.QtProvider):
  """qwix's quantized-training provider, for rules that match only `nnx.Linear` modules (`_qat_rules`): there the
  one matmul is flax's `inputs @ kernel`, so the right operand is the weight and the left the input activation.

  qwix's own `_create_dot_general_qt_config` looks the operands up by shape (module docstring) and fails on
  inputs shaped like the kernel. The settings are those it makes for such a rule: weights per output channel,
  inputs (with an `act_qtype`) per row, both absmax and dynamic, and the backward pass on the float operands
  (`use_original_residuals`, qwix's default when only the forward pass is quantized): straight-through gradients.
  """

  def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs) -> DotGeneralQtConfig:
    del op_id, lhs, rhs  # the roles are known: input activation @ weight
    return DotGeneralQtConfig(lhs_qtype=rule.act_qtype, rhs_qtype=rule.weight_qtype,
                              lhs_calibration_method=rule.act_calibration_method,
                              rhs_calibration_method=rule.weight_calibration_method, use_original_residuals=True)


def _paths_regex(model: nnx.Module, kind, exclude: str) -> str | None:
  """A regex matching exactly the paths of `model`'s `kind` modules that `exclude` does not match (None: none)."""
  paths = [module_path(p) for p, m in nnx.iter_modules(model)
           if isinstance(m, kind) and not re.fullmatch(exclude, module_path(p))]
  return "|".join(map(re.escape, paths)) or None


def _qat_rules(model: nnx.Module, bits: int, activations: bool, exclude: str) -> list:
  """qwix QtRules for the model's Linear matmuls (`bits`-bit weights, and inputs with `activations`) and Conv
  convolutions (CONV_QTYPE weights and inputs, as in PTQ); no rule elsewhere, so everything else is float."""
  qtype = QTYPES[bits]
  linear, conv = _paths_regex(model, nnx.Linear, exclude), _paths_regex(model, nnx.Conv, exclude)
  rules = []
  if linear:
    rules.append(qwix.QtRule(module_path=linear, op_names=("dot_general",), weight_qtype=qtype,
                             act_qtype=qtype if activations else None))
  if conv:
    rules.append(qwix.QtRule(module_path=conv, op_names=("conv_general_dilated",), weight_qtype=CONV_QTYPE,
                             act_qtype=CONV_QTYPE))
  return rules


def qat(model: nnx.Module, bits: int, activations: bool, exclude: str, x) -> nnx.Module:
  """`model` (a copy) whose forward pass fake-quantizes the weights (and inputs) of its Linear and Conv modules
  to `bits` (qwix's QT, `_QtProvider`). `x`: a sample input batch (sample_input), which qwix requires; its first
  call on it is skipped, since QT with dynamic scales creates no state. The parameters keep their float dtype and
  tree. Raises UserError for unsupported bits or a bad `exclude` regex."""
  check(bits, exclude, activations)
  return qwix.quantize_model(model, _QtProvider(_qat_rules(model, bits, activations, exclude)), x,
                             skip_nnx_init=True)


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
  model = nnx.clone(model)
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
              else _QtProvider(_qat_rules(model, spec["bits"], spec["activations"], spec["exclude"])))
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
