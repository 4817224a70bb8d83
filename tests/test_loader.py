"""The loader: batches made ahead on a thread and put on the devices, unchanged by prefetching; `bench data`."""

import os

import numpy as np
from conftest import ROOT, experiment

from jaxmodels.cli.main import main
from jaxmodels.data.loader import StepStream, in_order
from jaxmodels.train.experiment import build_experiment


def test_prefetched_device_batches_equal_the_steps_batches_in_order_and_after_jumps():
  c = experiment("digits_mlp")
  c.parallel.strategy = "dp"  # 8 devices: each batch is put on all of them ahead of use
  ahead = build_experiment(c)
  c.data.prefetch = 0
  direct = build_experiment(c)
  for step in (0, 1, 2, 7, 8, 0, 30):
    a, b = ahead.batch(step), direct.batch(step)
    assert a["x"].sharding == b["x"].sharding and len(a["x"].sharding.device_set) == 8
    for k in ("x", "y"):
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  ahead.stop_loader()


def test_step_stream_and_in_order_serve_fn_of_the_step():
  calls = []

  def fn(step):
    calls.append(step)
    return {"step": np.int64(step)}

  s = StepStream(fn, workers=0)
  assert [int(s.get(i)["step"]) for i in (4, 5, 6, 2, 3)] == [4, 5, 6, 2, 3]
  assert calls[:3] == [4, 5, 6] and 7 in calls  # made ahead of the consumer
  s.close()
  assert [int(b["step"]) for b in in_order(fn, 3, 0)] == [0, 1, 2]


def test_bench_data_prints_loader_and_step_rates(capsys):
  path = os.path.join(ROOT, "experiments", "digits_mlp.py")
  assert main(["jaxmodels", "bench", "data", "--config", path, "--steps", "3"]) == 0
  out = capsys.readouterr().out
  loader, step, verdict = out.strip().splitlines()[-3:]
  assert loader.startswith("loader: ") and "batches/s" in loader and "examples/s" in loader
  assert "host loading alone" in loader
  assert step.startswith("step: ") and "examples/s consumed" in step
  assert "the loader keeps up" in verdict or "the input pipeline is the bottleneck" in verdict
