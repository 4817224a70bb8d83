"""Model FLOPs per training step, device peaks, and model FLOP utilisation (MFU).

Convention (PaLM, appendix B): a training step costs 6 FLOPs per parameter per
token it touches (2 forward, 4 backward), plus, for attention, 6 x 2 x T x d_model
per token per layer for the score and value products (`12 L T d` per token), HALVED
where the mask is causal (`6 L T d`): a causal query attends to half the keys on
average, and kernels that skip masked blocks (flash, splash) do only that work. The
halving is MaxText's (`calculate_tflops_training_per_device`, since
AI-Hypercomputer/maxtext PR #1988); PaLM counts attention whole. Bidirectional
attention (encoders, ViT, cross-attention) is counted whole. Per family:

- MLP: 6 x parameters x examples (every weight is used once per example).
- CNN: 6 x (multiply-accumulates of each conv and dense layer per example) x examples.
- LSTM/GRU: 6 x parameters x tokens (each weight is used once per time step).
- ResNet: as the CNN (each convolution's multiply-accumulates at its output resolution).
- Transformer LM: 6 x (parameters - embeddings) x tokens + 6 x L x T x d_model x tokens (causal), plus the LM
  head (2 x d_model x V per token, x3) when the embedding is tied. The classifier: 12 x L x T x d. With
  mixture-of-experts layers the parameters are the active ones (`count_active_params`: the K of E experts a token
  visits, shared experts, routers, attention), as MaxText and the Mixtral paper (Jiang et al. 2024, "13B active
  parameters") count them; the dispatch's sorts, gathers and all-to-alls are not counted.
- ViT: the Transformer classifier's count over its patches (+ class token).
- Encoder-decoder: the encoder's parameters over the S source tokens, the decoder's over the T = S + 1
  target tokens (6 x each), attention 12 x L x d_model x (S^2 + T^2 / 2 + T S) (the decoder's self-attention
  causal), and the head as the LM's.
- A module named by import path (`model.family=package.module:ClassName`): its `flops_per_example(input_shape)`
  x examples where it defines one, else 6 x parameters x examples (x tokens for a language model), with a note
  that says so.

These are model FLOPs: the work the model needs, whatever the implementation. `hardware_flops_per_step` adds
what activation rematerialisation (`model.remat`) computes again in the backward pass: with `full`, each
Transformer block's forward pass (2 x its parameters x tokens + a third of its attention); with `dots`, which
saves the matmul outputs without batch dimensions, the attention score and value products' forward third. MFU
divides model FLOPs by the peak, HFU hardware FLOPs (PaLM, appendix B, names both).

`jaxmodels bench step` cross-checks these against XLA's own count.
"""

import math
import time

import jax
import jax.numpy as jnp

from jaxmodels.models import registry
from jaxmodels.models.params import count_active_params, count_params

__all__ = ["attention_flops", "datasheet_peak", "hardware_flops_per_step", "matmul_flops", "model_flops_per_step",
           "PEAK_FLOPS", "peak_flops"]

# Dense bf16 peak FLOP/s per chip, vendor datasheets. CPUs are measured instead (`matmul_flops`).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}
_matmuls = {}


def matmul_flops(n: int = 2048) -> float:
  """FLOP/s of one float32 n x n matmul on the default device (compiled and warmed up once per process)."""
  if n not in _matmuls:
    a = jax.jit(lambda: jnp.ones((n, n), jnp.float32))()  # made on the device: no transfer (the loop's guard)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    _matmuls[n] = (f, a)
  f, a = _matmuls[n]
  t0 = time.perf_counter()
  f(a).block_until_ready()
  return 2 * n**3 / (time.perf_counter() - t0)


def datasheet_peak(device=None) -> tuple[float, str] | None:
  """(peak FLOP/s, device kind) from the table, or None for devices it does not list (CPUs)."""
  device = device or jax.devices()[0]
  for kind, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.lower() in device.device_kind.lower():
      return peak, kind
  return None


def peak_flops(devices: int = 1, device=None) -> tuple[float, str] | None:
  """(datasheet peak FLOP/s of a step on `devices` devices, where it came from), or None for a device the table
  does not list (a CPU), whose callers time `matmul_flops` between steps instead.

  Model FLOPs count the global batch, so a listed chip's peak is multiplied by the
  devices the step runs on.
  """
  listed = datasheet_peak(device)
  if listed is None:
    return None
  return listed[0] * devices, f"datasheet bf16 peak of {listed[1]}" + (f" x {devices}" if devices > 1 else "")


