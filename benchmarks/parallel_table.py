"""What each parallelism strategy computes per device, read from the compiled train step.

    python benchmarks/parallel_table.py [--devices 8] [--batch 256] [--seq-len 64] [--d-model 256]

Compiles (never runs) the text transformer's train step (2 layers, d_ff 4 x
d_model, the layers unrolled so that XLA's cost analysis counts each one: it
counts a scan body once) under single / dp / fsdp / tp (data=2,tensor=4), and
dp with 2 micro-batches (whose FLOPs count one micro-batch, for the same
reason), on simulated CPU devices. Prints per device: XLA's FLOPs, temporary
bytes (`memory_analysis`), the largest matmul output, and the optimized HLO's
all-gathers with the largest one. A strategy that gives each device its share
of the batch has about 1/N of single's FLOPs.
"""

import math
import re

from _compiled_table import compile_step, describe, parse_args, transformer_config

POINTS = (("single", "", 1), ("dp", "", 1), ("fsdp", "", 1), ("tp", "data=2,tensor=4", 1), ("dp", "", 2))
PRODUCT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+(?:dot|convolution)\(")
ALL_GATHER = re.compile(r"=\s*(\w+\[[\d,]*\])\S*\s+all-gather(?:-start)?\(")


def main():
  args = parse_args(__doc__, batch=256, seq_len=64, d_model=256)
  import jax  # pylint: disable=import-outside-toplevel

  print(f"{describe('2 layers', args)}, layers unrolled; {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}")
  print(f"{'strategy':<24} {'GFLOPs/device':>13} {'vs single':>9} {'temp MiB/device':>15} "
        f"{'largest matmul':>15} {'all-gathers':>11}  largest all-gather")
  single_flops = None
  for strategy, mesh, accum in POINTS:
    config = transformer_config(args, 2, scan_layers=False)
    config.train.grad_accum_steps = accum
    config.parallel.update(dict(strategy=strategy, mesh=mesh))
    compiled = compile_step(config)[2]
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    single_flops = single_flops or flops
    largest = max((tuple(int(d) for d in s.split(",") if d) for s in PRODUCT.findall(text)), key=math.prod)
    gathers = ALL_GATHER.findall(text)
    biggest = max(gathers, key=lambda s: math.prod(int(d) for d in re.findall(r"\d+", s)), default="-")
    label = f"{strategy} {mesh}".strip() + (f" accum={accum}" if accum > 1 else "")
    print(f"{label:<24} {flops / 1e9:>13.2f} {flops / single_flops:>9.3f} "
          f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:>15.2f} {str(list(largest)):>15} "
          f"{len(gathers):>11}  {biggest}")


if __name__ == "__main__":
  main()
