"""Mixture-of-experts blocks (jaxmodels.models.moe) and expert parallelism (jaxmodels.parallel.experts)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels.bench.timing import abstract_args
from jaxmodels.models import count_active_params, count_params, moe, presets
from jaxmodels.models.transformer import TransformerConfig, TransformerLM
from jaxmodels.train.experiment import build_experiment


def dense_reference(layer: moe.MoE, x_MD):
  """Every expert on every token (dense matmuls), each output weighted by its routing weight (0 if unchosen)."""
  weights_MK, experts_MK, _ = moe.route(x_MD @ layer.router.kernel[...], layer.k, layer.router_kind)
  y_MD = jnp.zeros_like(x_MD)
  for e in range(layer.num_experts):
    h_MF = jax.nn.silu(x_MD @ layer.gate[e]) * (x_MD @ layer.up[e])
    y_MD += jnp.sum(jnp.where(experts_MK == e, weights_MK, 0.0), -1, keepdims=True) * (h_MF @ layer.down[e])
  return y_MD


def layer_and_input(capacity_factor=0.0, router="softmax"):
  layer = moe.MoE(16, 8, 4, 2, router=router, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
  return layer, jax.random.normal(jax.random.PRNGKey(1), (24, 16))


@pytest.mark.parametrize("router", moe.ROUTERS)
def test_dropless_moe_equals_a_dense_loop_over_experts_forward_and_gradients(router):
  layer, x_MD = layer_and_input(router=router)
  cotangent = jax.random.normal(jax.random.PRNGKey(2), x_MD.shape)
  loss = lambda fn: lambda m, x: jnp.sum(fn(m, x) * cotangent)
  ours, reference = (lambda m, x: m(x)[0]), dense_reference
  np.testing.assert_allclose(ours(layer, x_MD), reference(layer, x_MD), atol=1e-5, rtol=1e-5)
  got, want = (nnx.jit(nnx.grad(loss(fn), argnums=(0, 1)))(layer, x_MD) for fn in (ours, reference))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_is_the_switch_formula_on_a_hand_built_routing():
  # 4 tokens, 2 experts, top-1: experts 0, 0, 0, 1 -> f = (3/4, 1/4); mean probabilities P = (0.6, 0.4).
  probs_ME = jnp.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
  experts_MK = jnp.array([[0], [0], [0], [1]])
  assert moe.load_balancing_loss(probs_ME, experts_MK) == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4))
  uniform = moe.load_balancing_loss(jnp.full((4, 2), 0.5), jnp.array([[0], [1], [0], [1]]))
  assert uniform == pytest.approx(1.0)
  logits_ME = jnp.log(probs_ME) + 1.0  # logsumexp = 1 for every row
  assert moe.router_z_loss(logits_ME) == pytest.approx(1.0, rel=1e-6)


def test_capacity_routing_at_an_ample_capacity_equals_dropless_and_drops_at_a_small_one():
  (dropless, x_MD), (ample, _) = layer_and_input(), layer_and_input(capacity_factor=4.0)
  y, stats = ample(x_MD)
  np.testing.assert_allclose(y, dropless(x_MD)[0], atol=1e-6)
  assert stats["moe_dropped"] == 0
  small, _ = layer_and_input(capacity_factor=0.5)
  y_small, stats_small = small(x_MD)
  assert 0.4 <= stats_small["moe_dropped"] < 1 and not np.allclose(y_small, y, atol=1e-3)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_interleaved_moe_layers_sow_their_losses_for_the_objective(scan_layers):
  c = TransformerConfig(d_model=16, num_heads=2, num_layers=4, d_ff=8, num_experts=4, moe_every=2,
                        num_shared_experts=1, scan_layers=scan_layers, max_len=8)
  model = TransformerLM(32, c, rngs=nnx.Rngs(0))
  blocks = nnx.to_pure_dict(nnx.state(model, nnx.Param))["stack"]["blocks"]
  group = blocks if scan_layers else blocks[0]
  assert "router" in group[1]["mlp"] and "router" not in group[0]["mlp"]  # dense, then MoE
  call = nnx.jit(lambda m, t, train: (m(t, train=train, rngs=nnx.Rngs(dropout=0)), moe.pop_moe_terms(m))[1],
                 static_argnums=2)
  tokens = jnp.arange(16).reshape(2, 8)
  assert call(model, tokens, False) == (None, {})  # evaluation keeps nothing
  penalty, stats = call(model, tokens, True)
  assert sorted(stats) == sorted(moe.MOE_METRICS) and stats["moe_aux_loss"] >= 1.0 - 1e-6
  assert float(penalty) == pytest.approx(0.01 * float(stats["moe_aux_loss"]) + 0.001 * float(stats["moe_z_loss"]))
  with pytest.raises(ValueError, match="moe_every=3: expected a positive divisor of num_layers=4"):
    TransformerConfig(num_layers=4, num_experts=4, moe_every=3)


def moe_text_config(mesh=""):
  c = experiment("text_transformer")
  c.data.update(dict(seq_len=16, tokenizer="byte"))
  c.model.update(dict(num_layers=2, num_heads=2, d_model=32, d_ff=32, max_len=16, num_experts=8,
                      experts_per_token=2))
  c.train.update(dict(batch_size=16, eval_batch_size=16, learning_rate=3e-3))
  c.parallel.update(dict(strategy="dp" if mesh else "single", mesh=mesh))
  return c


def losses_after(config, steps):
  exp = build_experiment(config)
  state = exp.init_state()
  for i in range(steps):
    state, metrics = exp.train_step(state, exp.batch(i))
  exp.stop_loader()
  return exp, state, np.asarray(jax.device_get(metrics))


def test_expert_parallel_train_step_all_to_all_a_quarter_of_the_experts_each_and_single_device_losses():
  mesh = "data=2,expert=4"
  exp, state, metrics = losses_after(moe_text_config(mesh), 20)
  _, _, single = losses_after(moe_text_config(), 20)
  np.testing.assert_allclose(metrics[0], single[0], rtol=1e-4)  # the loss after 20 steps
  up = state.params["stack"]["blocks"]["mlp"]["up"]  # (L, E, D, F)
  assert up.sharding.shard_shape(up.shape) == (2, 2, 32, 32)  # 8 experts / 4: a quarter on each device
  text = exp.train_step.lower(*abstract_args(exp)).compile().as_text()
  assert re.search(r"all-to-all", text)
  # Inside the layer each device multiplies its 2 experts' weights: grouped matmuls over (2, 32, 32) operands.
  assert re.search(r"f32\[2,32,32\]", text)


def test_moe_presets_hold_the_published_total_and_active_parameter_counts():
  # Mixtral 8x7B: 46.7B total, 12.9B active (Jiang et al. 2024); OLMoE-1B-7B: 6.9B total, 1.3B active.
  for name, total, active in (("mixtral-8x7b", 46.7e9, 12.9e9), ("olmoe-1b-7b", 6.9e9, 1.3e9)):
    model = nnx.eval_shape(lambda name=name: presets.build(name, rngs=nnx.Rngs(0)))
    assert round(count_params(model) / 1e8) == round(total / 1e8)
    assert round(count_active_params(model) / 1e8) == round(active / 1e8)
