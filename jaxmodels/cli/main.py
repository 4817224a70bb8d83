"""The `jaxmodels` command line.

    jaxmodels train --config experiments/digits_cnn.py [--workdir DIR] [--config.train.steps=500 ...]
    jaxmodels sample --workdir runs/text_transformer --prompt "def " --length 200

Each command is a module of this package, named in COMMANDS and imported only
when that command runs; the docstring of its `run(prog, args)` is its `--help`.
Every experiment file also runs as a script with the same flags
(`python experiments/digits_cnn.py --workdir DIR`). Overrides use the
ml_collections form `--config.GROUP.KEY=VALUE` (`jaxmodels.config.apply_overrides`):
values are parsed by the type of the key they replace, and unknown keys are
errors. Bad config, data or flags print one line (`jaxmodels: error: ...`) and
exit with code 2; a write the storage refused (no space, no permission, a quota,
a bucket) prints one line naming the path and the cause and exits with code 1;
Ctrl-C before training started exits 130 (see jaxmodels.runtime.errors for all codes).
"""

import importlib
import os
import sys

from jaxmodels.runtime import compilation, hbm, host, storage
from jaxmodels.runtime.errors import Preempted, StorageError, UserError

__all__ = ["COMMANDS", "entry", "INTERRUPTED", "main", "plan_hint", "READERS", "run_experiment", "USAGE"]

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended

USAGE = """usage: jaxmodels COMMAND [FLAGS]

commands:
  train   train an experiment: jaxmodels train --config experiments/X.py [--workdir DIR] [--config.K=V ...]
  sample  generate text from a language-model run: jaxmodels sample --workdir DIR --prompt TEXT [--length N]
  prepare tokenize a text corpus into shards: jaxmodels prepare FILES... --out DIR [--train-tokenizer bpe]
  launch  a multi-process job on this machine: jaxmodels launch --processes N -- train --config ...
  export  parameters for research code: jaxmodels export --workdir DIR --out PATH
  import-hf  a Hugging Face GPT-2 or Llama directory as an export: jaxmodels import-hf DIR --out PATH
  export-hf  an export or run as a Hugging Face directory: jaxmodels export-hf --model PATH --out DIR
  compress  quantize or prune a run, export it, report: jaxmodels compress --workdir DIR --method ptq --out PATH
  eval    evaluate a run's checkpoint: jaxmodels eval --workdir DIR [--step N] [--config.data.path=other.npz]
  plot    training curves: jaxmodels plot RUN [RUN ...] --metric loss --out curves.png [--confusion]
  bench   compile, step and data benchmarks: jaxmodels bench compile|step|data --config experiments/X.py ...
  plan    the settings that fit a TPU slice, fastest first: jaxmodels plan --config X.py --topology v5e:2x4 --try ...

Run `jaxmodels COMMAND --help` for a command's flags."""

COMMANDS = {"train": "train", "sample": "sample", "prepare": "prepare", "launch": "launch", "export": "export",
            "eval": "eval", "plot": "plot", "bench": "bench", "import-hf": "import_hf", "export-hf": "export_hf",
            "compress": "compress", "plan": "plan"}  # command -> its module in jaxmodels.cli


# Commands that read a run's checkpoints and write no checkpoint: they end without interpreter finalization
# (storage.end_process), where TensorStore's reports of reads Orbax abandoned would print raw tracebacks.
READERS = ("eval", "export", "sample", "compress", "export-hf")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  command, args = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f"jaxmodels: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  run = importlib.import_module(f"jaxmodels.cli.{COMMANDS[command]}").run
  if any(a in ("-h", "--help", "--helpfull") for a in args):
    print(run.__doc__ or USAGE)
    return 0
  if command in READERS:  # a checkpoint it reads may be deleted mid-read by a run saving beside it
    storage.quiet_late_reports()
    storage.abandoned_io()
    compilation.enable_persistent_cache()  # a second eval or sample of a run loads its programs instead of compiling
  try:
    return run(f"jaxmodels {command}", args)
  except UserError as e:  # exit 2; 1 for a refused write, 3 for a non-finite loss
    print(f"jaxmodels: error: {e}", file=sys.stderr)
    return e.exit_code
  except Preempted as e:  # a signal stopped training after a synchronous save: rerun to resume
    return e.exit_code
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, RuntimeError) and hbm.is_oom(e):  # XLA's device out-of-memory error (a JaxRuntimeError)
      print(f"jaxmodels: error: {hbm.explain(e, plan_hint(args))}", file=sys.stderr)
      return UserError.exit_code
    failure = storage.write_failure(e, "the storage", only_writes=True)  # a write no code turned into one line
    if failure is None:
      raise
    print(f"jaxmodels: error: {failure}", file=sys.stderr)
    return StorageError.exit_code


def plan_hint(args: list[str]) -> str:
  """The `jaxmodels plan` command line for the experiment (`--config PATH`) and overrides of a command's `args`."""
  import jax  # pylint: disable=import-outside-toplevel  # loaded already: XLA raised the error this explains

  experiment = [a for i, a in enumerate(args) if a.startswith("--config") or (i and args[i - 1] == "--config")]
  if not any(a == "--config" or a.startswith("--config=") for a in experiment):
    experiment = ["--config", "experiments/X.py", *experiment]
  topology = ["--topology", "SLICE (e.g. v5e:2x4)"] if jax.default_backend() == "tpu" else []
  return " ".join(["jaxmodels plan", *experiment, *topology,
                   "--try parallel.strategy=dp,fsdp --try model.remat=none,dots,full",
                   "--try train.grad_accum_steps=1,2,4,8"])


def _run_quietly(argv: list[str] | None) -> None:
  """Runs `main(argv)` and exits with its code, turning the faults of the terminal around it into exit codes:
  Ctrl-C outside training (during imports, say) is one line and 130; a closed stdout (`jaxmodels ... | head`)
  ends quietly (Python's recommended handling of SIGPIPE: point stdout at devnull, so the exit's flush does not
  raise again)."""
  try:
    code = main(argv)
    sys.stdout.flush()
  except KeyboardInterrupt:
    print("jaxmodels: interrupted", file=sys.stderr)
    code = INTERRUPTED
  except BrokenPipeError:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    code = 1
  storage.end_process(code)


def entry() -> None:
  """The `jaxmodels` console script and `python -m jaxmodels`."""
  host.reexec_with_huge_pages()
  host.cpu_only_platform()
  _run_quietly(None)


def run_experiment(path: str) -> None:
  """Entry point of an experiment file run as a script: `jaxmodels train --config <that file>`."""
  host.reexec_with_huge_pages()
  host.cpu_only_platform()
  _run_quietly(["jaxmodels", "train", "--config", path, *sys.argv[1:]])
