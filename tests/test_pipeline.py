"""Pipeline parallelism (the `stage` mesh axis, jaxmodels/parallel/pipeline.py) on 8 simulated CPU devices and
ahead of time for a TPU topology."""

import re

import jax
import numpy as np
import pytest
from conftest import experiment, topology_devices
from flax import nnx

from jaxmodels import parallel
from jaxmodels.bench import plan
from jaxmodels.config import validate
from jaxmodels.models import transformer
from jaxmodels.parallel import pipeline
from jaxmodels.runs import checkpoint
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.actions import summarize
from jaxmodels.train.experiment import build_experiment

STEPS, LAYERS = 20, 8


def tiny(strategy="single", mesh="", **parallel):
  """A text Transformer LM of 8 layers, d_model 16, batch 16 x 16 tokens in 2 accumulation steps."""
  c = experiment("text_transformer")  # remat=dots
  c.data.seq_len = 16
  c.model.update(dict(num_layers=LAYERS, num_heads=2, d_model=16, d_ff=32, max_len=16))
  c.train.update(dict(batch_size=16, eval_batch_size=16, steps=STEPS, warmup_steps=5, grad_accum_steps=2))
  c.parallel.update(dict(strategy=strategy, mesh=mesh, **parallel))
  return c


def train(config):
  exp = build_experiment(config)
  state, metrics = exp.init_state(), []
  for step in range(STEPS):
    state, m = exp.train_step(state, exp.batch(step))
    metrics.append(m)
  return exp, state, [summarize(np.stack(parallel.fetch([m])))["loss"] for m in metrics]


@pytest.fixture(scope="module")
def runs():
  """20 steps on one device and on stage=4 x data=2 (4 micro-batches, a circular schedule of 2 repeats)."""
  return train(tiny()), train(tiny("dp", "stage=4,data=2", pipeline_microbatches=4, pipeline_repeats=2))


def test_stage4_data2_trains_to_the_single_device_loss_holding_a_quarter_of_the_layers(runs):
  (_, _, single), (exp, state, staged) = runs
  np.testing.assert_allclose(staged, single, rtol=1e-4)
  assert staged[-1] < staged[0] - 0.5  # it learned
  blocks = state.params["stack"]["blocks"]
  for x in jax.tree.leaves(blocks):  # the scanned (L, ...) layout, split on its layer axis over `stage`
    assert x.shape[0] == LAYERS and x.sharding.shard_shape(x.shape)[0] == LAYERS // 4
  hlo = exp.train_step.lower(state, exp.batch(0)).compile().as_text()
  assert "collective-permute" in hlo  # the stages' outputs move on
  entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
  up = blocks["mlp"]["up"]["kernel"]  # (L, D, F): each device's parameter is (L / 4, D, F)
  assert f"f32[{LAYERS // 4},{up.shape[1]},{up.shape[2]}]" in entry
  assert not re.search(rf"f32\[{LAYERS},{up.shape[1]},{up.shape[2]}\]", entry)


def test_a_checkpoint_restores_across_stage_and_no_stage(runs, tmp_path):
  (single_exp, single_state, _), (exp, state, _) = runs
  config = tiny("dp", "stage=4,data=2", pipeline_microbatches=4, pipeline_repeats=2)
  saver = checkpoint.Checkpoints(str(tmp_path / "staged"), config.checkpoint)
  saver.save(STEPS, state, config.to_dict(), wait=True)
  unrolled = tiny()
  unrolled.model.scan_layers = False  # and into the unrolled layout
  for target in (single_exp, build_experiment(unrolled)):
    restored = saver.restore(STEPS, target.checkpoint_state)
    params = restored.params
    if target is not single_exp:
      params = transformer.unrolled_to_scan(params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(state.params))
  saver.close()
  other = checkpoint.Checkpoints(str(tmp_path / "single"), config.checkpoint)
  other.save(STEPS, single_state, tiny().to_dict(), wait=True)
  restored = other.restore(STEPS, exp.checkpoint_state)  # a one-device checkpoint onto the stages
  other.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(single_state.params))
  up = restored.params["stack"]["blocks"]["mlp"]["up"]["kernel"]
  assert up.sharding.shard_shape(up.shape)[0] == LAYERS // 4


