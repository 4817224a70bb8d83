"""The text transformer's train step on a GPU: bf16 compute, cuDNN flash attention against XLA's.

    python benchmarks/gpu_step.py [--layers 8] [--d-model 1024] [--seq-len 1024] [--batch 16] [--steps 20]

Prints, for the backend JAX finds:
  1. the largest difference between `jax.nn.dot_product_attention` with
     implementation="cudnn" and "xla" on the same bf16 inputs (GPU only);
  2. the median step time, tokens/s and model FLOP utilisation of the compiled
     train step of `experiments/text_transformer.py` scaled up by the flags,
     for each attention implementation (MFU = the analytic model FLOPs of the
     step / step time / the device's dense bf16 peak from `jaxmodels.models.flops`;
     XLA's count is printed next to it, but counts a scanned layer once);
  3. a short full training run (`train_and_evaluate`, bf16 + cuDNN attention)
     with its final validation loss, so the whole pipeline ran on the device.
On a CPU it runs the XLA implementation alone, as a smoke test of the script.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxmodels.config import load_experiment  # pylint: disable=wrong-import-position
from jaxmodels.models import flops as flops_lib  # pylint: disable=wrong-import-position
from jaxmodels.train.experiment import build_experiment  # pylint: disable=wrong-import-position
from jaxmodels.train.loop import train_and_evaluate  # pylint: disable=wrong-import-position

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                          "text_transformer.py")

def attention_difference() -> float:
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  shape = (4, 1024, 8, 128)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in (k1, k2, k3))
  outs = [jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl))(q, k, v) for impl in ("cudnn", "xla")]
  return float(jnp.max(jnp.abs(outs[0].astype(jnp.float32) - outs[1].astype(jnp.float32))))


def scaled_config(args, impl: str):
  c = load_experiment(EXPERIMENT)
  c.data.seq_len = args.seq_len
  c.model.update(dict(num_layers=args.layers, d_model=args.d_model, d_ff=4 * args.d_model,
                      num_heads=args.d_model // 128, max_len=args.seq_len, dtype="bfloat16", attention_impl=impl))
  c.train.batch_size = args.batch
  return c


def time_step(args, impl: str) -> dict:
  config = scaled_config(args, impl)
  exp = build_experiment(config)
  state = exp.init_state()
  batch = jax.device_put(exp.dataset.train_batch(0, args.batch))
  compiled = exp.train_step.lower(state, batch).compile()
  flops = compiled.cost_analysis().get("flops", float("nan"))
  state, m = exp.train_step(state, batch)
  jax.block_until_ready(m)
  times, losses = [], []
  for step in range(1, args.steps + 1):
    batch = jax.device_put(exp.dataset.train_batch(step, args.batch))
    t0 = time.perf_counter()
    state, m = exp.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
    losses.append(float(m[0]))
  step_s = statistics.median(times)
  listed = flops_lib.datasheet_peak()
  return {"impl": impl, "step_ms": 1e3 * step_s, "tokens_per_s": args.batch * args.seq_len / step_s,
          "flops": flops, "model_flops": exp.model_flops,
          "mfu": exp.model_flops / step_s / listed[0] if listed else float("nan"),
          "loss_first": losses[0], "loss_last": losses[-1]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--train-steps", type=int, default=300)
  args = p.parse_args()
  device = jax.devices()[0]
  gpu = device.platform == "gpu"
  print(f"jax {jax.__version__}, {len(jax.devices())} x {device.device_kind} ({device.platform})", flush=True)
  if gpu:
    print(f"cudnn vs xla attention, bf16 (4, 1024, 8, 128) causal: max |diff| = {attention_difference():.4g}",
          flush=True)
  for impl in (("cudnn", "xla") if gpu else ("xla",)):
    r = time_step(args, impl)
    print(f"train step [{impl:5s}] layers={args.layers} d_model={args.d_model} seq={args.seq_len} "
          f"batch={args.batch}: {r['step_ms']:.2f} ms/step, {r['tokens_per_s']:.4g} tokens/s, "
          f"{r['model_flops'] / 1e12:.3f} model TFLOP/step ({r['flops'] / 1e12:.3f} by XLA), "
          f"MFU {100 * r['mfu']:.1f}%, "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} over {args.steps} steps", flush=True)
  config = load_experiment(EXPERIMENT)
  config.model.dtype = "bfloat16"
  config.model.attention_impl = "cudnn" if gpu else "xla"
  config.train.steps = args.train_steps
  config.train.warmup_steps = min(config.train.warmup_steps, args.train_steps // 10)  # short smoke runs too
  config.train.eval_every = args.train_steps
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    final = train_and_evaluate(config, workdir)
    print(f"text_transformer, bf16 + {config.model.attention_impl} attention, {args.train_steps} steps: "
          f"validation loss {final['loss']:.4f} nats/char in {time.perf_counter() - t0:.1f} s", flush=True)
  assert np.isfinite(final["loss"])


if __name__ == "__main__":
  main()
