"""Memory verdicts (`bench compile`, `jaxmodels.runtime.hbm`), the `plan` command, and out-of-memory errors in one line.

The ahead-of-time compiles target a v5e:2x2 slice (libtpu, no chip): a one-layer text transformer whose
sequences of 256 characters at a global batch of 65536 need more than a v5e chip's 15.75 GiB under `dp`.
"""

import json
import os

import jax
import pytest
from conftest import ROOT, experiment, topology_devices

from jaxmodels import cli
from jaxmodels.bench import plan
from jaxmodels.bench import timing as bench
from jaxmodels.cli import train as train_command
from jaxmodels.config import parse_experiment_args
from jaxmodels.runtime import hbm
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.experiment import build_experiment

TOPOLOGY = "v5e:2x2"
SMALL = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.num_heads=2",
         "--config.model.d_ff=256", "--config.model.remat=none", "--config.model.scan_layers=false",
         "--config.data.seq_len=256", "--config.parallel.strategy=dp"]
BIG_BATCH = 65536
# XLA's messages, as it words them (the first from the compile below, the others from TPU and GPU runtimes).
REFUSED = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.46G) "
           "exceeds available HBM (15.75G).")
AT_RUN = ("RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 1.50G. That was not possible. "
          "There are 512.00M free.; (0x0x0_HBM0)")
GPU = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


def small_config(batch_size: int, grad_accum_steps: int = 1):
  c = experiment("text_transformer")
  c.model.update(dict(num_layers=1, d_model=64, num_heads=2, d_ff=256, remat="none", scan_layers=False))
  c.data.seq_len = 256
  c.parallel.strategy = "dp"
  c.train.batch_size, c.train.grad_accum_steps = batch_size, grad_accum_steps
  return c


@pytest.fixture(scope="module")
def topology():
  return topology_devices(TOPOLOGY)


def test_xla_out_of_memory_messages_are_read():
  assert hbm.figures(REFUSED) == {"needed_bytes": int(20.46 * 2**30), "available_bytes": int(15.75 * 2**30),
                                  "needed_what": "HLO temporaries alone"}
  assert hbm.figures(AT_RUN) == {"needed_bytes": int(1.5 * 2**30), "available_bytes": 512 * 2**20,
                                 "needed_what": "one allocation"}
  assert hbm.figures(GPU) == {"needed_bytes": 17179869184, "available_bytes": None, "needed_what": "one allocation"}
  assert hbm.is_oom(jax.errors.JaxRuntimeError(REFUSED)) and hbm.is_oom(jax.errors.JaxRuntimeError(GPU))
  assert not hbm.is_oom(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: too many open files"))
  assert not hbm.is_oom(RuntimeError(REFUSED))  # only XLA's own error kind
  cpu = jax.devices()[0]
  assert hbm.capacity(cpu)[0] is None and "unknown" in hbm.capacity(cpu)[1]


def test_train_out_of_memory_is_one_line_naming_bytes_and_plan(monkeypatch, capsys):
  from jaxmodels.runtime import compilation  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(compilation, "enable_persistent_cache", lambda: None)  # no cache for this process's compiles

  def oom(config, workdir):
    raise jax.errors.JaxRuntimeError(AT_RUN)

  monkeypatch.setattr(train_command, "train_and_evaluate", oom)
  args = ["jaxmodels", "train", "--config", "experiments/text_transformer.py", "--config.train.batch_size=512"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "1.50 GiB of 0.50 GiB available" in err[0]
  assert ("jaxmodels plan --config experiments/text_transformer.py --config.train.batch_size=512 --try "
          in err[0])

  def other(config, workdir):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(train_command, "train_and_evaluate", other)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # any other runtime error keeps its traceback
    cli.main(args)


def test_bench_compile_reports_a_step_xla_refuses_as_not_fitting(topology):
  record = bench.compile_point(small_config(BIG_BATCH), repeat=1, topology=TOPOLOGY)
  assert record["fits"] is False and record["device_kind"] == "TPU v5 lite"
  assert record["device_memory_bytes"] == int(15.75 * 2**30) < record["needed_bytes"]
  assert record["headroom_bytes"] < 0 and record["oom"].startswith("RESOURCE_EXHAUSTED")


def test_plan_finds_the_fitting_setting_and_its_bytes_match_xla(topology, tmp_path, capsys):
  args = plan.PlanArgs(config_path=os.path.join(ROOT, "experiments", "text_transformer.py"), overrides=SMALL,
                       tries=["train.grad_accum_steps=1,64"], topology=TOPOLOGY, global_batch=BIG_BATCH,
                       out=str(tmp_path / "plan.json"), plot=str(tmp_path / "plan.png"), workers=2, timeout=600)
  config, _, _ = parse_experiment_args(["--config", args.config_path, *SMALL])
  assert plan.run_plan(config, args) == 0
  out = capsys.readouterr().out
  with open(tmp_path / "plan.json", encoding="utf-8") as f:
    result = json.load(f)
  refused, fitting = result["candidates"]
  assert refused["status"] == "too big" and refused["fits"] is False and refused["headroom_bytes"] < 0
  assert fitting["est_step_s"] > 0 and 0 < fitting["est_mfu"] < 1  # v5e's datasheet peak and HBM bandwidth
  assert fitting["status"] == "fits" and result["best"] == {"train.grad_accum_steps": 64, "train.batch_size": BIG_BATCH}
  assert "--config.train.grad_accum_steps=64 --config.train.batch_size=65536" in out.splitlines()[-1]
  assert "does not fit: grad_accum_steps=1" in out and os.path.getsize(tmp_path / "plan.png") > 0

  exp = build_experiment(small_config(BIG_BATCH, 64), devices=topology)  # the same point, compiled here
  memory = exp.train_step.lower(*bench.abstract_args(exp)).compile().memory_analysis()
  assert fitting["needed_bytes"] == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                                     + memory.generated_code_size_in_bytes)
  assert fitting["temp_bytes"] == memory.temp_size_in_bytes and fitting["headroom_bytes"] > 0


def test_plan_refuses_bad_candidates_before_compiling():
  config = small_config(64)
  with pytest.raises(UserError, match="--try train.grad_accum_steps is given twice"):
    plan.candidates(config, plan.PlanArgs("x.py", [], ["train.grad_accum_steps=1", "train.grad_accum_steps=2"]))
  with pytest.raises(UserError, match=r"candidate grad_accum_steps=3: train.batch_size=64 is not divisible"):
    plan.candidates(config, plan.PlanArgs("x.py", [], ["train.grad_accum_steps=1,3"]))
  with pytest.raises(UserError, match="--try 'model.nope=1'"):
    plan.candidates(config, plan.PlanArgs("x.py", [], ["model.nope=1"]))


def test_plan_where_the_memory_is_unknown_does_not_say_no_setting_fits(monkeypatch, capsys):
  # On a CPU every candidate compiles to "unknown": the last line used to read "no setting fits: try more FSDP...".
  unknown = {"status": "unknown", "setting": "mesh=data=1", "needed_bytes": 2**20,
             "device_memory_source": "cpu: unknown (the device reports no memory limit)"}
  monkeypatch.setattr(plan, "compile_all", lambda *_args: [unknown])
  args = plan.PlanArgs(config_path="x.py", overrides=[], tries=[], workers=1, timeout=60)
  assert plan.run_plan(small_config(64), args) == 1
  last = capsys.readouterr().out.splitlines()[-1]
  assert last.startswith("no setting is known to fit: the devices report no memory limit") and "--topology" in last
