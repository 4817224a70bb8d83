"""Per-device activation memory of long sequences under context parallelism, read from the compiled train step.

    python benchmarks/context_memory.py [--seq-len 4096] [--batch 2]

Compiles (never runs) the text transformer's train step (1 layer, d_model 16, one head: attention's scores are
the activations that grow with the square of the length) on 8 simulated CPU devices, on one device and on
meshes that split each sequence over a `context` axis, and prints per device XLA's temporary bytes
(`memory_analysis`, the activations and their gradients), its FLOPs, and the collective permutes of the ring
attention. Each mesh uses the devices it names; with `--batch 2`, `data=2` stops at one whole sequence per
device, and only `context` goes further.
"""

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("", "data=2", "data=2,context=2", "data=2,context=4")  # each on as many devices as it names


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel

  from jaxmodels.bench.timing import abstract_args  # pylint: disable=import-outside-toplevel
  from jaxmodels.config import load_experiment  # pylint: disable=import-outside-toplevel
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel

  print(f"text transformer: 1 layer, d_model 16, 1 head, batch {args.batch} x {args.seq_len} tokens; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"{'mesh':<20} {'temp MiB/device':>15} {'vs one device':>13} {'GFLOPs/device':>13} {'permutes':>8}")
  single = None
  for mesh in MESHES:
    config = load_experiment(os.path.join(ROOT, "experiments", "text_transformer.py"))
    config.data.update(dict(seq_len=args.seq_len, tokenizer="byte"))
    config.model.update(dict(num_layers=1, num_heads=1, d_model=16, d_ff=32, max_len=args.seq_len, remat="none"))
    config.train.update(dict(batch_size=args.batch, eval_batch_size=args.batch))
    config.parallel.update(dict(strategy="dp" if mesh else "single", mesh=mesh))
    devices = jax.devices()[:math.prod(int(part.split("=")[1]) for part in mesh.split(",") if part)]
    exp = build_experiment(config, devices=devices if mesh else None)
    compiled = exp.train_step.lower(*abstract_args(exp)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    single = single or temp
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    permutes = compiled.as_text().count(" collective-permute(") + compiled.as_text().count(" collective-permute-start(")
    print(f"{mesh or 'one device':<20} {temp / 2**20:>15.2f} {temp / single:>13.3f} {flops / 1e9:>13.2f} "
          f"{permutes:>8}")


if __name__ == "__main__":
  main()
