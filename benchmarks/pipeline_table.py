"""What pipeline parallelism (the `stage` mesh axis) holds and moves per device, read from the compiled train step.

    python benchmarks/pipeline_table.py [--devices 8] [--layers 8] [--d-model 256] [--batch 64] [--seq-len 64]

Compiles (never runs) the text transformer's train step (scanned layers, d_ff 4 x d_model) under dp, fsdp and
stage=4 x data=2 (4 and 8 micro-batches, 1 and 2 repeats of the circular schedule) on simulated CPU devices.
Prints per device: the parameter bytes the compiled step takes (its input shardings' shard shapes), the
state it takes (XLA's argument bytes: parameters, Adam's moments, the batch), temporaries, the optimized
HLO's collective permutes and all-gathers, and the schedule's bubble (stages - 1) / (microbatches x repeats +
stages - 1).
"""

import math
import re

from _compiled_table import compile_step, describe, parse_args, transformer_config

POINTS = (("dp", "", 0, 1), ("fsdp", "", 0, 1), ("dp", "stage=4,data=2", 4, 1), ("dp", "stage=4,data=2", 8, 2))


def main():
  args = parse_args(__doc__, layers=8, d_model=256, batch=64, seq_len=64)
  import jax  # pylint: disable=import-outside-toplevel

  from jaxmodels.bench.timing import pipeline_fields  # pylint: disable=import-outside-toplevel

  print(f"{describe(f'{args.layers} scanned layers', args)}; {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}")
  print(f"{'setting':<34} {'param MiB/device':>16} {'args MiB/device':>15} {'temp MiB/device':>15} "
        f"{'permutes':>8} {'all-gathers':>11} {'bubble':>6}")
  for strategy, mesh, microbatches, repeats in POINTS:
    config = transformer_config(args, args.layers)
    config.parallel.update(dict(strategy=strategy, mesh=mesh, pipeline_microbatches=microbatches,
                                pipeline_repeats=repeats))
    exp, (state, _), compiled = compile_step(config)
    shardings = compiled.input_shardings[0][0].params
    param_bytes = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                      for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings)))
    text, memory = compiled.as_text(), compiled.memory_analysis()
    permutes = len(re.findall(r"\scollective-permute(?:-start)?\(", text))
    gathers = len(re.findall(r"\sall-gather(?:-start)?\(", text))
    bubble = pipeline_fields(config, exp).get("pipeline_bubble")
    label = f"{strategy} {mesh}".strip() + (f" microbatches={microbatches} repeats={repeats}" if mesh else "")
    print(f"{label:<34} {param_bytes / 2**20:>16.2f} {memory.argument_size_in_bytes / 2**20:>15.2f} "
          f"{memory.temp_size_in_bytes / 2**20:>15.2f} {permutes:>8} {gathers:>11} "
          f"{'-' if bubble is None else f'{bubble:.3f}':>6}")


if __name__ == "__main__":
  main()
