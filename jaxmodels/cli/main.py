"""The `jaxmodels` command line.

    jaxmodels train --config experiments/digits_cnn.py [--workdir DIR] [--config.train.steps=500 ...]
    jaxmodels sample --workdir runs/text_transformer --prompt "def " --length 200

Every experiment file also runs as a script with the same flags
(`python experiments/digits_cnn.py --workdir DIR`). Overrides use the
ml_collections/absl form `--config.GROUP.KEY=VALUE`; values are parsed by the
type of the key they replace, and unknown keys are errors. Bad config, data or
flags print one line (`jaxmodels: error: ...`) and exit with code 2.
"""

import sys

from absl import flags

from jaxmodels.config.experiments import parse_experiment_flags, pop_config_path
from jaxmodels.runtime import host
from jaxmodels.runtime.errors import Preempted, UserError

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
  bench   compile and step benchmarks: jaxmodels bench compile|step --config experiments/X.py ...
  plan    the settings that fit a TPU slice, fastest first: jaxmodels plan --config X.py --topology v5e:2x4 --try ...

Run `jaxmodels COMMAND --help` for a command's flags."""


def _parse_args(prog: str, args: list[str], arguments: list[tuple]):
  """Parses a command's flags, each `(name, kwargs)`; any problem (missing, unknown, mistyped) is a UserError."""
  import argparse  # pylint: disable=import-outside-toplevel

  class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; the CLI's way is one line, exit 2
      raise UserError(f"{message} (see {prog} --help)")

  parser = Parser(prog=prog, add_help=False, exit_on_error=False)
  for name, kwargs in arguments:
    parser.add_argument(name, **kwargs)
  try:
    return parser.parse_args(args)
  except argparse.ArgumentError as e:
    raise UserError(f"{e} (see {prog} --help)") from None


def cmd_train(prog: str, args: list[str]) -> int:
  """usage: jaxmodels train --config experiments/X.py [--workdir DIR] [--config.GROUP.KEY=VALUE ...]

Trains the experiment into DIR (default runs/<experiment name>; a local path or
gs://bucket/dir): config.json, metrics.jsonl and checkpoints/. A DIR that holds a
checkpoint resumes from it; DIR/LOCK keeps a second run out while one runs.
Every key of jaxmodels/config.py can be overridden, e.g. --config.train.steps=500.
"""
  from jaxmodels import parallel  # pylint: disable=import-outside-toplevel
  from jaxmodels.runtime.compilation import enable_persistent_cache  # pylint: disable=import-outside-toplevel
  from jaxmodels.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config, fv = parse_experiment_flags(prog, args)
  parallel.initialize(config.parallel)  # joins a multi-process job, if this is one, before any backend use
  enable_persistent_cache()
  train_and_evaluate(config, fv.workdir)
  return 0


def cmd_launch(prog: str, args: list[str]) -> int:
  """usage: jaxmodels launch --processes N [--devices-per-process D] [--port P] -- COMMAND [ARGS ...]

Simulates a multi-host job on this machine: N CPU processes, each with D CPU
devices, joined through jax.distributed over 127.0.0.1 (gloo collectives), each
running `jaxmodels COMMAND ARGS`. Output lines carry a [i] process prefix. If
one process fails, the others are stopped and the launcher exits non-zero.
Example: jaxmodels launch --processes 2 --devices-per-process 2 -- train
  --config experiments/digits_cnn.py --config.parallel.strategy=dp
"""
  from jaxmodels.parallel.launch import launch  # pylint: disable=import-outside-toplevel

  if "--" not in args:
    raise UserError("launch needs `--` before the command to run, e.g. -- train --config ...")
  split = args.index("--")
  a = _parse_args(prog, args[:split], [("--processes", dict(type=int, required=True)),
                                       ("--devices-per-process", dict(type=int, default=1)),
                                       ("--port", dict(type=int, default=0))])
  if a.processes < 1 or a.devices_per_process < 1 or not args[split + 1:]:
    raise UserError("--processes and --devices-per-process must be positive, and a command must follow --")
  return launch(a.processes, args[split + 1:], a.devices_per_process, a.port or None)


