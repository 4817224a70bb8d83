"""The training loop's overlap with the device: prefetched batches, deferred metric reads, in-step eval sums, and
MFU against a peak measured during the run."""


import jax
import numpy as np
import pytest
from conftest import experiment, read_metrics

from jaxmodels.models import flops
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate

TIMING = ("step_time_ms", "examples_per_sec", "mfu", "first_step_s", "trace_s", "lower_s", "compile_s")


def mlp(steps: int, prefetch: int):
  c = experiment("digits_mlp")
  c.train.update(dict(steps=steps, log_every=2, eval_every=6, schedule="constant", warmup_steps=0))
  c.data.prefetch = prefetch
  c.checkpoint.every = 6
  return c


def records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir)]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  """12 steps, batches loaded in the loop's thread; every CPU peak sample is a known number."""
  samples = []

  def matmul_flops():
    samples.append(1e9 * (len(samples) + 1))
    return samples[-1]

  workdir = str(tmp_path_factory.mktemp("plain"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(flops, "matmul_flops", matmul_flops)
    final = train_and_evaluate(mlp(12, prefetch=0), workdir)
  return workdir, final, samples


def test_prefetching_loop_matches_the_plain_loop_and_resumes_exactly(plain_run, tmp_path):
  workdir, final, _ = plain_run
  # Prefetched batches, stopped at step 6 and resumed: the same metrics, bit for bit.
  train_and_evaluate(mlp(6, prefetch=2), str(tmp_path))
  assert train_and_evaluate(mlp(12, prefetch=2), str(tmp_path)) == final
  assert records(tmp_path) == records(workdir)
  # Deferred writes keep the schedule and the order: each log step's train record before its eval.
  assert [(r["step"], r["split"]) for r in records(workdir)] == [
      (1, "train"), (2, "train"), (4, "train"), (6, "train"), (6, "eval"), (8, "train"), (10, "train"),
      (12, "train"), (12, "eval")]


def test_cpu_mfu_divides_by_the_fastest_peak_measured_during_the_run(plain_run):
  workdir, _, samples = plain_run
  # LogTrain.FIRST_PEAKS samples at the first step and one after every LogTrain.PEAK_EVERY-th interval (of 6).
  assert samples == [1e9, 2e9, 3e9, 4e9]
  config = mlp(12, 0)
  model_flops = build_experiment(config).model_flops
  train = [r for r in read_metrics(workdir) if r["split"] == "train" and "mfu" in r]
  for r in train:
    peak = max(samples[:3 + (r["step"] > 10)])
    assert r["mfu"] == pytest.approx(model_flops / (r["step_time_ms"] / 1e3) / peak, rel=1e-6)


def test_eval_sums_accumulate_inside_the_compiled_step():
  config = experiment("digits_mlp")
  config.train.eval_batch_size = 64
  results = []
  for strategy in ("single", "pmap"):
    config.parallel.strategy = strategy
    exp = build_experiment(config)
    state = exp.init_state()
    results.append(exp.evaluate(state))
  assert results[0]["confusion"] == results[1]["confusion"]
  assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
  # The running totals are an input of the step and donated to its output: no sum outside the program.
  exp = build_experiment(experiment("digits_mlp"))
  state = exp.init_state()
  batch = exp.layout.global_batch(next(iter(exp.dataset.eval_batches(256, exp.layout.local_rows(256)))), 256)
  totals = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(exp.eval_step, state, batch, None))
  memory = exp.eval_step.lower(state, batch, totals).compile().memory_analysis()
  assert memory.alias_size_in_bytes == sum(a.nbytes for a in jax.tree.leaves(totals))
