"""float16 with dynamic loss scaling, the parameter EMA, and Weights & Biases offline tracking (issue 16).

A float16 text transformer trains as well as float32; a forced overflow skips the update and halves the scale;
the EMA follows its closed-form recurrence and is what eval and export use; loss scale and EMA survive a resume
bit for bit; an offline W&B run's files hold the logged config and metrics.
"""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment, read_metrics

from jaxmodels.optim import precision
from jaxmodels.runs import checkpoint
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate


def tiny_lm(dtype: str):
  c = experiment("text_transformer")
  c.model.update(dict(num_layers=1, d_model=16, num_heads=2, d_ff=32, dtype=dtype, remat="none"))
  c.data.update(dict(seq_len=16, prefetch=0))
  c.train.update(dict(steps=200, batch_size=8, warmup_steps=20, loss_scale_period=50))
  return c


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.slow
def test_float16_with_loss_scaling_trains_within_0_05_of_float32():
  final = {}
  for dtype in ("float32", "float16"):
    exp = build_experiment(tiny_lm(dtype))
    state, rows = exp.init_state(), []
    for step in range(200):
      state, metrics = exp.train_step(state, exp.batch(step))
      rows.append(metrics)
    rows = np.stack(jax.device_get(rows))
    final[dtype] = rows[-20:, 0].mean()  # the loss of the last 20 steps
    if dtype == "float16":
      assert state.loss_scale.scale.dtype == jnp.float32
      # The scale adapted: doubled after 50 finite steps, halved at any overflow (that step skipped).
      assert float(state.loss_scale.scale) != precision.INITIAL_SCALE
  assert abs(final["float16"] - final["float32"]) < 0.05, final


def test_overflow_skips_the_update_and_halves_the_scale_then_growth_doubles_it():
  c = experiment("digits_mlp")
  c.model.dtype = "float16"
  c.train.update(dict(loss_scale_period=2, warmup_steps=0))  # a skipped step leaves the schedule's count too
  exp = build_experiment(c)
  state = exp.init_state()
  batch = lambda step: jax.device_put(exp.dataset.train_batch(step, c.train.batch_size))
  huge = 2.0**100  # the float32 loss times this is finite; its float16 gradients overflow
  state = state.replace(loss_scale=precision.LossScale(scale=jnp.float32(huge), good_steps=jnp.int32(1)))
  before = host((state.params, state.opt_state, state.model_state))
  state, metrics = exp.train_step(state, batch(0))
  after = host((state.params, state.opt_state, state.model_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)  # bit-identical: the update was skipped
  assert float(metrics[3]) == 1.0 and np.isfinite(float(metrics[0]))  # skipped; the loss itself is finite
  assert float(state.loss_scale.scale) == huge / 2 and int(state.loss_scale.good_steps) == 0
  assert int(state.step) == 1
  state = state.replace(loss_scale=precision.initial_loss_scale(1024.0))
  state, metrics = exp.train_step(state, batch(1))
  assert float(metrics[3]) == 0.0
  assert float(state.loss_scale.scale) == 1024.0 and int(state.loss_scale.good_steps) == 1
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, host(state.params), before[0])))  # updated
  state, _ = exp.train_step(state, batch(2))
  assert float(state.loss_scale.scale) == 2048.0 and int(state.loss_scale.good_steps) == 0  # 2 finite steps: x2


def test_bfloat16_has_no_loss_scale():
  c = experiment("digits_mlp")
  c.model.dtype = "bfloat16"
  assert jax.eval_shape(build_experiment(c).init_state).loss_scale is None


