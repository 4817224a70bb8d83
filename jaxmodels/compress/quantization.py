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
`{"kernel": {"array": {"qvalue": int8|int4, "scale": float32}}}` and are saved so (jaxmodels.runs.export). With
static activations each of those modules also holds its input's scale, `{"dot_general0_lhs_scale": {"array":
(1, 1)}}` (a Conv's `conv_general_dilated0_lhs_scale`; a leading layer axis in a stack), in the input's dtype
(qwix checks it: bfloat16 in a bfloat16 model): one scale per tensor, the largest |input| over the calibration
batches divided by qwix's int8 bound (127.5).

What qwix does not do here, and what is done instead:
- qwix's QT tells a weight from an activation by `flax_util.find_param`: the operand is the module's parameter
  by identity, or, failing that, by shape (any parameter of the current module of the same shape). A Transformer
  computes its projections on token rows x_MD; where batch x length equals d_model, the rows of a square
  projection (query, attention output) have its kernel's shape, qwix takes both operands for weights and fails
  ("lhs and rhs cannot be both weights"; an unlucky shape elsewhere quantizes an activation as a weight). No rule
  or option turns the shape fallback off, so the rules of QAT and PTQ match only the paths of the model's
  `nnx.Linear` and `nnx.Conv` modules (`_rules`), and `_QtRoles` takes the right operand of a Linear's one matmul
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
  and weight_qtype`): convolutions always quantize their input activations too (dynamically, absmax per example,
  unless the inputs are static), and at 4 bits stay int8, since XLA's CPU backend cannot run an int4 convolution.
- XLA's CPU backend cannot multiply int4 operands: 4-bit activations are refused there (`check`).
- Static activation scales (qwix's `act_static_scale`) are calibrated by qwix from the first batch only, and
  stored on the module the op runs in: lost where a stack rebuilds its layers inside a scan, and refused inside a
  recurrent cell's time scan ("Cannot mutate ... from different trace level"). So `_Calibrating` runs the model
  over the calibration batches with dynamic inputs, recording each input's largest |x| per layer (the scan
  slices a layer index set beside the weights), and `_set_static_scales` stores the scales where qwix's
  PtqProvider looks for them; from then on qwix quantizes with them. One scale per tensor (qwix's default keeps
  the axes after the batch axis, such as a token position), over the largest value seen (qwix averages each
  batch's absmax, which clips every batch above the average).
- Only `__call__` is intercepted by `qwix.quantize_model` on NNX models; `for_decoding` intercepts a language
  model's `decode` (the sampler's KV-cache step) or an encoder-decoder's `generate` on the same weights.

