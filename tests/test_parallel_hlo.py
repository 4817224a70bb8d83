"""What each device computes, read from the compiled train step on 8 simulated CPU devices.

Losses cannot tell a step that gives every device its share of the batch from
one that all-gathers the batch and computes everything everywhere: both train
the same. These tests read the optimized HLO (per-device shapes after SPMD
partitioning) and XLA's memory analysis instead. Each configuration compiles
once (module-scoped fixture); nothing runs.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import experiment
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodels import parallel
from jaxmodels.bench.timing import abstract_args
from jaxmodels.parallel.sharding import activation_rules, activation_spec
from jaxmodels.runs.state import TrainState
from jaxmodels.runtime.errors import UserError
from jaxmodels.tasks import loss_sums
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.step import StepOptions, make_steps

TP_MESH = "data=2,tensor=4"
# Transformer: 128 sequences x 16 tokens = 2048 token rows; CNN: 512 digits (activations outweigh weights).
TEXT_BATCH, SEQ_LEN, CNN_BATCH = 128, 16, 512
# Per-device output shape of a matmul or convolution: "%dot.3 = f32[256,256]{1,0} dot(...)".
PRODUCT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+(?:dot|convolution)\(")
ALL_GATHER = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+all-gather(?:-start)?\(")
FLOAT_ALL_GATHER = re.compile(r"=\s*b?f\d+\[([\d,]*)\]\S*\s+all-gather(?:-start)?\(")  # not token ids
# A collective's name and per-device output shape: "%all-reduce.67 = f32[1024,64]{1,0} all-reduce(...".
COLLECTIVE = r"%([\w.-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+{}(?:-start)?\("


def text_config(strategy, mesh="", accum=1):
  c = experiment("text_transformer")
  c.data.update(dict(seq_len=SEQ_LEN, tokenizer="byte"))  # 256 symbols: the vocabulary splits over tensor=4
  c.model.update(dict(num_layers=2, num_heads=4, d_model=64, d_ff=256, max_len=SEQ_LEN))
  c.train.update(dict(batch_size=TEXT_BATCH, eval_batch_size=TEXT_BATCH, grad_accum_steps=accum))
  c.parallel.update(dict(strategy=strategy, mesh=mesh))
  return c


def cnn_config(strategy, mesh="", accum=1):
  c = experiment("digits_cnn")
  c.train.update(dict(batch_size=CNN_BATCH, grad_accum_steps=accum))
  c.parallel.update(dict(strategy=strategy, mesh=mesh))
  return c


def shapes(regex, text):
  return [tuple(int(d) for d in s.split(",") if d) for s in regex.findall(text)]


def compiled_facts(config) -> dict:
  exp = build_experiment(config)
  compiled = exp.train_step.lower(*abstract_args(exp)).compile()
  text = compiled.as_text()
  return {"largest_product": max(math.prod(s) for s in shapes(PRODUCT, text)),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
          "all_gathers": shapes(ALL_GATHER, text), "float_all_gathers": shapes(FLOAT_ALL_GATHER, text), "text": text}


def image_config(name):
  """digits_resnet / digits_vit at the CNN's batch: BatchNorm, residual stages, patches and a class token."""
  def make(strategy, mesh="", accum=1):
    c = experiment(name)
    c.train.update(dict(batch_size=CNN_BATCH, grad_accum_steps=accum))
    c.parallel.update(dict(strategy=strategy, mesh=mesh))
    return c
  return make


CONFIGS = {"text": text_config, "cnn": cnn_config, "resnet": image_config("digits_resnet"),
           "vit": image_config("digits_vit")}
DP, FSDP, DP_ACCUM, TP = ("dp", "", 1), ("fsdp", "", 1), ("dp", "", 2), ("tp", TP_MESH, 1)


@pytest.fixture(scope="module")
def compiled():
  """(family, (strategy, mesh, grad_accum_steps)) -> facts of its compiled step; each compiles once."""
  cache = {}

  def get(family, point):
    if (family, point) not in cache:
      cache[family, point] = compiled_facts(CONFIGS[family](*point))
    return cache[family, point]

  return get


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fsdp_gathers_weights_not_the_batch(compiled, family):
  dp, fsdp = compiled(family, DP), compiled(family, FSDP)
  assert fsdp["largest_product"] <= 1.25 * dp["largest_product"], (fsdp["largest_product"], dp["largest_product"])
  assert fsdp["temp_bytes"] <= 1.25 * dp["temp_bytes"], (fsdp["temp_bytes"], dp["temp_bytes"])
  batch_rows = {TEXT_BATCH, TEXT_BATCH * SEQ_LEN} if family == "text" else {CNN_BATCH, CNN_BATCH * 17}
  # The weights are gathered; no batch-shaped activation is (the embedding lookup gathers the token ids).
  gathered = [s for s in fsdp["float_all_gathers"] if s and s[0] in batch_rows]
  assert fsdp["float_all_gathers"] and not gathered