def model_flops_per_step(config, dataset, abstract_model, notices: list[str] | None = None) -> float:
  """Analytic training FLOPs of one optimizer step (see the module docstring). A module of no built-in family
  without `flops_per_example` is counted as 6 x parameters per example (per token for "lm"), which appends a
  note saying so to `notices`."""
  m, batch = config.model, config.train.batch_size
  n_params = count_params(abstract_model)
  if m.family in ("transformer", "vit") and getattr(m, "num_experts", 0):  # MoE: the parameters a token uses
    active = count_active_params(abstract_model)
    if notices is not None:
      notices.append(f"parameters: {n_params:,} total, {active:,} active per token (mixture of experts: model "
                     f"FLOPs and MFU count the active ones)")
    n_params = active
  if m.family not in registry.FAMILIES:
    if hasattr(abstract_model, "flops_per_example"):
      return float(batch * abstract_model.flops_per_example(tuple(dataset.input_shape)))
    per_example = math.prod(dataset.input_shape) if dataset.task == "lm" else 1
    if notices is not None:
      notices.append(f"model.family={m.family} defines no flops_per_example(input_shape): MFU counts 6 x "
                     f"parameters x {'tokens' if dataset.task == 'lm' else 'examples'} per step")
    return 6.0 * n_params * batch * per_example
  if dataset.task == "seq2seq":
    s, t, d = dataset.input_shape[0], dataset.input_shape[0] + 1, m.d_model
    encoder = count_params(abstract_model.encoder)
    decoder = count_params(abstract_model.decoder)
    head = 2 * d * dataset.num_outputs * 3
    attention = 12 * m.num_layers * d * (s * s + t * t / 2 + t * s)
    return batch * (6 * (encoder * s + decoder * t) + attention + head * t)
  if dataset.task == "lm":
    tokens = batch * config.data.seq_len
    if m.family == "transformer":
      embed = count_params(abstract_model.embed)
      if abstract_model.pos_embed is not None:
        embed += count_params(abstract_model.pos_embed)
      head = 2 * m.d_model * dataset.num_outputs * 3 if m.tie_embeddings else 0
      attention = attention_flops(m.num_layers, config.data.seq_len, m.d_model, causal=True)
      return tokens * (6 * (n_params - embed) + attention + head)
    return 6.0 * n_params * tokens
  if m.family == "cnn":
    return 6.0 * batch * _cnn_macs(abstract_model, dataset.input_shape)
  if m.family == "resnet":
    return 6.0 * batch * _resnet_macs(abstract_model, dataset.input_shape)
  if m.family in ("transformer", "vit"):  # a ViT's tokens are its patches
    patches = math.prod(n // m.patch_size for n in dataset.input_shape[:2]) if m.family == "vit" else None
    length = (patches or dataset.input_shape[0]) + (m.pooling == "cls")
    return batch * length * (6 * n_params + attention_flops(m.num_layers, length, m.d_model, causal=False))
  if m.family == "lstm":
    return 6.0 * n_params * batch * dataset.input_shape[0]
  return 6.0 * n_params * batch


def attention_flops(layers: int, length: int, d_model: int, causal: bool) -> float:
  """Training FLOPs per token of attention's score and value products over `length` keys: 12 x layers x length
  x d_model (forward 4, backward 8), halved for a `causal` mask (the module docstring; MaxText PR #1988)."""
  return 12 * layers * length * d_model / (2 if causal else 1)


def hardware_flops_per_step(config, dataset, abstract_model, model_flops: float) -> float:
  """`model_flops` plus the forward work `model.remat` recomputes in the backward pass (the module docstring):
  for a Transformer (LM or classifier) whose stack is rematerialised, else `model_flops` itself."""
  m, batch = config.model, config.train.batch_size
  if m.family != "transformer" or m.get("remat", "none") == "none" or dataset.task not in ("lm", "classify"):
    return model_flops
  causal = dataset.task == "lm"
  length = config.data.seq_len if causal else dataset.input_shape[0] + (m.pooling == "cls")
  attention_forward = attention_flops(m.num_layers, length, m.d_model, causal) / 3
  blocks = count_params(abstract_model.stack.blocks) if m.remat == "full" else 0
  return model_flops + batch * length * (2 * blocks + attention_forward)


def _cnn_macs(model, input_shape) -> float:
  """Multiply-accumulates of one example through the CNN's convs and dense layers."""
  *spatial, _ = input_shape
  macs = 0.0
  for i, conv in enumerate(model.convs):
    k = conv.kernel.shape  # (*window, in, out)
    spatial = [-(-n // s) for n, s in zip(spatial, conv.strides)]
    macs += math.prod(spatial) * math.prod(k)
    if model.pool_after[i]:
      spatial = [n // 2 for n in spatial]
  for layer in [*model.head, model.out]:
    macs += math.prod(layer.kernel.shape)
  return macs


def _resnet_macs(model, input_shape) -> float:
  """Multiply-accumulates of one example through a ResNet (its convs pad k // 2: outputs are ceil(n / stride))."""
  def conv(unit, spatial):
    spatial = [-(-n // s) for n, s in zip(spatial, unit.conv.strides)]
    return spatial, math.prod(spatial) * math.prod(unit.conv.kernel.shape)
  spatial, macs = conv(model.stem, input_shape[:2])
  if model.max_pool:
    spatial = [-(-n // 2) for n in spatial]
  for block in model.blocks:
    if block.shortcut is not None:
      macs += conv(block.shortcut, spatial)[1]
    for unit in block.convs:
      spatial, m = conv(unit, spatial)
      macs += m
  return macs + math.prod(model.head.kernel.shape)