qwix is the `quant` extra (`pip install 'jaxmodels[quant]'`): it is imported at first use (`_qwix`), so this
module and the training loop that imports it load without it, and quantizing without it is a one-line error.
"""

import collections
import functools
import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.models.forward import forward as model_forward
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["apply", "BITS", "check", "CONV_QTYPE", "FEATURE", "for_decoding", "module_path", "ptq", "qat", "QTYPES",
           "sample_batch", "SPEC_FILE", "spec_of"]

BITS = (4, 8)  # integer widths qwix quantizes to on every backend (int4 is stored as jnp.int4)
QTYPES = {8: jnp.int8, 4: jnp.int4}
# Convolutions are int8 at any width: qwix's PTQ convolution quantizes both operands to one type, and XLA's CPU
# backend cannot run an int4 convolution ("does not support custom element sizes").
CONV_QTYPE = jnp.int8
_SCALE = "_scale"  # qwix's suffix of a static input scale's parameter name (`{op}_lhs_scale`)
# qwix.quantize_model's model inputs, for a first call that is skipped (qwix requires inputs all the same): QT with
# dynamic scales creates no state, and PTQ's quantized weights and static scales are made beforehand.
_NO_FIRST_CALL = (None,)
FEATURE = "quantization (train.quantization.bits, compress --method ptq)"  # what needs qwix, the `quant` extra


@functools.cache
def _qwix() -> types.SimpleNamespace:
  """qwix, the parts of it used here, and the two providers built on it (`_QtRoles`, `_Calibrating` mixed into
  qwix's), imported at first use (module docstring); without qwix, the one-line error of jaxmodels.runtime.extras."""
  qwix, qarray = extras.require("qwix", FEATURE), extras.require("qwix._src.core.qarray", FEATURE)
  return types.SimpleNamespace(
      qwix=qwix,
      qarray=qarray,  # quantized arrays: calibration and scales (`_Calibrating`)
      HowToQuantize=qarray.HowToQuantize,  # how an array is quantized
      DotGeneralQtConfig=extras.require("qwix._src.core.dot_general_qt", FEATURE).DotGeneralQtConfig,  # QT matmuls
      WithAux=extras.require("qwix._src.providers.ptq", FEATURE).WithAux,  # a pre-quantized weight PtqProvider takes
      flax_util=extras.require("qwix._src.utils.flax_util", FEATURE),  # the module an intercepted op runs in
      QtProvider=type("_QtProvider", (_QtRoles, qwix.QtProvider), {}),
      Calibrator=type("_Calibrator", (_Calibrating, qwix.PtqProvider), {}),
  )


def module_path(path) -> str:
  """A module's path as qwix matches rules against it: names joined by '/' (e.g. stack/blocks/attn/query)."""
  return "/".join(map(str, path))


def sample_batch(input_shape, task: str) -> dict:
  """A one-example batch of zeros as the data of `task` gives it (`x`: token ids for "lm" and "seq2seq", whose
  encoder-decoders also read `decoder_input` and `source_mask`; float32 for any other task), for tracing a model
  through `train.forward`."""
  tokens = task in ("lm", "seq2seq")
  x = jnp.zeros((1, *input_shape), jnp.int32 if tokens else jnp.float32)
  return {"x": x, "decoder_input": x, "source_mask": jnp.ones(x.shape, bool)} if task == "seq2seq" else {"x": x}


def check(bits: int, exclude: str, activations: bool | str = False) -> None:
  """Raises UserError without qwix (the `quant` extra), for a width qwix does not offer here (int4 activations on
  the CPU) or a bad exclude regex."""
  extras.check("qwix", FEATURE)
  if bits not in BITS:
    raise UserError(f"--bits {bits}: qwix quantizes to {' or '.join(map(str, BITS))} bits")
  if bits == 4 and activations and jax.default_backend() == "cpu":
    raise UserError("4-bit activations: XLA's CPU backend cannot multiply int4 operands (\"custom element sizes\"); "
                    "quantize activations at 8 bits, or only the weights at 4")
  try:
    re.compile(exclude)
  except re.error as e:
    raise UserError(f"exclude pattern {exclude!r} is not a regex: {e}") from None


class _QtRoles:
  """Mixed into qwix's quantized-training provider (`_qwix().QtProvider`), for rules that match only `nnx.Linear`
  modules (`_rules`): there the one matmul is flax's `inputs @ kernel`, so the right operand is the weight and the
  left the input activation.

  qwix's own `_create_dot_general_qt_config` looks the operands up by shape (module docstring) and fails on
  inputs shaped like the kernel. The settings are those it makes for such a rule: weights per output channel,
  inputs (with an `act_qtype`) per row, both absmax and dynamic, and the backward pass on the float operands
  (`use_original_residuals`, qwix's default when only the forward pass is quantized): straight-through gradients.
  """

  def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs):
    del op_id, lhs, rhs  # the roles are known: input activation @ weight
    return _qwix().DotGeneralQtConfig(lhs_qtype=rule.act_qtype, rhs_qtype=rule.weight_qtype,
                                      lhs_calibration_method=rule.act_calibration_method,
                                      rhs_calibration_method=rule.weight_calibration_method,
                                      use_original_residuals=True)


def _layer_shape(module) -> tuple[int, ...]:
  """The leading layer axes of a Linear's or Conv's kernel: (L,) in a stack built by nnx.vmap, () otherwise."""
  natural = 2 if isinstance(module, nnx.Linear) else len(module.kernel_size) + 2
  return tuple(module.kernel.shape[:module.kernel.ndim - natural])