@pytest.mark.parametrize("family", ["cnn", "text"])
def test_grad_accumulation_halves_each_devices_matmuls(compiled, family):
  accumulated, whole = compiled(family, DP_ACCUM), compiled(family, DP)
  assert accumulated["largest_product"] * 2 == whole["largest_product"]
  assert not accumulated["all_gathers"]  # every micro-batch stays spread over the devices


def test_tensor_parallel_matmuls_are_a_share_like_dp(compiled):
  # data=2 x tensor=4: a half of the batch's rows on each device, a quarter of each wide matmul's columns
  # (heads, MLP, vocabulary). The CNN has no tensor-parallel layers.
  assert compiled("text", TP)["largest_product"] <= 1.25 * compiled("text", DP)["largest_product"]


def reduced_then_split(text, shape, split_shape):
  """Whether `text` reduce-scatters `shape` to `split_shape`: a reduce-scatter, or (XLA's CPU backend has no
  reduce-scatter) an all-reduce of `shape` that an instruction of `split_shape` consumes."""
  dims = lambda s: tuple(int(d) for d in s.split(",") if d)
  if any(dims(s) == split_shape for _, s in re.findall(COLLECTIVE.format("reduce-scatter"), text)):
    return True
  reduced = [n for n, s in re.findall(COLLECTIVE.format("all-reduce"), text) if dims(s) == shape]
  consumer = r"=\s*\w+\[{}\]\S*\s+[\w-]+\([^)]*%{}[,)]"
  return any(re.search(consumer.format(",".join(map(str, split_shape)), re.escape(n)), text) for n in reduced)


def test_tensor_parallel_is_sequence_parallel_between_its_regions(compiled):
  # Megatron sequence parallelism on data=2 x tensor=4: the residual stream, norms, dropout and logits hold
  # 1/8 of the token rows on each device, like dp. Each block all-gathers its tensor group's rows (1/2 of
  # them) before QKV and the MLP, and reduce-scatters the row-parallel projections' partial sums back to 1/8.
  tp, dp = compiled("text", TP), compiled("text", DP)
  d_model, group_rows = 64, TEXT_BATCH * SEQ_LEN // 2
  assert tp["temp_bytes"] <= 1.25 * dp["temp_bytes"], (tp["temp_bytes"], dp["temp_bytes"])
  gathers = [dims for dims in tp["all_gathers"] if dims == (group_rows, d_model)]
  assert len(gathers) >= 2  # attention and the MLP (a scanned stack shows one layer's body)
  assert reduced_then_split(tp["text"], (group_rows, d_model), (group_rows // 4, d_model))


def test_accumulated_gradient_is_the_full_batch_token_mean_under_uneven_masks():
  exp = build_experiment(text_config("single"))
  params = jax.device_get(exp.init_state().params)
  batch = exp.dataset.train_batch(0, 32)
  mask = np.zeros(batch["y"].shape, np.float32)
  for row in range(32):  # uneven target counts in every micro-batch, strided (rows i::4) or contiguous
    mask[row, :1 + (row % 4) * 3 + row // 8] = 1.0
  batch["mask"] = mask

  def loss(p):  # the full batch's token mean, by definition
    model = nnx.merge(exp.graphdef, p, {})
    return loss_sums("classify", model(batch["x"]), batch["y"], mask)["loss_sum"] / mask.sum()

  expected = jax.grad(loss)(params)
  sgd = optax.sgd(1.0)  # one step of plain SGD at rate 1 moves the parameters by minus the gradient
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={}, opt_state=sgd.init(params))
  for accum in (1, 4):
    train_fn, _ = make_steps(exp.graphdef, sgd, StepOptions(seed=0, grad_accum_steps=accum))
    new = jax.jit(train_fn)(state, batch)[0].params
    for p, q, g in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(expected)):
      np.testing.assert_allclose(p - q, g, rtol=1e-4, atol=1e-7)


def test_activation_specs_follow_the_rules_and_vanish_without_a_mesh():
  c = text_config("tp", TP_MESH)
  mesh, rules = parallel.make_mesh(c.parallel), activation_rules(c.parallel.activation_rules)
  spec = lambda shape, names: activation_spec(shape, names, mesh, rules)
  assert spec((8, 16, 4, 8), ("activation_batch", "activation_length", "activation_heads")) == P("data", None,
                                                                                                "tensor", None)
  assert spec((3, 16), ("activation_batch", "activation_vocab")) == P(None, "tensor")  # 2 does not divide 3
  rows = ("activation_batch", "activation_norm_length")  # flattened token rows: batch, then sequence-parallel
  assert spec((64, 256), (rows, "activation_vocab")) == P(("data", "tensor"), None)  # tensor is taken once
  assert spec((2, 256), (rows, "activation_vocab")) == P("data", "tensor")  # 8 does not divide 2 rows
  x = jnp.ones((4, 6))
  assert parallel.constrain(x, ("activation_batch", "activation_mlp")) is x  # no mesh: research code
  c.parallel.activation_rules = (("activation_batch", "model"),)
  with pytest.raises(UserError, match=r"activation_batch maps to unknown mesh axes \['model'\]"):
    build_experiment(c)