def test_ema_follows_its_recurrence_and_is_what_eval_uses():
  c = experiment("digits_mlp")
  c.train.ema_decay = 0.75
  exp = build_experiment(c)
  state = exp.init_state()
  ema = host(state.params)
  for step in range(3):
    state, _ = exp.train_step(state, jax.device_put(exp.dataset.train_batch(step, c.train.batch_size)))
    ema = jax.tree.map(lambda e, p: np.float32(0.75) * e + np.float32(0.25) * p, ema, host(state.params))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), host(state.ema_params), ema)
  assert {x.dtype for x in jax.tree.leaves(state.ema_params)} == {jnp.dtype(jnp.float32)}
  with_ema = exp.evaluate(state)["loss"]
  raw = exp.evaluate(state.replace(ema_params=precision.ema_init(state.params)))["loss"]
  assert with_ema != raw
  # The raw parameters play no part in an evaluation with an EMA.
  assert exp.evaluate(state.replace(params=jax.tree.map(jnp.zeros_like, state.params)))["loss"] == with_ema


def read_wandb(path) -> tuple[dict, list[dict]]:
  """(config, history rows) of an offline W&B run file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB
  blocks of records each with a 7-byte header: CRC, length, type) of its `Record` protos."""
  import json  # pylint: disable=import-outside-toplevel

  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    data = f.read()
  pos, chunk, config, history = 7, b"", {}, []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last piece of one
      record = wandb_internal_pb2.Record.FromString(chunk)
      chunk = b""
      kind_name = record.WhichOneof("record_type")
      if kind_name == "run":
        config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
      elif kind_name == "history":
        history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
  return config, history


def test_float16_ema_resume_is_exact_and_tracked_by_wandb_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = experiment("digits_mlp")
  c.model.dtype = "float16"
  c.train.update(dict(steps=12, warmup_steps=2, log_every=3, eval_every=6, loss_scale_period=4, ema_decay=0.9))
  c.checkpoint.every = 6
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  train_and_evaluate(c, str(whole))
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / "12")
  c.train.update(dict(wandb_project="jaxmodels-test", wandb_mode="offline"))
  train_and_evaluate(c, str(resumed))  # resumes at step 6
  exp = build_experiment(c)
  states = []
  for workdir in (whole, resumed):
    ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
    states.append(host(ckpts.restore(12, exp.checkpoint_state)))
    ckpts.close()
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
  assert float(states[0].loss_scale.scale) != precision.INITIAL_SCALE  # it changed, and resumed exactly
  records = read_metrics(str(resumed))
  assert all("loss_scale" in r for r in records if r["split"] == "train")
  # Export: the EMA, in the parameters' dtype.
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxmodels.runs.export import load_run_model  # pylint: disable=import-outside-toplevel
  exported = nnx.to_pure_dict(nnx.state(load_run_model(str(resumed)), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, host(exported), states[0].ema_params)
  # W&B, offline, under the workdir: the config once, every number of every record logged after the resume.
  (path,) = glob.glob(os.path.join(resumed, "wandb", "offline-run-*", "run-*.wandb"))
  config, history = read_wandb(path)
  assert config["train"]["ema_decay"] == 0.9 and config["model"]["dtype"] == "float16"
  logged = {(k, row["step"]): v for row in history for k, v in row.items() if not k.startswith("_") and k != "step"}
  expected = {(f"{r['split']}/{k}", r["step"]): v for r in records if r["step"] > 6 for k, v in r.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
  assert {"train/loss", "train/loss_scale", "eval/loss"} <= {k for k, _ in expected}
  assert logged == pytest.approx(expected)


def test_turning_ema_and_float16_on_at_resume_starts_them_fresh(tmp_path):
  from jaxmodels.train.loop import _restore  # pylint: disable=import-outside-toplevel
  c = experiment("digits_mlp")
  exp = build_experiment(c)
  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(tmp_path), c.checkpoint)
  ckpts.save(5, exp.init_state(), c.to_dict(), wait=True)
  c.model.dtype, c.train.ema_decay = "float16", 0.5
  lines = []
  state, start, _, _ = _restore(build_experiment(c), ckpts, lines.append)
  ckpts.close()
  assert start == 5 and any("starts from its parameters" in line for line in lines)
  jax.tree.map(np.testing.assert_array_equal, host(state.ema_params), host(state.params))
  assert float(state.loss_scale.scale) == precision.INITIAL_SCALE and int(state.loss_scale.good_steps) == 0
