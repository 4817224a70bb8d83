"""`jaxmodels bench`: compile, step and input-pipeline benchmarks of an experiment."""

from jaxmodels.bench import timing
from jaxmodels.cli.arguments import parse_args
from jaxmodels.config import parse_experiment_args
from jaxmodels.runtime.errors import UserError

__all__ = ["FLAGS", "run"]

FLAGS = {  # each subcommand's own flags, beside --config and its overrides
    "compile": [("--steps", dict(type=int, default=20)), ("--sweep", dict(action="append", default=[])),
                ("--repeat", dict(type=int, default=3)), ("--topology", dict(default="")),
                ("--dump-hlo", dict(default="")), ("--baseline", dict(default="")),
                ("--max-regression", dict(type=float, default=0.2)), ("--out", dict(default="")),
                ("--csv", dict(default="")), ("--plot", dict(default=""))],
    "step": [("--steps", dict(type=int, default=20)), ("--compare-pure-jax", dict(action="store_true")),
             ("--loop", dict(action="store_true"))],
    "data": [("--steps", dict(type=int, default=20)), ("--step-time", dict(type=float, default=0.0))],
}


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels bench compile --config experiments/X.py [--config.K=V ...]
             [--sweep model.num_layers=1,2,4,8 --sweep model.scan_layers=true,false ...] [--repeat R]
             [--topology v5e:2x2[,slices=2]] [--dump-hlo DIR] [--baseline OLD.json --max-regression 0.2]
             [--out results.json] [--csv results.csv] [--plot compile.png] [--steps N]
       jaxmodels bench step --config experiments/X.py [--config.K=V ...] [--steps N] [--compare-pure-jax] [--loop]
       jaxmodels bench data --config experiments/X.py [--config.K=V ...] [--steps N] [--step-time S]

compile: for every point of the sweep (the cartesian product of the --sweep
lists), builds the experiment's train step from abstract inputs and reports
trace_s, lower_s, compile_s (medians of R cold runs), hlo_ops, fusions, flops,
bytes_accessed, argument/output/alias/temp/generated_code bytes, warm_cache_compile_s,
pipeline_bubble (with a `stage` mesh axis: (stages - 1) / (microbatches x repeats + stages - 1)),
the memory verdict (needed_bytes per device, device_memory_bytes, headroom_bytes,
fits: true, false, or null where the device's memory is unknown, as on a CPU; a
step XLA refuses for lack of memory is a fits: false point), and, unless
--topology compiles ahead of time for an unattached TPU slice (or several: `v5e:2x2,slices=2`, with --config.parallel.dcn_mesh=data=2),
step_s. --baseline exits 1 when a metric grew by more than --max-regression.
The measurement is jaxmodels.bench.compile_stats(fn, *args), which takes any
jitted function of your own (docs/benchmarking.md).
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
data: the loader's batches/s, tokens/s (images/s, examples/s) and MB/s read
from the source (a local disk or gs://), with and without its prefetch and
device transfer, next to the rate at which the step consumes them (or one
batch per --step-time seconds, compiling nothing): whether the loader keeps up.
"""
  if not args or args[0] not in FLAGS:
    raise UserError("bench needs a subcommand: compile, step or data (see jaxmodels bench --help)")
  sub = args[0]
  config, _, rest = parse_experiment_args(args[1:])
  a = parse_args(f"{prog} {sub}", rest, FLAGS[sub])
  if a.steps < 1:
    raise UserError(f"--steps {a.steps}: expected at least 1")
  if sub == "step":
    timing.run_step(config, a.steps, a.compare_pure_jax, loop=a.loop)
    return 0
  if sub == "data":
    if a.step_time < 0:
      raise UserError(f"--step-time {a.step_time}: expected seconds >= 0 (0: measure the step)")
    timing.run_data(config, a.steps, step_s=a.step_time)
    return 0
  return timing.run_compile(config, timing.CompileArgs(
      sweeps=a.sweep, repeat=a.repeat, topology=a.topology, dump_hlo=a.dump_hlo, baseline=a.baseline,
      max_regression=a.max_regression, out=a.out, csv=a.csv, plot=a.plot, steps=a.steps))