def _quantized_modules(model: nnx.Module, exclude: str) -> dict:
  """{path: module} of the model's Linear and Conv modules whose path `exclude` does not match."""
  return {module_path(p): m for p, m in nnx.iter_modules(model)
          if isinstance(m, (nnx.Linear, nnx.Conv)) and not re.fullmatch(exclude, module_path(p))}


def _static_ndims(model: nnx.Module) -> dict[str, int]:
  """{path: rank of the input} of the modules holding a static input scale (`_set_static_scales`)."""
  return {module_path(p): value.ndim - len(_layer_shape(m)) for p, m in nnx.iter_modules(model)
          for name, value in vars(m).items() if name.endswith(_SCALE) and isinstance(value, _qwix().WithAux)}


def _rules(model: nnx.Module, rule_type, bits: int, activations, exclude: str) -> list:
  """qwix rules (`rule_type`: QtRule for QAT, QuantizationRule for PTQ) for exactly the model's Linear matmuls
  (`bits`-bit weights, and inputs with `activations`) and Conv convolutions (CONV_QTYPE weights and inputs);
  no rule elsewhere, so everything else (attention's einsums, embeddings, norms) is float.

  `activations`: falsy (weights only), True or "dynamic" (a scale per row, computed on the fly), or "static"
  (qwix's `act_static_scale`: one scale per tensor, held by the module). Static rules are grouped by the rank of
  the module's input (`_static_ndims`), averaging the scale over every axis but the contracted last one, so the
  scale has no axis that depends on the batch (a module that did not run during calibration has no scale and
  keeps qwix's default).
  """
  qtype, static, ndims = QTYPES[bits], activations == "static", _static_ndims(model)
  groups = collections.defaultdict(list)  # (op, weight qtype, input qtype, input rank) -> paths
  for path, module in _quantized_modules(model, exclude).items():
    linear = isinstance(module, nnx.Linear)
    op = "dot_general" if linear else "conv_general_dilated"
    act = (qtype if activations else None) if linear else CONV_QTYPE
    groups[op, qtype if linear else CONV_QTYPE, act, ndims.get(path) if static else None].append(path)
  rules = []
  for (op, weight, act, ndim), paths in groups.items():
    extra = dict(act_static_scale=True) if static else {}
    if ndim:
      extra["act_batch_axes"] = tuple(range(ndim - 1))
    rules.append(rule_type(module_path="|".join(map(re.escape, paths)), op_names=(op,), weight_qtype=weight,
                           act_qtype=act, **extra))
  return rules


def qat(model: nnx.Module, bits: int, activations: bool, exclude: str) -> nnx.Module:
  """`model` (a copy) whose forward pass fake-quantizes the weights (and inputs) of its Linear and Conv modules
  to `bits` (qwix's QT, `_QtRoles`). The parameters keep their float dtype and tree. Raises UserError without
  qwix, for unsupported bits or a bad `exclude` regex."""
  check(bits, exclude, activations)
  q = _qwix()
  return q.qwix.quantize_model(model, q.QtProvider(_rules(model, q.qwix.QtRule, bits, activations, exclude)),
                               *_NO_FIRST_CALL, skip_nnx_init=True)


def _how(module: nnx.Module, ndim: int, bits: int):
  """Per-output-channel absmax: a scale for every axis but the contracted ones (Linear: the input axis, the
  second last; Conv: spatial and input axes). Leading axes of a scanned stack get their own scales too."""
  linear = isinstance(module, nnx.Linear)
  contracted = {ndim - 2} if linear else set(range(ndim - 1))
  return _qwix().HowToQuantize(qtype=QTYPES[bits] if linear else CONV_QTYPE,
                               channelwise_axes=tuple(a for a in range(ndim) if a not in contracted))


class _LayerIndex(nnx.Variable):
  """Each layer's index on a stacked module (a kernel with leading layer axes), set only while calibrating: the
  scan that runs the stack slices it with the layer's parameters, so the calibrator knows which layer it sees."""