def cmd_sample(prog: str, args: list[str]) -> int:
  """usage: jaxmodels sample --workdir DIR --prompt TEXT [--length N] [--temperature T] [--top-k K] [--seed S]
                        [--benchmark]

Prints the prompt and N generated tokens from the newest checkpoint of a
language-model run (data.source=text or tokens), encoded and decoded with the
run's tokenizer (its vocab.json). Temperature 0 decodes greedily; top-k 0
samples from the whole vocabulary. --benchmark prints the prefill (prompt
tokens/s) and decode (new tokens/s) throughput at batch 1 instead: medians of
5 timed calls after a compiling one.
"""
  import math  # pylint: disable=import-outside-toplevel

  from jaxmodels.tools.sample import benchmark, generate, load_language_model  # pylint: disable=import-outside-toplevel

  a = _parse_args(prog, args, [("--workdir", dict(required=True)), ("--prompt", dict(required=True)),
                               ("--length", dict(type=int, default=200)),
                               ("--temperature", dict(type=float, default=0.8)),
                               ("--top-k", dict(type=int, default=0)), ("--seed", dict(type=int, default=0)),
                               ("--benchmark", dict(action="store_true"))])
  if not a.prompt:
    raise UserError("--prompt must not be empty")
  if a.length <= 0 or not (math.isfinite(a.temperature) and a.temperature >= 0) or a.top_k < 0:
    raise UserError("--length must be positive, --temperature a finite number >= 0, --top-k non-negative")
  model, vocab = load_language_model(a.workdir)
  if a.top_k > vocab.size:
    raise UserError(f"--top-k {a.top_k} exceeds the run's vocabulary of {vocab.size} tokens")
  if a.benchmark:
    r = benchmark(model, vocab.encode(a.prompt), a.length, temperature=a.temperature, top_k=a.top_k)
    print(f"prefill: {r['prefill_tokens_per_sec']:.4g} tokens/s ({len(vocab.encode(a.prompt))} prompt tokens in "
          f"{1e3 * r['prefill_s']:.2f} ms)\ndecode: {r['decode_tokens_per_sec']:.4g} tokens/s ({a.length} tokens in "
          f"{1e3 * r['decode_s']:.1f} ms), batch 1, median of 5")
    return 0
  tokens = generate(model, vocab.encode(a.prompt), a.length, temperature=a.temperature, top_k=a.top_k,
                    seed=a.seed)
  print(a.prompt + vocab.decode(tokens))
  return 0


def cmd_prepare(prog: str, args: list[str]) -> int:
  """usage: jaxmodels prepare INPUT [INPUT ...] --out DIR [--field text]
             [--tokenizer char|byte|FILE | --train-tokenizer bpe --vocab-size N]
             [--val-fraction F] [--workers W] [--shard-tokens T]

Tokenizes a corpus into DIR for data.source=tokens: flat uint16 (or uint32)
token shards and index.json. INPUTs are text files (one document each), .jsonl
files (one document per line, its --field), directories or globs (quote them).
Documents are separated by the tokenizer's end-of-text token.
  --tokenizer: byte (default) or char, or a local tokenizer file: a Hugging Face
    tokenizer.json, a SentencePiece .model or a tiktoken .tiktoken file
  --train-tokenizer bpe: train a byte-level BPE of --vocab-size (default 8192)
    ids on the corpus first, saved as DIR/tokenizer.json
  --val-fraction: the last share of the tokens validates (default 0.005)
  --workers: tokenizing processes (default: the CPU count; 0: this process)
  --shard-tokens: ids per shard file (default 2**28)
"""
  from jaxmodels.data.prepare import SHARD_TOKENS, prepare  # pylint: disable=import-outside-toplevel

  a = _parse_args(prog, args, [("inputs", dict(nargs="+")), ("--out", dict(required=True)),
                               ("--field", dict(default="text")), ("--tokenizer", dict(default="byte")),
                               ("--train-tokenizer", dict(default="")), ("--vocab-size", dict(type=int, default=8192)),
                               ("--val-fraction", dict(type=float, default=0.005)),
                               ("--workers", dict(type=int, default=None)),
                               ("--shard-tokens", dict(type=int, default=SHARD_TOKENS))])
  prepare(a.inputs, a.out, tokenizer=a.tokenizer, train_tokenizer=a.train_tokenizer, vocab_size=a.vocab_size,
          field=a.field, val_fraction=a.val_fraction, workers=a.workers, shard_tokens=a.shard_tokens)
  return 0


