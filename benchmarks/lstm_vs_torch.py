"""The text LSTM's train step in jaxmodels against the same model in PyTorch eager (`nn.LSTM`), in one process.

    python benchmarks/lstm_vs_torch.py [--steps 20] [--repeats 5] [--threads N] [--devices N]

jaxmodels: experiments/text_lstm.py as `train` builds it (embedding 256, 2 x LSTM
256, head to the vocabulary, batch 32, sequence 64, AdamW with global-norm clip
1.0), its compiled step timed on one device-resident batch. PyTorch: nn.Embedding,
nn.LSTM(256, 256, num_layers=2, batch_first=True), nn.Linear, token-mean
cross-entropy, clip_grad_norm_ and torch.optim.AdamW, on the same batch and the
same threads. The two are timed interleaved, `repeats` rounds of `steps` steps
each, so drift in the machine's load hits both alike; the medians and their
ratio are printed (ratio > 1: jaxmodels is faster). A third step, the same
jaxmodels model with the previous formulation (each time step's input
projection inside the scan, as flax's cells do it), is timed with them: the
effect of hoisting the projection out of the scan. `--threads 1` runs both
frameworks on one thread each (XLA's intra-op pool and torch's), steadier on
a shared machine. `--devices N` (N > 1) also times the jaxmodels step with its batch
split over N CPU devices (`--xla_force_host_platform_device_count=N`,
`parallel.strategy=dp`): each device runs its own serial time loop, so N cores can
work at once. PyTorch is a benchmark-only dependency (the `dev` extra),
never imported by the package.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1:][:1] == ["1"]:  # before jax starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
if "--devices" in sys.argv:  # before jax starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                             + sys.argv[sys.argv.index("--devices") + 1]).strip()

from jaxmodels.runtime import host  # pylint: disable=wrong-import-position

host.reexec_with_huge_pages()  # as the jaxmodels entry points run
host.cpu_only_platform()

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from jaxmodels.bench.timing import time_steps  # pylint: disable=wrong-import-position
from jaxmodels.config import load_experiment  # pylint: disable=wrong-import-position
from jaxmodels.models import recurrent  # pylint: disable=wrong-import-position
from jaxmodels.train.experiment import build_experiment  # pylint: disable=wrong-import-position


def stepwise_run_cell(cell, carry, x_BTF, reverse=False):
  """The previous formulation: the cell's own __call__ (input projection included) inside the scan."""
  carry, y_TBH = jax.lax.scan(cell, carry, jax.numpy.swapaxes(x_BTF, 0, 1), reverse=reverse)
  return carry, jax.numpy.swapaxes(y_TBH, 0, 1)


class TorchLSTM(torch.nn.Module):
  def __init__(self, vocab: int, hidden: int, layers: int):
    super().__init__()
    self.embed = torch.nn.Embedding(vocab, hidden)
    self.rnn = torch.nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
    self.head = torch.nn.Linear(hidden, vocab)

  def forward(self, tokens_BT):
    return self.head(self.rnn(self.embed(tokens_BT))[0])


def torch_step(config, vocab: int):
  t = config.train
  model = TorchLSTM(vocab, config.model.hidden_size, config.model.num_layers)
  opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), weight_decay=t.weight_decay)

  def step(x_BT, y_BT):
    opt.zero_grad(set_to_none=True)
    logits = model(x_BT)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y_BT.reshape(-1))
    loss.backward()
    if t.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss.item()  # a host read per step, as a PyTorch training loop does

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (1: XLA single-threaded too)")
  parser.add_argument("--devices", type=int, default=1, help="N > 1: also the step data-parallel over N CPU devices")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  config = load_experiment(os.path.join(ROOT, "experiments", "text_lstm.py"))
  exp = build_experiment(config)
  state, batch = exp.init_state(), exp.batch(0)
  old = build_experiment(config)
  old_state, hoisted = old.init_state(), recurrent.run_cell
  recurrent.run_cell = stepwise_run_cell  # while the previous formulation's step traces and compiles
  try:
    old_state, _ = old.train_step(old_state, batch)
  finally:
    recurrent.run_cell = hoisted
  x_BT, y_BT = (torch.from_numpy(np.asarray(batch[k]).astype(np.int64)) for k in ("x", "y"))
  step = torch_step(config, exp.dataset.num_outputs)
  for _ in range(2):
    step(x_BT, y_BT)
  split, split_times = None, []
  if args.devices > 1:
    config.parallel.strategy = "dp"
    split = build_experiment(config)
    split_state, split_batch = split.init_state(), split.batch(0)
    split_state, _ = split.train_step(split_state, split_batch)
  ours, theirs, previous = [], [], []
  for _ in range(args.repeats):
    if split is not None:
      s, split_state = time_steps(split.train_step, split_state, split_batch, args.steps)
      split_times.append(s)
    s, state = time_steps(exp.train_step, state, batch, args.steps)
    ours.append(s)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      step(x_BT, y_BT)
    theirs.append((time.perf_counter() - t0) / args.steps)
    s, old_state = time_steps(old.train_step, old_state, batch, args.steps)
    previous.append(s)
  jm, pt, pv = (1e3 * statistics.median(v) for v in (ours, theirs, previous))
  m = config.model
  print(f"text LSTM: embedding {m.hidden_size}, {m.num_layers} x LSTM {m.hidden_size}, vocabulary "
        f"{exp.dataset.num_outputs}, batch {config.train.batch_size}, sequence {config.data.seq_len}, AdamW")
  print(f"CPU threads: torch {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}; jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print(f"jaxmodels step: {jm:8.2f} ms (median of {args.repeats} x {args.steps}; per round "
        f"{', '.join(f'{1e3 * v:.1f}' for v in ours)})")
  print(f"PyTorch step:   {pt:8.2f} ms (per round {', '.join(f'{1e3 * v:.1f}' for v in theirs)})")
  print(f"previous:       {pv:8.2f} ms (input projection inside the scan; per round "
        f"{', '.join(f'{1e3 * v:.1f}' for v in previous)})")
  print(f"speed ratio (PyTorch time / jaxmodels time): {pt / jm:.2f}x; hoisting: previous / now {pv / jm:.2f}x")
  if split is not None:
    sp = 1e3 * statistics.median(split_times)
    print(f"data-parallel over {args.devices} CPU devices: {sp:8.2f} ms (per round "
          f"{', '.join(f'{1e3 * v:.1f}' for v in split_times)}); PyTorch / it {pt / sp:.2f}x, one device / it "
          f"{jm / sp:.2f}x")
  print(f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
