"""What benchmarks/parallel_table.py and benchmarks/pipeline_table.py share: their flags, the simulated CPU devices
(XLA_FLAGS, set before JAX starts), the text transformer they compile, and the first words of their header line."""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(doc: str, **sizes: int) -> argparse.Namespace:
  """`--devices` (default 8) and one integer flag per `sizes` item (`seq_len=64`: `--seq-len`, default 64), in
  that order; then XLA_FLAGS for that many simulated devices (JAX_PLATFORMS cpu unless set) and the repository on
  sys.path. Call it before anything imports JAX."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  for name, default in {"devices": 8, **sizes}.items():
    parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  return args


def transformer_config(args: argparse.Namespace, num_layers: int, **model):
  """experiments/text_transformer.py with `num_layers` layers, args.d_model (d_ff 4 x d_model), args.seq_len
  tokens a row and args.batch rows (train and eval); `model`: more model.* keys."""
  from jaxmodels.config import load_experiment  # pylint: disable=import-outside-toplevel

  config = load_experiment(os.path.join(ROOT, "experiments", "text_transformer.py"))
  config.data.seq_len = args.seq_len
  config.model.update(dict(num_layers=num_layers, d_model=args.d_model, d_ff=4 * args.d_model,
                           max_len=args.seq_len, **model))
  config.train.update(dict(batch_size=args.batch, eval_batch_size=args.batch))
  return config


def describe(layers: str, args: argparse.Namespace) -> str:
  """'text transformer: LAYERS, d_model D, d_ff 4D, batch B x T tokens': the header line's start."""
  return (f"text transformer: {layers}, d_model {args.d_model}, d_ff {4 * args.d_model}, batch {args.batch} x "
          f"{args.seq_len} tokens")


def compile_step(config):
  """(experiment, its abstract (state, batch), the train step compiled for them: never run)."""
  from jaxmodels.bench.timing import abstract_args  # pylint: disable=import-outside-toplevel
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel

  exp = build_experiment(config)
  inputs = abstract_args(exp)
  return exp, inputs, exp.train_step.lower(*inputs).compile()