def cmd_export(prog: str, args: list[str]) -> int:
  """usage: jaxmodels export --workdir DIR --out PATH

Writes the parameters of DIR's newest checkpoint (no optimizer state) to PATH,
with the config and model shape needed to rebuild the module; research code
loads them with jaxmodels.load_model(PATH) or jaxmodels.load_params(PATH).
"""
  from jaxmodels.runs.export import export  # pylint: disable=import-outside-toplevel

  a = _parse_args(prog, args, [("--workdir", dict(required=True)), ("--out", dict(required=True))])
  print(f"exported {a.workdir} to {export(a.workdir, a.out)}")
  return 0


def cmd_import_hf(prog: str, args: list[str]) -> int:
  """usage: jaxmodels import-hf DIR --out PATH

Reads a local Hugging Face GPT-2 or Llama-family directory (config.json +
*.safetensors; nothing is downloaded) and writes its weights to PATH in the
format `jaxmodels export` writes: jaxmodels.load_model(PATH) returns the model.
"""
  from jaxmodels.hf.convert import import_hf  # pylint: disable=import-outside-toplevel
  a = _parse_args(prog, args, [("dir", {}), ("--out", dict(required=True))])
  print(f"imported {a.dir} to {import_hf(a.dir, a.out)}")
  return 0


def cmd_export_hf(prog: str, args: list[str]) -> int:
  """usage: jaxmodels export-hf --model PATH --out DIR

Writes the Transformer language model at PATH (an export, an import-hf output or
a training workdir) as a Hugging Face directory (config.json + model.safetensors)
of the GPT-2 or Llama family, whichever layout the model has.
"""
  from jaxmodels.hf.convert import export_hf  # pylint: disable=import-outside-toplevel
  a = _parse_args(prog, args, [("--model", dict(required=True)), ("--out", dict(required=True))])
  print(f"exported {a.model} to {export_hf(a.model, a.out)}")
  return 0


def cmd_eval(prog: str, args: list[str]) -> int:
  """usage: jaxmodels eval --workdir DIR [--step N] [--config.data.KEY=VALUE ...]

Evaluates checkpoint N (default: the newest) of the run in DIR on its eval split,
or on other data given by --config.data.* overrides (e.g. --config.data.path=other.npz,
arrays of the same shapes), prints the metrics and writes DIR/eval_N.json.
"""
  from jaxmodels.tools.evaluate import evaluate_run  # pylint: disable=import-outside-toplevel

  overrides = [x for x in args if x.startswith("--config.")]
  a = _parse_args(prog, [x for x in args if not x.startswith("--config.")],
                  [("--workdir", dict(required=True)), ("--step", dict(type=int, default=None))])
  step, metrics = evaluate_run(a.workdir, a.step, tuple(overrides))
  shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
  print(f"eval: {'export' if step is None else f'step {step}'} {shown}")
  return 0