class _Calibrating:
  """Mixed into qwix's PTQ provider (`_qwix().Calibrator`, inputs quantized dynamically), run over calibration
  batches, recording every quantized input: at trace time the name qwix gives its static scale and qwix's
  HowToQuantize (`inputs`), at run time its largest |x| per layer (`absmax`, through jax.debug.callback, which
  also reports from inside a scan).

  qwix's own static scales are calibrated once, from the first batch, and stored on the module they run in,
  which a stack rebuilds per layer inside its scan (module docstring), and which a recurrent cell runs inside
  its time scan, where the module cannot be changed. So the inputs are quantized dynamically here (qwix's
  `quantize`, reached through the provider's `_qarray_module` hook, "useful for extending"), and
  `_get_current_rule_and_op_id` names the op each input belongs to, as qwix names the scale.
  """

  def __init__(self, rules):
    self.inputs = {}  # (module path, scale name) -> (qwix's HowToQuantize of that input, its rank, its dtype)
    self.absmax = collections.defaultdict(dict)  # (module path, scale name) -> {flat layer index: largest |x|}
    self._op_id = None
    calibrator, qarray = self, _qwix().qarray

    class Recording:  # qwix's qarray module, recording what `quantize` is given (only inputs: weights are QArrays)
      def __getattr__(self, name):
        return getattr(qarray, name)

      def quantize(self, array, how):
        calibrator.record(array, how)
        return qarray.quantize(array, how)

    super().__init__(rules, _qarray_module=Recording())

  def _get_current_rule_and_op_id(self, op_name, **kwargs):
    rule, self._op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
    return rule, self._op_id

  def record(self, array, how) -> None:
    module = _qwix().flax_util.get_current_module()
    key = (module_path(module.qwix_path), f"{self._op_id}_lhs{_SCALE}")  # qwix's name: ptq.quantize_act
    self.inputs[key] = how, array.ndim, array.dtype
    layer = getattr(module, "calibration_layer", None)
    layer = jnp.zeros((), jnp.int32) if layer is None else layer.get_value()  # a traced scalar in a scan
    jax.debug.callback(functools.partial(self._seen, key), layer, jnp.max(jnp.abs(array)))

  def _seen(self, key, layer, absmax) -> None:
    seen = self.absmax[key]
    seen[int(layer)] = max(seen.get(int(layer), 0.0), float(absmax))


def _set_static_scales(model: nnx.Module, bits: int, exclude: str, sample: dict, batches) -> None:
  """Gives every quantized Linear and Conv of `model` (kernels already quantized) a static scale for its input,
  one per tensor (per layer in a stack): qwix's absmax scale of the largest |input| over `batches` (batches of
  the data, run through the quantized model by `train.forward`), or for None placeholders (of an absmax of 1, the
  model traced on `sample`), for a checkpoint to restore.

  The largest value seen, as PyTorch's MinMaxObserver takes it, rather than qwix's own average of each batch's
  absmax, which clips every batch above the average. Held as qwix does (`{op}_lhs_scale`: a WithAux of the
  scale and its HowToQuantize), so qwix's PtqProvider quantizes each input with it.
  """
  modules = _quantized_modules(model, exclude)
  calibrating = nnx.clone(model)
  for module in _quantized_modules(calibrating, exclude).values():
    shape = _layer_shape(module)
    if shape:
      module.calibration_layer = _LayerIndex(jnp.arange(math.prod(shape)).reshape(shape))
  q = _qwix()
  calibrator = q.Calibrator(_rules(calibrating, q.qwix.QuantizationRule, bits, "dynamic", exclude))
  graphdef, state = nnx.split(q.qwix.quantize_model(calibrating, calibrator, *_NO_FIRST_CALL, skip_nnx_init=True))
  forward = lambda state, batch: model_forward(nnx.merge(graphdef, state), batch)
  if batches is None:
    jax.eval_shape(forward, state, sample)  # traced for the names and shapes alone
  else:
    forward = jax.jit(forward)
    for batch in batches:
      forward(state, batch)
    jax.effects_barrier()
  for (path, name), (how, ndim, dtype) in calibrator.inputs.items():
    module = modules[path]
    shape = _layer_shape(module)
    absmax = np.ones(shape) if batches is None else np.array(
        [calibrator.absmax[path, name].get(i, 0.0) for i in range(math.prod(shape))]).reshape(shape)
    scale, _ = q.qarray.compute_scale_zero_point({"absmax": jnp.asarray(absmax, jnp.float32)}, how.qtype)
    scale = scale.astype(dtype)  # the input's dtype, as qwix makes it (and checks it: a bfloat16 model's)
    setattr(module, name, q.WithAux(nnx.Param(scale.reshape(shape + (1,) * ndim)), how))


