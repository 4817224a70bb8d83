"""Compile benchmarks, the regression gate, recompilation alarms, MFU and profiler traces."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, experiment, topology_devices
from jax.sharding import PartitionSpec as P

from jaxmodels import parallel
from jaxmodels.bench import timing as bench
from jaxmodels.config import with_values
from jaxmodels.models import flops
from jaxmodels.runs import checkpoint
from jaxmodels.runtime import compilation
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.actions import Profile
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate, train_loop
from jaxmodels.train.metrics import MetricsLogger

FIELDS = {"trace_s", "lower_s", "compile_s", "hlo_ops", "fusions", "flops", "bytes_accessed", "argument_bytes",
          "output_bytes", "temp_bytes", "generated_code_bytes", "warm_cache_compile_s", "step_s", "jax", "jaxlib",
          "backend", "device_kind", "device_count", "config"}


def jaxmodels(*args):
  return subprocess.run([sys.executable, "-m", "jaxmodels", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False)


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  r = jaxmodels("bench", "compile", "--config", "experiments/digits_mlp.py", "--sweep",
                "train.batch_size=32,64", "--repeat", "1",
                "--steps", "2", "--out", str(tmp / "r.json"), "--dump-hlo", str(tmp / "hlo"),
                "--csv", str(tmp / "r.csv"))
  assert r.returncode == 0, r.stderr
  with open(tmp / "r.json", encoding="utf-8") as f:
    return tmp, json.load(f), r.stdout


def test_compile_sweep_records_every_field(compile_results):
  tmp, results, stdout = compile_results
  assert [p["config"] for p in results] == [{"train.batch_size": 32}, {"train.batch_size": 64}]
  for p in results:
    assert FIELDS <= set(p)
    assert p["compile_s"] > 0 and p["hlo_ops"] > p["fusions"] > 0 and p["flops"] > 0 and p["step_s"] > 0
    assert p["warm_cache_compile_s"] < p["compile_s"]  # the persistent cache skips XLA's work
  assert results[1]["flops"] > 1.5 * results[0]["flops"]  # twice the batch, about twice the work
  assert "compile_s" in stdout.splitlines()[-3] and "batch_size=64" in stdout
  assert "model: mlp, 50,826 parameters, 32 examples per step" in stdout  # before each point's figures
  assert (tmp / "r.csv").read_text().startswith("label,")


def test_hlo_dump_has_pre_and_post_optimization_modules(compile_results):
  tmp, _, _ = compile_results
  names = sorted(os.listdir(tmp / "hlo"))
  assert names == ["batch_size=32.post.hlo.txt", "batch_size=32.pre.hlo.txt", "batch_size=64.post.hlo.txt",
                   "batch_size=64.pre.hlo.txt"]
  pre, post = ((tmp / "hlo" / f"batch_size=32.{k}.hlo.txt").read_text() for k in ("pre", "post"))
  assert pre.startswith("HloModule") and post.startswith("HloModule")
  assert "fusion" in post and "fusion" not in pre


def test_regression_gate(compile_results, tmp_path):
  _, results, _ = compile_results
  faster = [{**p, "compile_s": p["compile_s"] / 10} for p in results]  # the old run compiled 10x faster
  assert bench.regressions(results, faster, 0.2)[0].startswith("batch_size=32 compile_s:")
  assert bench.regressions(results, results, 0.2) == []
  baseline = tmp_path / "old.json"
  baseline.write_text(json.dumps(faster))
  r = jaxmodels("bench", "compile", "--config", "experiments/digits_mlp.py", "--sweep", "train.batch_size=32",
                "--repeat", "1", "--steps", "2", "--baseline", str(baseline), "--max-regression", "0.2")
  assert r.returncode == 1
  assert "regressions beyond 20%" in r.stdout and "compile_s" in r.stdout


def test_sweep_values_are_typed_and_checked():
  c = experiment("text_transformer")
  points = bench.parse_sweeps(c, ["model.num_layers=1,2", "model.scan_layers=true,false"])
  assert points[1] == {"model.num_layers": 1, "model.scan_layers": False} and len(points) == 4
  with pytest.raises(UserError, match="not of type int"):
    bench.parse_sweeps(c, ["model.num_layers=two"])
  with pytest.raises(UserError, match="GROUP.KEY"):
    bench.parse_sweeps(c, ["model.layers=1"])


def test_sweeps_over_tuples_mesh_strings_booleans_and_none():
  c = experiment("digits_mlp")
  points = bench.parse_sweeps(c, ["model.hidden_sizes=(64,),(128,64)", "parallel.mesh='data=2,tensor=4','data=8'",
                                  "model.scan_layers=true,false", "data.spatial_dims=none,1"])
  assert len(points) == 16
  assert {p["model.hidden_sizes"] for p in points} == {(64,), (128, 64)}
  assert {p["parallel.mesh"] for p in points} == {"data=2,tensor=4", "data=8"}
  assert {p["data.spatial_dims"] for p in points} == {None, 1}
  applied = with_values(c, points[-1])
  assert applied.model.hidden_sizes == (128, 64) and applied.parallel.mesh == "data=8"
  with pytest.raises(UserError, match="tuple literal"):
    bench.parse_sweeps(c, ["model.hidden_sizes=64"])
  with pytest.raises(UserError, match="unbalanced"):
    bench.parse_sweeps(c, ["model.hidden_sizes=(64,"])


def test_bench_step_mfu_and_pure_jax_overhead():
  c = experiment("digits_mlp")  # with its dropout: the pure step draws the same masks
  assert c.model.dropout > 0
  c.model.update(dict(hidden_sizes=(128,)))
  c.train.update(dict(batch_size=32, optimizer="adam"))
  lines = []
  r = bench.run_step(c, steps=5, compare=False, log=lines.append)
  assert 0 < r["mfu"] < 1 and r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]
  assert 0.5 < r["model_flops"] / r["xla_flops"] < 2  # the analytic count agrees with XLA's
  assert "MFU:" in lines[-1] and "FLOP by XLA" in lines[-1] and "counts" not in lines[-1]  # no scan: no note
  exp = build_experiment(c)
  overhead = bench.compare_pure_jax(exp, steps=20, repeats=1)
  assert overhead["overhead_ratio"] > 0
  # The hand-written step really computes the same math: same loss from the same parameters.
  pure, pure_state = bench.pure_jax_mlp_step(exp)
  batch = exp.batch(0)
  _, ours = exp.train_step(exp.init_state(), batch)
  _, theirs = pure(pure_state, batch)
  np.testing.assert_allclose(np.asarray(ours)[:3], np.asarray(theirs)[:3], rtol=1e-5)


def test_peaks_and_xla_flops_count_every_device_of_the_step(monkeypatch):
  c = experiment("digits_mlp")
  counts = {}
  for strategy in ("single", "dp", "pmap"):
    c.parallel.strategy = strategy
    counts[strategy] = build_experiment(c).layout.device_count
  assert counts == {"single": 1, "dp": 8, "pmap": 8}
  monkeypatch.setattr(flops, "datasheet_peak", lambda device=None: (1e12, "H100"))
  assert flops.peak_flops(8) == (8e12, "datasheet bf16 peak of H100 x 8")
  assert flops.peak_flops(1) == (1e12, "datasheet bf16 peak of H100")
  c.parallel.strategy = "dp"  # XLA counts one device's share of the batch; xla_flops counts all 8
  c.model.dropout = 0.0
  exp = build_experiment(c)
  assert 0.5 < exp.model_flops / bench.xla_flops(exp) < 2


def test_compile_point_of_the_pmap_step():
  c = experiment("digits_mlp")
  c.parallel.strategy = "pmap"  # jax.pmap's wrapper traces inside `lower`
  record = bench.compile_point(c, repeat=1, steps=2)
  assert record["trace_s"] > 0 and record["lower_s"] > 0 and record["compile_s"] > 0 and record["step_s"] > 0
  assert record["device_count"] == 8 and record["hlo_ops"] > 0


def test_transformer_flop_count_matches_xla_when_unrolled():
  c = experiment("text_transformer")
  c.model.update(dict(num_layers=2, d_model=64, d_ff=256, scan_layers=False))
  c.data.seq_len = 32
  c.train.batch_size = 8
  exp = build_experiment(c)
  assert 0.8 < exp.model_flops / bench.xla_flops(exp) < 1.25


def test_compile_stats_of_a_plain_jitted_function():
  matmul = lambda a, b: jnp.tanh(a @ b).sum()
  a, b = jnp.ones((64, 32)), jax.ShapeDtypeStruct((32, 16), jnp.float32)  # concrete or abstract arguments
  hits = []  # this process uses a persistent cache (conftest): only the warm-cache compile may read it
  jax.monitoring.register_event_listener(
      lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
  stats = bench.compile_stats(jax.jit(matmul), a, b, repeat=2)
  assert len(hits) == 1  # the second "cold" repeat was a cache hit too while the cache was only switched off
  assert stats["trace_s"] > 0 and stats["lower_s"] > 0 and stats["compile_s"] > 0 and stats["repeat"] == 2
  assert stats["hlo_ops"] > stats["fusions"] > 0
  assert stats["flops"] >= 2 * 64 * 32 * 16 and stats["bytes_accessed"] > 0
  assert stats["argument_bytes"] == (64 * 32 + 32 * 16) * 4 and stats["output_bytes"] == 4
  assert stats["warm_cache_compile_s"] > 0
  # topology=None: the verdict for the local devices; a CPU reports no memory limit, so it is unknown.
  assert stats["device_kind"] == jax.devices()[0].device_kind and stats["topology"] == ""
  assert stats["needed_bytes"] >= stats["argument_bytes"] and stats["fits"] is None
  assert "device_memory_bytes" in stats and "headroom_bytes" in stats
  plain = bench.compile_stats(matmul, a, b, repeat=1)  # a plain function is jitted for the measurement
  assert plain["flops"] == stats["flops"] and plain["hlo_ops"] == stats["hlo_ops"]
  json.dumps(stats)  # a results record, as bench compile writes them
  # XLA's cost analysis counts a scan's body once, not once per iteration (the docstring says so).
  body = bench.compile_stats(lambda x: x @ x, jnp.ones((8, 8)), repeat=1)["flops"]
  scanned = bench.compile_stats(lambda x: jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=10)[0],
                                jnp.ones((8, 8)), repeat=1)["flops"]
  assert body <= scanned < 2 * body
  with pytest.raises(UserError, match="repeat=0: expected at least 1"):
    bench.compile_stats(matmul, a, b, repeat=0)


def test_compile_stats_ahead_of_time_for_a_tpu_topology():
  devices = topology_devices()
  matmul = lambda a, b: a @ b
  a, b = jnp.ones((512, 256)), jax.ShapeDtypeStruct((256, 128), jnp.float32)  # TPU tiles: no padding
  stats = bench.compile_stats(matmul, a, b, repeat=1, topology="v5e:2x2")
  assert "TPU" in stats["device_kind"] and stats["device_count"] == 4 and stats["compile_s"] > 0
  assert stats["argument_bytes"] == (512 * 256 + 256 * 128) * 4  # unsharded arguments: on the first chip
  assert stats["device_memory_bytes"] == int(15.75 * 2**30) and stats["fits"] is True
  assert math.isnan(stats["warm_cache_compile_s"])
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rows = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P("data")))
  sharded = bench.compile_stats(matmul, rows, b, repeat=1, topology="v5e:2x2")
  assert sharded["argument_bytes"] == (128 * 256 + 256 * 128) * 4  # a quarter of the rows per chip, `b` whole


@pytest.mark.parametrize("name", ["v9z:2x2", "v5e:3x3"])
def test_a_topology_name_libtpu_refuses_is_blamed_on_the_name_not_the_install(name):
  topology_devices()
  with pytest.raises(UserError, match=rf"--topology {name}: .*expected GENERATION:CHIPS as v5e:2x2") as raised:
    bench.topology_devices(name)
  assert "pip install" not in str(raised.value)


def test_topology_compile_ahead_of_time():
  topology_devices()
  c = experiment("digits_mlp")
  c.parallel.strategy = "dp"
  record = bench.compile_point(c, repeat=1, topology="v5e:2x2")
  assert record["device_count"] == 4 and "TPU" in record["device_kind"]
  assert record["compile_s"] > 0 and record["temp_bytes"] >= 0 and "step_s" not in record
  assert math.isnan(record["warm_cache_compile_s"])  # an AOT executable cannot be loaded from the cache


def test_two_slice_topology_compiles_with_a_dcn_axis():
  try:
    devices = bench.topology_devices("v5e:2x2,slices=2")
  except UserError as e:
    pytest.skip(f"no TPU topology support here: {e}")
  c = experiment("digits_mlp")
  c.parallel.strategy = "dp"
  with pytest.raises(UserError, match="the devices span 2 TPU slices: set parallel.dcn_mesh"):
    parallel.make_mesh(c.parallel, devices)
  c.parallel.dcn_mesh = "data=2"
  mesh = parallel.make_mesh(c.parallel, devices)
  assert dict(mesh.shape) == {"stage": 1, "data": 8, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1}
  assert [d.slice_index for d in mesh.devices.flat] == [0] * 4 + [1] * 4  # `data` crosses the slices once
  record = bench.compile_point(c, repeat=1, topology="v5e:2x2,slices=2")
  assert record["device_count"] == 8 and "TPU" in record["device_kind"] and record["compile_s"] > 0
  c.parallel.dcn_mesh = "data=3"
  with pytest.raises(UserError, match="mesh axis 'data' of size 8 cannot be split 3 ways across slices"):
    parallel.make_mesh(c.parallel, devices)


def test_mismatched_libtpu_is_named(monkeypatch):
  real_version = importlib.metadata.version
  monkeypatch.setattr(importlib.metadata, "requires", lambda name: ['libtpu==0.0.42.*; extra == "tpu"'])
  for installed, expected in (("0.0.42.1", None), ("0.0.42", None), ("0.0.52", "libtpu 0.0.52 is installed")):
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name, v=installed: v if name == "libtpu" else real_version(name))
    problem = compilation.libtpu_problem()
    assert problem == expected if expected is None else problem.startswith(expected)
  with pytest.raises(UserError, match=r"train.profile_steps: libtpu 0.0.52 .* pip install 'jax\[tpu\]=="):
    Profile((1, 2), "unused", print)


@pytest.mark.parametrize("strategy", ["single", "pmap"])  # pmap's step is a Python wrapper, watched by events
def test_recompilation_warns_and_can_fail(tmp_path, strategy):
  c = experiment("digits_mlp")
  c.train.update(dict(steps=6, warmup_steps=1, log_every=100, eval_every=100))
  c.parallel.strategy = strategy
  # pmap splits the batch over the 8 simulated devices: (8, 8, ...) then (8, 4, ...)
  shapes = {"single": ("64, 8, 8, 1", "32, 8, 8, 1"), "pmap": ("8, 8, 8, 8, 1", "8, 4, 8, 8, 1")}[strategy]
  for fail in (False, True) if strategy == "single" else (False,):
    c.train.fail_on_recompile = fail
    exp = build_experiment(c)

    def batch(step, exp=exp):  # from step 3 on, half the batch: a new shape, so a new compile
      local = exp.dataset.train_batch(step, 64)
      return exp.layout.global_batch({k: v[:32] for k, v in local.items()} if step >= 3 else local)

    exp.batch = batch
    logger = MetricsLogger(str(tmp_path), 6)
    logger.start(0)
    ckpts = checkpoint.Checkpoints(str(tmp_path / f"ck{strategy}{fail}"), c.checkpoint)
    if fail:
      with pytest.raises(UserError, match=r"train_step recompiled \(compile #2\) at step 4: \['batch'\]\['x'\]: "
                                          r"float32\[64, 8, 8, 1\] .* -> float32\[32, 8, 8, 1\]"):
        train_loop(exp, exp.init_state(), 0, logger, ckpts)
    else:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_loop(exp, exp.init_state(), 0, logger, ckpts)
      messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
      # exactly one: neither the first compile of the train and eval steps nor the final evaluation warns
      assert len(messages) == 1, messages
      assert messages[0].startswith("train_step recompiled (compile #2) at step 4: ['batch']['x']: "
                                    f"float32[{shapes[0]}]"), messages
      assert f"-> float32[{shapes[1]}]" in messages[0]
    ckpts.close()


def test_first_compile_timings_and_profiler_trace(tmp_path):
  c = experiment("digits_mlp")
  c.train.update(dict(steps=8, warmup_steps=1, log_every=4, eval_every=8, profile_steps=(2, 5)))
  train_and_evaluate(c, str(tmp_path))
  first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert first["trace_s"] > 0 and first["lower_s"] > 0 and first["compile_s"] >= 0
  second = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
  assert 0 < second["mfu"] < 1
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
  assert traces


def test_every_sweep_point_is_checked_before_the_first_compile(tmp_path):
  c = experiment("digits_mlp")
  with pytest.raises(UserError, match="given twice"):
    bench.parse_sweeps(c, ["train.batch_size=32", "train.batch_size=64"])
  out = tmp_path / "r.json"
  args = bench.CompileArgs(sweeps=["train.learning_rate=1e-3,nan"], repeat=1, topology="", dump_hlo=str(tmp_path / "h"),
                           baseline="", max_regression=0.2, out=str(out), csv="", plot="", steps=1)
  with pytest.raises(UserError, match=r"sweep point .*train.learning_rate=nan"):
    bench.run_compile(c, args, log=lambda _: None)
  assert not out.exists() and not (tmp_path / "h").exists()  # nothing compiled, nothing written


def test_a_cache_directory_that_cannot_be_made_is_a_note_not_a_traceback(tmp_path, capsys):
  # eval, export and sample turn the cache on too: JAXMODELS_CACHE_DIR under a file (or a read-only home) was a
  # NotADirectoryError traceback, though the command needs no cache.
  (tmp_path / "file").write_text("")
  before = jax.config.jax_compilation_cache_dir
  assert compilation.enable_persistent_cache(str(tmp_path / "file" / "xla")) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert capsys.readouterr().err == (f"jaxmodels: note: no persistent compilation cache: cannot make "
                                     f"{tmp_path / 'file' / 'xla'} (set JAXMODELS_CACHE_DIR to a writable directory): "
                                     f"Not a directory\n")


def test_the_cache_directory_is_jaxmodels_then_jaxs_own_variable(tmp_path, monkeypatch):
  # JAX_COMPILATION_CACHE_DIR, set by a user for JAX, was overridden by ~/.cache/jaxmodels/xla without a word.
  monkeypatch.delenv("JAXMODELS_CACHE_DIR", raising=False)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  before = jax.config.jax_compilation_cache_dir
  try:
    assert compilation.enable_persistent_cache() == str(tmp_path / "jax")
    monkeypatch.setenv("JAXMODELS_CACHE_DIR", str(tmp_path / "ours"))
    assert compilation.enable_persistent_cache() == str(tmp_path / "ours")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