def cmd_compress(prog: str, args: list[str]) -> int:
  """usage: jaxmodels compress --workdir DIR --method ptq [--bits 8|4] [--activations [static|dynamic]]
                            [--calibration-batches N] --out PATH
       jaxmodels compress --workdir DIR --method prune (--sparsity S [--scope layer|global] | --pattern N:M) --out PATH

Compresses the newest checkpoint of the run in DIR and writes it to PATH (empty or new; local or gs://) as an
export: jaxmodels.load_model(PATH) returns the compressed module, and `eval` and `sample` take PATH as --workdir.
Prints and writes PATH/compression.json: parameters, non-zero parameters, bytes on disk, eval metrics and
inference time per eval batch, before and after.
  --method ptq: post-training quantization (qwix) of the weights to --bits integers (default: the run's
    train.quantization.bits if it trained quantization-aware, else 8), per output channel;
    --activations (static) also quantizes the input of every dense and conv layer (to --bits integers; int8 in
    a convolution), with one scale per tensor (per layer of a stack) fixed by a calibration pass: the largest
    |input| over the run's first --calibration-batches training batches (default 8), as the run saw them.
    --activations dynamic computes a scale per row on the fly instead (no calibration). Without --activations
    convolutions still quantize their inputs, dynamically (qwix's int8 convolution takes two int8 operands).
    Quantized inputs (--activations, a convolution) of a float16 run are refused: qwix rescales their int32
    products in float16, which overflows.
  --method prune: one-shot magnitude pruning; embeddings, norm scales and biases are kept. --sparsity S in (0, 1)
    zeroes that fraction of the smallest weights of each kernel (--scope layer, the default) or of all kernels
    ranked together (--scope global); --pattern N:M keeps the N largest of every M consecutive inputs of a kernel
    (sparsity 1 - N/M). The zeros are stored dense. To fine-tune after it, train with
    --config.checkpoint.restore_from=DIR and the same train.pruning.* (start_step = end_step = 0).
"""
  from jaxmodels.optim.pruning import SCOPES  # pylint: disable=import-outside-toplevel
  from jaxmodels.tools.compress import ACTIVATIONS, METHODS, compress  # pylint: disable=import-outside-toplevel

  a = _parse_args(prog, args, [("--workdir", dict(required=True)), ("--method", dict(required=True, choices=METHODS)),
                               ("--bits", dict(type=int)),
                               ("--activations", dict(nargs="?", const="static", choices=ACTIVATIONS)),
                               ("--calibration-batches", dict(type=int)),
                               ("--sparsity", dict(type=float)), ("--pattern", dict()),
                               ("--scope", dict(choices=SCOPES)), ("--out", dict(required=True))])
  compress(a.workdir, a.method, a.out, bits=a.bits, activations=a.activations,
           calibration_batches=a.calibration_batches, sparsity=a.sparsity,
           pattern=a.pattern, scope=a.scope)
  print(f"wrote {a.out}")
  return 0


def cmd_plot(prog: str, args: list[str]) -> int:
  """usage: jaxmodels plot RUN [RUN ...] [--metric loss] --out curves.png [--confusion]

Draws the train and eval curves of one metric (any name in the runs' metrics.jsonl:
loss, accuracy, f1_macro, r2, ...) against the step for each RUN into a PNG;
--confusion adds each run's newest confusion matrix (classifiers).
"""
  from jaxmodels.tools.plot import plot_runs  # pylint: disable=import-outside-toplevel

  a = _parse_args(prog, args, [("runs", dict(nargs="+")), ("--metric", dict(default="loss")),
                               ("--out", dict(required=True)), ("--confusion", dict(action="store_true"))])
  print(f"wrote {plot_runs(a.runs, a.metric, a.out, a.confusion)}")
  return 0