def ptq(model: nnx.Module, bits: int, activations, exclude: str, sample: dict, calibration=None) -> nnx.Module:
  """`model` (a copy) with the kernels of its Linear and Conv modules (those whose path `exclude` does not match)
  stored as qwix QArrays of `bits`-bit integers and per-channel scales (in the parameters' dtype), computing
  through qwix.PtqProvider. `activations` (see `_rules`): falsy, "dynamic", or "static", whose scales are calibrated on
  `calibration`, an iterable of batches of the data (None: placeholders, for a checkpoint to restore, traced on
  `sample`, a batch such as `sample_batch`'s). Raises UserError for unsupported bits, a bad regex, or int8 inputs
  in float16, or without qwix."""
  check(bits, exclude, activations)
  q = _qwix()
  # qwix rescales the int32 product of two integer operands in the input's dtype: past 65504 float16 is inf.
  float16 = [path for path, m in _quantized_modules(model, exclude).items() if (activations or isinstance(
      m, nnx.Conv)) and m.dtype is not None and jnp.dtype(m.dtype) == jnp.float16]
  if float16:
    raise UserError(f"PTQ of a float16 model with quantized inputs ({float16[0]}; --activations, or any "
                    "convolution): qwix rescales their int32 products in float16, which overflows to inf; "
                    "compress a float32 or bfloat16 run")
  model = nnx.clone(model)
  for module in _quantized_modules(model, exclude).values():
    kernel = module.kernel
    how = _how(module, kernel.ndim, bits)
    quantized = q.qwix.quantize(kernel.get_value(), how.qtype, channelwise_axes=how.channelwise_axes)
    module.kernel = q.WithAux(jax.tree.map(nnx.Param, quantized), how)
  if activations == "static":
    _set_static_scales(model, bits, exclude, sample, calibration)
  rules = _rules(model, q.qwix.QuantizationRule, bits, activations, exclude)
  return q.qwix.quantize_model(model, q.qwix.PtqProvider(rules), *_NO_FIRST_CALL, skip_nnx_init=True)


def for_decoding(model: nnx.Module, spec: dict) -> nnx.Module:
  """A quantized language model or encoder-decoder (PTQ or QAT, per `spec`) whose decoding runs quantized too:
  qwix intercepts one method per NNX model, `__call__` at quantization; this intercepts a language model's
  `decode` (the sampler's KV-cache step) or an encoder-decoder's `generate` (greedy decoding: its encoder and its
  cached steps) instead, on the same weights (and static input scales)."""
  method = "generate" if hasattr(model, "generate") else "decode"
  ptq_model, q = spec["method"] == "ptq", _qwix()
  rules = _rules(model, q.qwix.QuantizationRule if ptq_model else q.qwix.QtRule, spec["bits"], spec["activations"],
                 spec["exclude"])
  provider = q.qwix.PtqProvider(rules) if ptq_model else q.QtProvider(rules)
  return q.qwix.quantize_model(model, provider, *_NO_FIRST_CALL, methods=(method,), skip_nnx_init=True)


SPEC_FILE = "quantization.json"  # written beside an export's params/: how to rebuild its quantized module


def spec_of(directory) -> dict | None:
  """The quantization of a run or export: {"method": "ptq"|"qat", "bits", "activations", "exclude"} (and a static
  PTQ's "calibration_batches") or None."""
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
  if spec["method"] == "qat":
    return qat(model, spec["bits"], spec["activations"], spec["exclude"])
  return ptq(model, spec["bits"], spec["activations"], spec["exclude"], sample_batch(input_shape, task))
