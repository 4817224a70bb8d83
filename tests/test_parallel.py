"""Sharded training on 8 simulated CPU devices: meshes, rules, equivalence of strategies, multi-process jobs."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from conftest import ROOT, experiment, read_metrics
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from jaxmodels import parallel
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.actions import summarize
from jaxmodels.train.experiment import build_experiment

STEPS = 20


def pconfig(strategy, mesh=""):
  c = config_dict.ConfigDict({"strategy": strategy, "mesh": mesh})
  return c


def test_mesh_sizes_fill_and_errors():
  assert jax.device_count() == 8
  one = {"stage": 1, "data": 1, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1}
  assert dict(parallel.make_mesh(pconfig("dp")).shape) == {**one, "data": 8}
  assert dict(parallel.make_mesh(pconfig("tp", "data=2,tensor=-1")).shape) == {**one, "data": 2, "tensor": 4}
  assert parallel.make_mesh(pconfig("single")).size == 1
  with pytest.raises(UserError, match="do not divide the 8 devices"):
    parallel.make_mesh(pconfig("dp", "data=-1,tensor=3"))
  with pytest.raises(UserError, match="needs 6 devices, but 8 are available"):
    parallel.make_mesh(pconfig("dp", "data=2,tensor=3"))
  with pytest.raises(UserError, match="only one axis may be -1"):
    parallel.make_mesh(pconfig("dp", "data=-1,fsdp=-1"))
  with pytest.raises(UserError, match="unknown axis 'model'"):
    parallel.make_mesh(pconfig("dp", "model=8"))
  with pytest.raises(UserError, match="parallel.strategy='zero'"):
    parallel.make_mesh(pconfig("zero"))
  c = pconfig("dp")
  c.dcn_mesh = "data=2"  # one process, no slices: a single granule cannot be split in two
  with pytest.raises(UserError, match="parallel.dcn_mesh='data=2' does not fit the devices"):
    parallel.make_mesh(c)
  c.dcn_mesh = "model=2"
  with pytest.raises(UserError, match="parallel.dcn_mesh: unknown axis 'model'"):
    parallel.make_mesh(c)


def small_transformer(strategy, mesh=""):
  c = experiment("text_transformer")
  c.data.seq_len = 16
  c.model.update(dict(num_layers=2, num_heads=4, d_model=32, d_ff=64, max_len=16))
  c.train.update(dict(batch_size=16, eval_batch_size=16, steps=STEPS, warmup_steps=5))
  c.parallel.update(dict(strategy=strategy, mesh=mesh))
  return c


def small_cnn(strategy, mesh=""):
  c = experiment("digits_cnn")
  c.model.update(dict(features=(8, 16), head_sizes=(32,)))
  # SGD: under Adam, the conv biases that BatchNorm cancels (gradient ~1e-9, pure rounding noise)
  # take full-size steps of arbitrary sign, so no two reduction orders could agree on them.
  c.train.update(dict(batch_size=32, steps=STEPS, warmup_steps=5, optimizer="sgd", learning_rate=0.05))
  c.parallel.update(dict(strategy=strategy, mesh=mesh))
  return c


def run_steps(config):
  exp = build_experiment(config)
  state = exp.init_state()
  losses = []
  for step in range(STEPS):
    state, metrics = exp.train_step(state, exp.batch(step))
    losses.append(metrics)
  losses = [summarize(np.stack(parallel.fetch([m])))["loss"] for m in losses]
  return exp, state, losses, jax.device_get(exp.layout.for_checkpoint(state).params)


@pytest.fixture(scope="module")
def baselines():
  return {"cnn": run_steps(small_cnn("single")), "transformer": run_steps(small_transformer("single"))}


def assert_same_run(run, baseline):
  _, _, losses, params = run
  np.testing.assert_allclose(losses, baseline[2], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(baseline[3])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "pmap"])
def test_digits_cnn_strategies_match_single_device(baselines, strategy):
  assert_same_run(run_steps(small_cnn(strategy)), baselines["cnn"])


@pytest.mark.parametrize("strategy, mesh", [("dp", ""), ("fsdp", ""), ("tp", "tensor=4,data=2"),
                                            ("fsdp", "fsdp=4,tensor=2"), ("pmap", "")])
def test_text_transformer_strategies_match_single_device(baselines, strategy, mesh):
  assert_same_run(run_steps(small_transformer(strategy, mesh)), baselines["transformer"])


def test_pmap_devices_draw_their_own_dropout_masks():
  # Every device gets the same 8 rows: with one shared dropout key all 8 would compute the single-device loss.
  c = experiment("digits_mlp")
  c.model.dropout = 0.5
  losses = {}
  for strategy in ("single", "pmap"):
    c.parallel.strategy = strategy
    exp = build_experiment(c)
    rows = exp.dataset.train_batch(0, 8)
    local = rows if strategy == "single" else {k: np.concatenate([v] * 8) for k, v in rows.items()}
    _, metrics = exp.train_step(exp.init_state(), exp.layout.global_batch(local))
    losses[strategy] = summarize(np.stack(parallel.fetch([metrics])))["loss"]
  assert np.isfinite(losses["pmap"]) and abs(losses["pmap"] - losses["single"]) > 1e-3 * losses["single"]


def test_fsdp_and_tp_really_shard_the_state(baselines):
  single_bytes = parallel.per_device_bytes(baselines["transformer"][1].params)
  fsdp = build_experiment(small_transformer("fsdp"))
  state = fsdp.init_state()
  q = state.params["stack"]["blocks"]["attn"]["query"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", None)  # (layers, embed, heads)
  for moment in ("mu", "nu"):  # Adam's moments are sharded like their parameters
    tree = optax.tree_utils.tree_get(state.opt_state, moment)
    assert tree["stack"]["blocks"]["attn"]["query"]["kernel"].sharding.spec == q.sharding.spec
  assert parallel.per_device_bytes(state.params) <= single_bytes / 7
  tp = build_experiment(small_transformer("tp", "tensor=4,data=2")).init_state()
  blocks = tp.params["stack"]["blocks"]
  assert blocks["attn"]["query"]["kernel"].sharding.spec == P(None, None, "tensor")  # column parallel
  assert blocks["attn"]["out"]["kernel"].sharding.spec == P(None, "tensor", None)  # row parallel
  assert blocks["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor", None)
  assert parallel.per_device_bytes(tp.params) < single_bytes / 2
  # Unannotated CNN dense layers fall back to splitting their largest divisible dimension over fsdp.
  cnn = build_experiment(small_cnn("fsdp")).init_state()
  assert cnn.params["head"][0]["kernel"].sharding.spec == P("fsdp", None)  # (64, 32): 64 is largest
  assert cnn.params["convs"][0]["kernel"].sharding.spec == P(None, None, None, "fsdp")  # conv_out


def test_clear_errors_for_batch_and_dimension_splits():
  c = small_cnn("dp")
  c.train.batch_size = 12
  with pytest.raises(UserError, match="batch size 12 is not divisible by the data-parallel size 8"):
    build_experiment(c)
  c = small_transformer("tp", "tensor=8")
  c.model.d_ff = 36
  with pytest.raises(UserError, match=r"dimension 36 \(mlp\) cannot be split over mesh axis 'tensor' of size 8"):
    build_experiment(c)


def jaxmodels(*args, env=None, timeout=600, **kw):
  return subprocess.run([sys.executable, "-m", "jaxmodels", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False, env=env, **kw)


TINY_TEXT = ["train", "--config", "experiments/text_transformer.py", "--config.data.seq_len=16",
             "--config.data.val_fraction=0.02", "--config.model.num_layers=2", "--config.model.d_model=32",
             "--config.model.d_ff=64", "--config.model.max_len=16", "--config.train.batch_size=16",
             "--config.train.eval_batch_size=128", "--config.train.steps=10", "--config.train.warmup_steps=2",
             "--config.train.log_every=5", "--config.train.eval_every=5"]


@pytest.mark.slow
def test_tensor_axis_across_processes_matches_one_process(tmp_path):
  # tensor=4 spans both processes: each holds 2 of the 4 replicas of every batch row, so both must load the same
  # rows. (A batch axis across processes, each loading only its own rows, is test_tokens' two-process launch.)
  train = [*TINY_TEXT, "--config.parallel.strategy=tp", "--config.parallel.mesh=tensor=4"]
  multi = jaxmodels("launch", "--processes", "2", "--devices-per-process", "2", "--", *train,
                    f"--workdir={tmp_path / 'multi'}", timeout=300)
  assert multi.returncode == 0, multi.stdout + multi.stderr
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  single = jaxmodels(*train, f"--workdir={tmp_path / 'single'}", env=env)
  assert single.returncode == 0, single.stderr
  a, b = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  assert [r["split"] for r in a].count("eval") == 2
  for ra, rb in zip(a, b):
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


@pytest.mark.slow
def test_pmap_across_two_processes_matches_one_process(tmp_path):
  train = ["train", "--config", "experiments/digits_mlp.py", "--config.parallel.strategy=pmap",
           "--config.model.dropout=0.0", "--config.train.schedule=constant", "--config.train.warmup_steps=0",
           "--config.train.log_every=10", "--config.train.eval_every=20", "--config.train.fail_on_recompile=true"]
  multi = jaxmodels("launch", "--processes", "2", "--devices-per-process", "2", "--", *train,
                    "--config.train.steps=40", f"--workdir={tmp_path / 'multi'}")
  assert multi.returncode == 0, multi.stdout + multi.stderr
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  single = jaxmodels(*train, "--config.train.steps=40", f"--workdir={tmp_path / 'single'}", env=env)
  assert single.returncode == 0, single.stderr
  a, b = read_metrics(tmp_path / "multi"), read_metrics(tmp_path / "single")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


def start_launch(train, until, devices_per_process=1):
  """Starts `jaxmodels launch --processes 2 -- TRAIN`; reads its output up to a line starting `until`."""
  cmd = [sys.executable, "-m", "jaxmodels", "launch", "--processes", "2", "--devices-per-process",
         str(devices_per_process), "--", *train]
  launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pids, lines = {}, []
  for line in launcher.stdout:
    lines.append(line)
    if line.startswith("[launch] process"):
      pids[int(line.split()[2].rstrip(":"))] = int(line.split()[-1])
    if line.startswith(until):
      break
  assert len(pids) == 2, "".join(lines)
  return launcher, pids, lines


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_every_process_and_resumes(tmp_path):
  train = ["train", "--config", "experiments/digits_mlp.py", "--config.parallel.strategy=dp",
           "--config.train.warmup_steps=5", "--config.train.log_every=10", "--config.train.eval_every=100000",
           "--config.checkpoint.every=0",
           f"--workdir={tmp_path}"]
  launcher, pids, lines = start_launch([*train, "--config.train.steps=100000"], "[0] step 10 train")
  os.kill(pids[1], signal.SIGTERM)  # process 0 hears of it only through the job's preemption service
  out = "".join(lines) + launcher.communicate(timeout=300)[0]
  assert launcher.returncode == 75, out
  saved = dict(re.findall(r"^\[(\d)\] preemption notice: saved step (\d+); rerun", out, re.M))
  assert set(saved) == {"0", "1"} and saved["0"] == saved["1"], out
  assert os.listdir(tmp_path / "checkpoints") == [saved["0"]]
  step = int(saved["0"])
  resumed = jaxmodels("launch", "--processes", "2", "--", *train, f"--config.train.steps={step + 10}")
  assert resumed.returncode == 0, resumed.stdout
  assert "[0] first step after resuming" in resumed.stdout
  assert f"training steps {step}..{step + 10}" in resumed.stdout


@pytest.mark.slow
def test_sigint_to_one_process_stops_every_process_at_one_step_on_a_dcn_mesh(tmp_path):
  """Ctrl-C on one host: every process saves the same step and exits 75 (resuming such a stop is
  test_sigterm_to_one_process_saves_the_same_step_on_every_process_and_resumes). The job's mesh is built by
  parallel.dcn_mesh: on CPUs each process stands for a slice; `fsdp` crosses the two processes, `data` stays
  inside each (jax.make_mesh alone would put process 0's two devices at data index 0)."""
  train = ["train", "--config", "experiments/digits_mlp.py", "--config.parallel.strategy=fsdp",
           "--config.parallel.mesh=data=2,fsdp=2", "--config.parallel.dcn_mesh=fsdp=2",
           "--config.train.log_every=5", "--config.train.eval_every=100000", "--config.checkpoint.every=0",
           f"--workdir={tmp_path / 'run'}", "--config.train.steps=100000"]
  launcher, pids, lines = start_launch(train, "[0] step 10 train", devices_per_process=2)
  os.kill(pids[0], signal.SIGINT)
  out = "".join(lines) + launcher.communicate(timeout=300)[0]
  assert launcher.returncode == 75, out
  assert ("[0] mesh {'stage': 1, 'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 1, 'expert': 1}: process of each "
          "device [[[[[[0]]], [[[1]]]], [[[[0]]], [[[1]]]]]]") in out
  saved = dict(re.findall(r"^\[(\d)\] (?:signal 2|preemption notice): saved step (\d+); rerun", out, re.M))
  assert set(saved) == {"0", "1"} and saved["0"] == saved["1"], out
  assert os.listdir(tmp_path / "run" / "checkpoints") == [saved["0"]]


def test_killed_process_stops_the_whole_job(tmp_path):
  train = ["train", "--config", "experiments/digits_mlp.py", "--config.train.steps=100000",
           "--config.train.log_every=10", "--config.parallel.strategy=dp", f"--workdir={tmp_path}"]
  launcher, pids, _ = start_launch(train, "[0] step 10 train")  # both processes are inside the training loop
  os.kill(pids[1], signal.SIGKILL)
  t0 = time.monotonic()
  rest = launcher.communicate(timeout=60)[0]
  assert launcher.returncode != 0
  assert time.monotonic() - t0 < 30
  assert "process 1 exited with -9; stopping the others" in rest
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)