def cmd_bench(prog: str, args: list[str]) -> int:
  """usage: jaxmodels bench compile --config experiments/X.py [--config.K=V ...]
             [--sweep model.num_layers=1,2,4,8 --sweep model.scan_layers=true,false ...] [--repeat R]
             [--topology v5e:2x2[,slices=2]] [--dump-hlo DIR] [--baseline OLD.json --max-regression 0.2]
             [--out results.json] [--csv results.csv] [--plot compile.png] [--steps N]
       jaxmodels bench step --config experiments/X.py [--config.K=V ...] [--steps N] [--compare-pure-jax] [--loop]
       jaxmodels bench data --config experiments/X.py [--config.K=V ...] [--steps N]

compile: for every point of the sweep (the cartesian product of the --sweep
lists), builds the experiment's train step from abstract inputs and reports
trace_s, lower_s, compile_s (medians of R cold runs), hlo_ops, fusions, flops,
bytes_accessed, argument/output/temp/generated_code bytes, warm_cache_compile_s,
the memory verdict (needed_bytes per device, device_memory_bytes, headroom_bytes,
fits: true, false, or null where the device's memory is unknown, as on a CPU; a
step XLA refuses for lack of memory is a fits: false point), and, unless
--topology compiles ahead of time for an unattached TPU slice (or several: `v5e:2x2,slices=2`, with --config.parallel.dcn_mesh=data=2),
step_s. --baseline exits 1 when a metric grew by more than --max-regression.
--sweep takes any config key; values are parsed by the key's type: true/false,
numbers, strings, tuples as Python literals ('(64,)','(128,64)'), none. Commas
outside brackets separate values, so a string holding a comma is quoted inside
the shell's quotes: --sweep "parallel.mesh='data=2,tensor=4','data=8'". The
points are listed before the first compile.
step: median step time and spread, throughput, analytic model FLOPs (checked
against XLA's count) and MFU; --compare-pure-jax (MLP experiments) also times a
hand-written pure JAX + Optax step of the same math; --loop also trains N
steps in a temporary workdir and reports the loop's median logged step time
beside the step's (the loop's overhead, as a ratio).
data: the loader's batches/s and tokens/s (images/s, examples/s), with and
without its prefetch and device transfer, next to the rate at which the step
consumes them: whether the input pipeline keeps up.
"""
  from jaxmodels.bench import timing as bench  # pylint: disable=import-outside-toplevel

  if not args or args[0] not in ("compile", "step", "data"):
    raise UserError("bench needs a subcommand: compile, step or data (see jaxmodels bench --help)")
  sub, rest = args[0], args[1:]

  def extra(fv):
    flags.DEFINE_integer("steps", 20, "timed steps", flag_values=fv)
    if sub == "compile":
      flags.DEFINE_multi_string("sweep", [], "GROUP.KEY=V1,V2,...", flag_values=fv)
      flags.DEFINE_integer("repeat", 3, "cold compiles per point (median)", flag_values=fv)
      for name in ("topology", "dump_hlo", "baseline", "out", "csv", "plot"):
        flags.DEFINE_string(name, "", name, flag_values=fv)
      flags.DEFINE_float("max_regression", 0.2, "allowed relative growth", flag_values=fv)
    elif sub == "step":
      flags.DEFINE_boolean("compare_pure_jax", False, "time a pure JAX step too", flag_values=fv)
      flags.DEFINE_boolean("loop", False, "time the training loop too", flag_values=fv)

  rest = [a.replace("--dump-hlo", "--dump_hlo").replace("--max-regression", "--max_regression")
          .replace("--compare-pure-jax", "--compare_pure_jax") for a in rest]
  config, fv = parse_experiment_flags(f"{prog} {sub}", rest, extra)
  if fv.steps < 1:
    raise UserError(f"--steps {fv.steps}: expected at least 1")
  if sub == "step":
    bench.run_step(config, fv.steps, fv.compare_pure_jax, loop=fv.loop)
    return 0
  if sub == "data":
    bench.run_data(config, fv.steps)
    return 0
  return bench.run_compile(config, bench.CompileArgs(
      sweeps=fv.sweep, repeat=fv.repeat, topology=fv.topology, dump_hlo=fv.dump_hlo, baseline=fv.baseline,
      max_regression=fv.max_regression, out=fv.out, csv=fv.csv, plot=fv.plot, steps=fv.steps))


