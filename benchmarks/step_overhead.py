"""Host overhead of the jaxmodels train step against a hand-written pure JAX + Optax step.

    python benchmarks/step_overhead.py [--steps 2000] [--repeats 11]

Both steps train the same tiny MLP (64 -> 128 -> 10, ReLU, batch 32, Adam) on
the digits, on the same device-resident batch in the same process, and return
the same things: the new state with its step counter, and the loss, accuracy
and gradient norm that the jaxmodels step logs (`jaxmodels.bench.timing.pure_jax_mlp_step`
is the hand-written one). The per-step time is then almost all host work
(Python, pytree flattening, dispatch), and the ratio is the framework's
overhead; the target is <= 1.2x. `jaxmodels bench step --compare-pure-jax`
runs the same comparison for any MLP experiment.
"""

import argparse
import os

import jax

from jaxmodels.bench.timing import compare_pure_jax
from jaxmodels.config import load_experiment
from jaxmodels.train.experiment import build_experiment

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                          "digits_mlp.py")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=11)
  args = parser.parse_args()
  config = load_experiment(EXPERIMENT)
  config.model.update(dict(hidden_sizes=(128,), dropout=0.0))
  config.train.update(dict(batch_size=32, optimizer="adam", schedule="constant", warmup_steps=0))
  r = compare_pure_jax(build_experiment(config), steps=args.steps, repeats=args.repeats)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"jaxmodels train step: {r['jaxmodels_us']:8.1f} us/step (median of {args.repeats} x {args.steps})")
  print(f"pure JAX + Optax:     {r['pure_jax_us']:8.1f} us/step")
  print(f"ratio:                {r['overhead_ratio']:8.2f}x")


if __name__ == "__main__":
  main()