def pretended_process_rows(strategy, mesh, batch_size=16, processes=2):
  """Rows each of `processes` would load, pretending the 8 devices split evenly over processes in id order."""
  exp_mesh = parallel.make_mesh(pconfig(strategy, mesh))
  sharding = parallel.Layout(exp_mesh, {}).batch_sharding
  devices = sorted(exp_mesh.devices.flat, key=lambda d: d.id)
  per = len(devices) // processes
  return sharding, [parallel.process_rows(sharding, batch_size, devices[i * per:(i + 1) * per])
                    for i in range(processes)]


@pytest.mark.parametrize("strategy, mesh, expected", [
    ("tp", "tensor=8", [range(16), range(16)]),  # the batch is replicated: both processes load every row
    ("tp", "data=2,tensor=4", [range(8), range(8, 16)]),  # tensor spans a process's 4 devices
    ("fsdp", "fsdp=2,tensor=4", [range(8), range(8, 16)]),
    ("tp", "tensor=2,data=4", [range(8), range(8, 16)]),
    ("dp", "", [range(8), range(8, 16)]),
])
def test_each_process_loads_exactly_the_rows_its_devices_hold(strategy, mesh, expected):
  sharding, rows = pretended_process_rows(strategy, mesh)
  assert [r.tolist() for r in rows] == [list(e) for e in expected]
  # Every device's rows come from the process that holds it, and replicas of a row hold the same row.
  index_map = sharding.devices_indices_map((16,))
  devices = sorted(index_map, key=lambda d: d.id)
  for i, d in enumerate(devices):
    assert set(range(16)[index_map[d][0]]) <= set(rows[i // 4].tolist())


def test_tensor_axis_across_processes_gives_replicas_identical_rows():
  # With 4 processes of 2 devices, `tensor=4` spans two processes: each pair must load the same rows.
  _, rows = pretended_process_rows("tp", "data=2,tensor=4", processes=4)
  assert [r.tolist() for r in rows] == [list(range(8))] * 2 + [list(range(8, 16))] * 2
  ds = build_experiment(small_transformer("tp", "data=2,tensor=4")).dataset
  batches = [ds.train_batch(3, 16, r)["x"] for r in rows]
  np.testing.assert_array_equal(batches[0], batches[1])
  np.testing.assert_array_equal(np.concatenate([batches[1], batches[2]]), ds.train_batch(3, 16)["x"])
  evals = [next(ds.eval_batches(16, r)) for r in rows]  # and the same eval rows, with their mask
  for k in ("x", "y", "mask"):
    np.testing.assert_array_equal(evals[0][k], evals[1][k])
  assert [len(list(ds.eval_batches(16, r))) for r in rows] == [len(list(ds.eval_batches(16)))] * 4


def test_make_mesh_takes_keyword_arguments_equal_to_the_config_form():
  for strategy, mesh in (("dp", ""), ("fsdp", ""), ("tp", "data=2,tensor=-1"), ("single", "")):
    kwargs = parallel.make_mesh(strategy=strategy, mesh=mesh)
    assert kwargs == parallel.make_mesh(pconfig(strategy, mesh))
    assert kwargs == parallel.make_mesh({"strategy": strategy, "mesh": mesh})  # a plain dict of the group
  assert dict(parallel.make_mesh(strategy="fsdp", devices=jax.devices()[:4]).shape) == {
      "stage": 1, "data": 1, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
  with pytest.raises(UserError, match="parallel.strategy='zero'"):
    parallel.make_mesh(strategy="zero")
  with pytest.raises(TypeError, match="not both"):
    parallel.make_mesh(pconfig("dp"), strategy="dp")


def test_activation_sharding_is_a_reusable_context_and_decorator_in_a_function_traced_twice():
  mesh = parallel.make_mesh(pconfig("dp"))
  pinned = parallel.activation_sharding(mesh, (("activation_batch", ("data", "fsdp")),))

  @jax.jit
  def inside(x):
    with pinned:
      return parallel.constrain(x * 2, ("activation_batch",))

  decorated = jax.jit(pinned(lambda x: parallel.constrain(x + 1, ("activation_batch",))))
  for fn in (inside, decorated):
    for rows in (8, 16):  # two shapes: two traces entering the same context
      assert "sharding_constraint" in str(jax.make_jaxpr(fn)(np.ones((rows, 3), np.float32)))
      assert fn(np.ones((rows, 3), np.float32)).sharding.spec == P("data")  # fsdp has size 1
  assert parallel.constrain(np.ones(3), ("activation_batch",)).shape == (3,)  # outside: unchanged


def test_param_and_optimizer_state_shardings_for_any_pytree():
  mesh = parallel.make_mesh(pconfig("fsdp"))
  params = {"w": jax.ShapeDtypeStruct((16, 4), np.float32), "b": jax.ShapeDtypeStruct((4,), np.float32)}
  shardings = parallel.param_shardings(params, mesh, fallback_rules=((".*", "fsdp"),))
  assert shardings["w"].spec == P("fsdp", None) and shardings["b"].spec == P(None)  # 4 does not split 8 ways
  assert parallel.param_shardings(params, mesh)["w"].spec == P(None, None)  # no rules: replicated
  adam = parallel.opt_state_shardings(optax.adam(1e-3), params, shardings)
  assert adam[0].mu["w"].spec == P("fsdp", None) and adam[0].nu["b"].spec == P(None)
  assert adam[0].count.spec == P()  # a per-step scalar: replicated
  state = jax.jit(optax.adam(1e-3).init, out_shardings=adam)(
      {k: np.zeros(v.shape, v.dtype) for k, v in params.items()})
  assert state[0].mu["w"].sharding.spec == P("fsdp", None)


def test_single_strategy_in_a_multi_process_job_is_a_one_line_error(monkeypatch):
  # Only process 0's first device would be in the mesh: the others had no rows to load (a traceback in
  # process_rows, 'need at least one array to concatenate').
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(UserError, match="parallel.strategy=single runs on one device, but this job has 2 processes"):
    parallel.make_mesh(strategy="single")
