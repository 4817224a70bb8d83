"""The compression table of docs/compression.md: accuracy (or validation loss), size on disk and inference time of each way of
compressing digits_cnn and text_transformer, measured on this machine (short CPU runs).

    python benchmarks/compression_table.py [--experiments digits_cnn,text_transformer] [--rows ptq8,qat8]
        [--steps 600] [--finetune-steps 150] [--workdir /tmp/compression_table]

Rows (each a `jaxmodels` CLI subprocess, then an export measured in this process):
  baseline   train the experiment; `jaxmodels export`
  ptq8       `jaxmodels compress --method ptq --bits 8` of the baseline (weights only)
  ptq8-static, ptq8-dynamic
             the same with every dense and conv input quantized too (`--activations static`: one scale per tensor
             calibrated on 8 training batches; `--activations dynamic`: a scale per row, on the fly)
  qat8       train with train.quantization.bits=8, then `compress --method ptq --bits 8` (int8 on disk)
  prune50, prune90, prune2:4
             one-shot magnitude pruning of the baseline (checkpoint.restore_from, start_step = end_step = 0;
             unstructured global at 50% / 90%, or 2:4) fine-tuned for --finetune-steps; `jaxmodels export`
  student    the half-width student trained alone, on the same budget: what `distill` is measured against
  distill    the half-width student trained on the baseline as teacher (train.distill.*, at its default temperature
             and alpha); `jaxmodels export`
A row whose command fails is printed with its error and the table goes on. Columns: accuracy (classifiers) or
validation loss in nats (language models) of the exported model on the eval split, bytes of its exported
parameters on disk, and the median time of one forward pass over an eval batch (train.eval_batch_size rows).
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("baseline", "ptq8", "ptq8-static", "ptq8-dynamic", "qat8", "prune50", "prune90", "prune2:4", "student",
        "distill")
# Half the widths of each experiment: the distilled student.
HALF = {"digits_cnn": ["--config.model.features=(16,32)", "--config.model.head_sizes=(64,)"],
        "text_transformer": ["--config.model.d_model=64", "--config.model.d_ff=256"]}
# (sparsity, pattern, scope): unstructured ranks all kernels together; N:M prunes within each group of M.
PRUNING = {"prune50": ("0.5", "unstructured", "global"), "prune90": ("0.9", "unstructured", "global"),
           "prune2:4": ("0.5", "2:4", "layer")}


def jaxmodels(*args) -> None:
  """Runs `python -m jaxmodels ARGS` from the repository root; raises RuntimeError with its last error line."""
  r = subprocess.run([sys.executable, "-m", "jaxmodels", *args], cwd=ROOT, capture_output=True, text=True,
                     check=False)
  if r.returncode:
    lines = (r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"]
    raise RuntimeError(lines[-1])


def make_row(row: str, name: str, work: str, steps: int, finetune: int) -> str:
  """Trains / compresses one row; returns the export directory to measure."""
  config = os.path.join(ROOT, "experiments", f"{name}.py")
  train = lambda workdir, *extra: jaxmodels("train", "--config", config, "--workdir", workdir, *extra)
  base, out = os.path.join(work, "baseline"), os.path.join(work, f"{row}-export")
  if row == "baseline":
    train(base, f"--config.train.steps={steps}")
    jaxmodels("export", "--workdir", base, "--out", out)
  elif row.startswith("ptq8"):
    activations = ["--activations", row.split("-")[1]] if "-" in row else []
    jaxmodels("compress", "--workdir", base, "--method", "ptq", "--bits", "8", *activations, "--out", out)
  elif row == "qat8":
    run = os.path.join(work, row)
    train(run, f"--config.train.steps={steps}", "--config.train.quantization.bits=8")
    jaxmodels("compress", "--workdir", run, "--method", "ptq", "--bits", "8", "--out", out)
  elif row in PRUNING:
    sparsity, pattern, scope = PRUNING[row]
    run = os.path.join(work, row.replace(":", "_"))
    train(run, f"--config.train.steps={finetune}", f"--config.checkpoint.restore_from={base}",
          f"--config.train.pruning.sparsity={sparsity}", f"--config.train.pruning.pattern={pattern}",
          f"--config.train.pruning.scope={scope}", "--config.train.pruning.start_step=0",
          "--config.train.pruning.end_step=0")
    jaxmodels("export", "--workdir", run, "--out", out)
  elif row in ("student", "distill"):
    run = os.path.join(work, row)
    teacher = [f"--config.train.distill.teacher={base}"] if row == "distill" else []
    train(run, f"--config.train.steps={steps}", *teacher, *HALF[name])
    jaxmodels("export", "--workdir", run, "--out", out)
  return out


def measure(export_dir: str) -> tuple[str, int, float]:
  """(quality, bytes on disk, inference ms) of an export."""
  import jaxmodels as jm  # pylint: disable=import-outside-toplevel
  from jaxmodels.tools import compress  # pylint: disable=import-outside-toplevel
  exp = compress.evaluation(export_dir)
  metrics, seconds = compress.measure(exp, jm.load_model(export_dir), repeats=7)
  quality = f"loss {metrics['loss']:.3f}" if exp.dataset.task == "lm" else f"acc {metrics['accuracy']:.4f}"
  return quality, compress.disk_bytes(os.path.join(export_dir, "params")), 1e3 * seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experiments", default="digits_cnn,text_transformer")
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--steps", type=int, default=600, help="training steps of baseline, QAT and student runs")
  parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps after one-shot pruning")
  parser.add_argument("--workdir", default="/tmp/compression_table")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  rows = args.rows.split(",")
  print("| experiment | method | accuracy / val loss | bytes on disk | inference ms / batch |")
  print("|---|---|---|---|---|")
  for name in args.experiments.split(","):
    work = os.path.join(args.workdir, name)
    if os.path.exists(work):
      raise SystemExit(f"{work} exists: remove it or pass another --workdir")
    for row in ("baseline",) + tuple(r for r in rows if r != "baseline"):  # every row compresses the baseline
      try:
        quality, size, ms = measure(make_row(row, name, work, args.steps, args.finetune_steps))
        print(f"| {name} | {row} | {quality} | {size:,} | {ms:.2f} |", flush=True)
      except RuntimeError as e:
        print(f"| {name} | {row} | failed: {e} | | |", flush=True)


if __name__ == "__main__":
  main()