def cmd_plan(prog: str, args: list[str]) -> int:
  """usage: jaxmodels plan --config experiments/X.py [--topology v5e:2x4[,slices=2]] [--global-batch 256]
             [--try parallel.strategy=fsdp,dp --try model.remat=none,dots,full --try train.grad_accum_steps=1,2,4 ...]
             [--config.K=V ...] [--json plan.json] [--plot plan.png] [--workers N] [--timeout S]

Compiles the train step of every candidate (the cartesian product of the --try
lists, values as in `bench compile --sweep`) ahead of time for the TPU topology
(without --topology: for the attached devices), each in a worker process
(--workers at once, default one per two CPU cores and 4 GiB of free host memory;
--timeout seconds each, default 600). Reports each candidate's bytes per device
(arguments + outputs not aliased + temporaries + code, from XLA's memory
analysis) against the chip's memory, drops those that do not fit, ranks the rest
by XLA's estimated step time (else by FLOPs and bytes accessed per device) and
prints the `jaxmodels train` command of the best. --global-batch sets
train.batch_size for every candidate. Exit status 1 when nothing fits.
"""
  from jaxmodels.bench import plan  # pylint: disable=import-outside-toplevel

  def extra(fv):
    flags.DEFINE_multi_string("try", [], "GROUP.KEY=V1,V2,...", flag_values=fv)
    for name in ("topology", "json", "plot"):
      flags.DEFINE_string(name, "", name, flag_values=fv)
    flags.DEFINE_integer("global_batch", 0, "train.batch_size of every candidate", flag_values=fv)
    flags.DEFINE_integer("workers", 0, "parallel compiles (0: default)", flag_values=fv)
    flags.DEFINE_float("timeout", 600.0, "seconds per candidate", flag_values=fv)

  args = [a.replace("--global-batch", "--global_batch") for a in args]
  config, fv = parse_experiment_flags(prog, args, extra)
  return plan.run_plan(config, plan.PlanArgs(
      config_path=pop_config_path(args)[0], overrides=[a for a in args if a.startswith("--config.")],
      tries=fv["try"].value, topology=fv.topology, global_batch=fv.global_batch, out=fv.json, plot=fv.plot,
      workers=fv.workers, timeout=fv.timeout))


def plan_hint(args: list[str]) -> str:
  """The `jaxmodels plan` command line for the experiment and overrides of a command's `args`."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    path = pop_config_path(args)[0]
  except UserError:
    path = "experiments/X.py"
  topology = ["--topology", "SLICE (e.g. v5e:2x4)"] if jax.default_backend() == "tpu" else []
  return " ".join(["jaxmodels plan --config", path, *(a for a in args if a.startswith("--config.")), *topology,
                   "--try parallel.strategy=dp,fsdp --try model.remat=none,dots,full",
                   "--try train.grad_accum_steps=1,2,4,8"])


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "prepare": cmd_prepare, "launch": cmd_launch,
            "export": cmd_export, "eval": cmd_eval, "plot": cmd_plot, "bench": cmd_bench, "import-hf": cmd_import_hf,
            "export-hf": cmd_export_hf, "compress": cmd_compress, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  command, args = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f"jaxmodels: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  if any(a in ("-h", "--help", "--helpfull") for a in args):
    print(COMMANDS[command].__doc__ or USAGE)
    return 0
  try:
    return COMMANDS[command](f"jaxmodels {command}", args)
  except UserError as e:  # exit 2; 3 for a non-finite loss
    print(f"jaxmodels: error: {e}", file=sys.stderr)
    return e.exit_code
  except Preempted as e:  # a signal stopped training after a synchronous save: rerun to resume
    return e.exit_code
  except RuntimeError as e:  # XLA's device out-of-memory error (a JaxRuntimeError) is one line; others propagate
    from jaxmodels.runtime import hbm  # pylint: disable=import-outside-toplevel
    if not hbm.is_oom(e):
      raise
    print(f"jaxmodels: error: {hbm.explain(e, plan_hint(args))}", file=sys.stderr)
    return UserError.exit_code


def entry() -> None:
  """The `jaxmodels` console script and `python -m jaxmodels`."""
  host.reexec_with_huge_pages()
  host.cpu_only_platform()
  sys.exit(main())


def run_experiment(path: str) -> None:
  """Entry point of an experiment file run as a script: `jaxmodels train --config <that file>`."""
  host.reexec_with_huge_pages()
  host.cpu_only_platform()
  sys.exit(main(["jaxmodels", "train", "--config", path, *sys.argv[1:]]))