def test_bubble_fraction_is_the_schedules_formula():
  assert pipeline.Schedule(4, 8, 2).bubble_fraction == pytest.approx(3 / 19)  # (S - 1) / (N R + S - 1)
  assert pipeline.Schedule(4, 4).bubble_fraction == pytest.approx(3 / 7) and pipeline.Schedule(4, 4).iterations == 7


@pytest.mark.parametrize("change, message", [
    (dict(model=dict(num_layers=6)), "model.num_layers=6 does not divide into stage=4 x parallel.pipeline_repeats=1"),
    (dict(parallel=dict(pipeline_repeats=4)), "does not divide into stage=4 x parallel.pipeline_repeats=4"),
    (dict(parallel=dict(pipeline_microbatches=2)), "parallel.pipeline_microbatches=2 is fewer than the stage=4"),
    (dict(parallel=dict(pipeline_microbatches=5)), "does not split into parallel.pipeline_microbatches=5"),
    (dict(experiment="text_lstm"), "pipeline parallelism \\(stage=4\\) runs the Transformer LM"),
    (dict(experiment="digits_transformer"), "pipeline parallelism \\(stage=4\\) runs the Transformer LM"),
    (dict(model=dict(scan_layers=False)), "with model.scan_layers=True only"),
    (dict(parallel=dict(strategy="pmap")), "pipeline stages need a jit strategy"),
    (dict(model=dict(num_experts=4)), "runs dense Transformers only, not model.num_experts=4"),
])
def test_one_line_refusals(change, message):
  c = tiny("dp", "stage=4,data=2")
  if "experiment" in change:  # another family, or the Transformer classifier
    c = experiment(change.pop("experiment"))
    c.parallel.update(dict(strategy="dp", mesh="stage=4,data=2"))
  for group, values in change.items():
    c[group].update(values)
  with pytest.raises(UserError, match=message):
    validate(c)


def test_a_classifier_stack_refuses_a_stage_mesh():
  model = transformer.TransformerClassifier((8, 8), 10, d_model=8, num_heads=2, num_layers=1, d_ff=8,
                                            rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(strategy="dp", mesh="stage=4,data=2")
  with parallel.activation_sharding(mesh, ()), pytest.raises(ValueError, match="runs the dense Transformer LM"):
    jax.eval_shape(model, jax.ShapeDtypeStruct((8, 8, 8), np.float32))


def test_plan_proposes_stage_meshes_and_one_fits_where_data_parallelism_does_not():
  """A 1.3 G-parameter LM on a v5e:2x2 slice (16 GiB chips): Adam's state replicated (data=4) needs over 20 GiB
  a chip, split into 4 stages a quarter of it; `bench compile` reports the schedule's bubble."""
  topology_devices()
  c = tiny()
  c.model.update(dict(num_layers=8, d_model=4096, num_heads=32, d_ff=8192, max_len=16, remat="full"))
  c.train.update(dict(batch_size=8, eval_batch_size=8, grad_accum_steps=1))
  points = plan.candidates(c, plan.PlanArgs("x.py", [], ["parallel.mesh=stages"], topology="v5e:2x2"))
  assert [p["parallel.mesh"] for p in points] == ["stage=2,fsdp=-1", "stage=4,fsdp=-1"]
  assert all(p["parallel.strategy"] == "fsdp" for p in points)
  records = []
  for mesh, strategy in (("data=4", "dp"), ("stage=4", "dp")):
    point = {"parallel.strategy": strategy, "parallel.mesh": mesh}
    records.append({"setting": plan.label(point), "config": point,
                    **plan.compile_candidate(plan.with_values(c, point), "v5e:2x2")})
  assert [r["status"] for r in records] == ["too big", "fits"]
  ranked, _ = plan.rank(records)
  assert [r["config"]["parallel.mesh"] for r in ranked] == ["stage=4"]
  assert records[1]["pipeline_bubble"] == pytest.approx(3 / 7)  # 4 stages, 4 micro-batches
