"""Context parallelism (`jaxmodels.parallel.context`) on 8 simulated CPU devices: the ring attention equals plain
attention, causal load balancing splits the attention work evenly, and a Transformer LM on 4,096-token sequences
trains as on one device with a fraction of the per-device memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment, topology_devices
from flax import nnx

from jaxmodels import parallel
from jaxmodels.bench import plan
from jaxmodels.bench.plan import PlanArgs, candidates
from jaxmodels.bench.timing import abstract_args
from jaxmodels.config import validate
from jaxmodels.models.forward import context_order, forward
from jaxmodels.models.transformer import TransformerLM, attention, rotary, segment_mask, segment_positions
from jaxmodels.parallel import context
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.experiment import build_experiment

MESH, C = "data=2,context=4", 4
RULES = (("activation_batch", ("data", "fsdp")), ("activation_length", "context"), ("activation_heads", "tensor"))
LONG, STEPS = 4096, 20


def pinned(fn):
  """`fn` traced with activations pinned to data=2 x context=4 by RULES."""
  return parallel.activation_sharding(parallel.make_mesh(strategy="dp", mesh=MESH), RULES)(fn)


def sharded(fn):
  return jax.jit(pinned(fn))


def test_ring_attention_equals_plain_attention_with_segments_and_rope():
  B, T, N, K, H = 2, 64, 4, 2, 8  # grouped-query: 2 key/value heads for 4 query heads
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, H)) for i, n in enumerate((N, K, K)))
  segments = np.repeat([[1, 2, 3, 4], [1, 1, 2, 0]], T // 4, axis=1)
  segments[1, 5:9] = 7  # a document inside another one's run, and padding (0) at the end
  segments = jnp.asarray(segments, jnp.int32)
  positions = segment_positions(segments)  # RoPE positions restart at each document
  q, k = rotary(q, positions), rotary(k, positions)
  order = context.load_balance_order(T, C)
  # The whole LM too: the step's reorder (context_order) adds positions restarting per document for its RoPE.
  model = TransformerLM(32, d_model=16, num_heads=4, num_kv_heads=2, num_layers=1, d_ff=32, max_len=T,
                        rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (B, T), 0, 32)

  def both(q, k, v, segments, tokens):  # one compile for all three
    return ([context.attention(q, k, v, causal=causal, segment_ids_BT=context.load_balance(segments, C))
             for causal in (True, False)], forward(model, context_order({"x": tokens, "segment_ids": segments})))

  outs, logits = sharded(both)(*(context.load_balance(a, C) for a in (q, k, v)), segments, tokens)
  plain, plain_logits = jax.jit(lambda: (  # one device, the tokens in their order
      [attention(q, k, v, "einsum", is_causal=causal, mask_BNTS=segment_mask(segments, segments))
       for causal in (True, False)], model(tokens, segment_ids_BT=segments)))()
  for out, expected in zip(outs, plain):
    np.testing.assert_allclose(out, expected[:, order], atol=1e-5)
  np.testing.assert_allclose(logits, plain_logits[:, order], atol=1e-5)


def test_causal_load_balancing_gives_every_device_the_same_attention_flops():
  T, H = 256, 128  # a wide head: the matmuls outweigh the softmax's elementwise work
  q = jax.ShapeDtypeStruct((2, T, 2, H), jnp.float32)
  flops = {balanced: sharded(lambda q, balanced=balanced: context.attention(q, q, q, causal=True,
                                                                           load_balanced=balanced))
           .lower(q).compile().cost_analysis()["flops"] for balanced in (True, False)}
  # The causal work is C (2C + 1) of the (2C)^2 chunk pairs; each device's program computes 2C + 1 of them
  # against the 4C of a contiguous split's whole masked blocks: exactly its 1/C share of the causal work.
  assert flops[True] / flops[False] == pytest.approx((2 * C + 1) / (4 * C), rel=0.03)
  # Which (query, key) pairs each device's tokens need: equal shares in the load-balanced order, unequal without.
  pairs = lambda order: [int((order[:, None] >= np.arange(T)[None]).sum()) for order in np.split(order, C)]
  assert len(set(pairs(context.load_balance_order(T, C)))) == 1
  assert pairs(np.arange(T))[-1] > 3 * pairs(np.arange(T))[0]


def lm_config(mesh=""):
  c = experiment("text_transformer")
  c.data.update(dict(seq_len=LONG, tokenizer="byte", prefetch=0))
  c.model.update(dict(num_layers=1, num_heads=1, d_model=16, d_ff=32, max_len=LONG, remat="none"))
  c.train.update(dict(batch_size=2, eval_batch_size=2))
  c.parallel.update(dict(strategy="dp" if mesh else "single", mesh=mesh))
  return c


def test_context4_trains_to_the_single_device_loss_in_a_fraction_of_the_memory():
  """20 steps of 2 x 4,096 tokens on one device and on data=2 x context=4, from one compiled step each: on 8
  devices data parallelism alone stops at one whole sequence per device."""
  losses, temp = {}, {}
  for mesh in ("", MESH):
    exp = build_experiment(lm_config(mesh))
    compiled = exp.train_step.lower(*abstract_args(exp)).compile()
    temp[mesh] = compiled.memory_analysis().temp_size_in_bytes
    if mesh:
      assert "collective-permute" in compiled.as_text()  # the ring passes key/value blocks
    state, losses[mesh] = exp.init_state(), []
    for step in range(STEPS):
      state, metrics = compiled(state, exp.batch(step))
      losses[mesh].append(float(metrics[0]))
  assert temp[MESH] <= 0.35 * temp[""]
  np.testing.assert_allclose(losses[MESH], losses[""], rtol=1e-4)
  assert losses[""][-1] < losses[""][0] - 0.2  # it learned (5.96 to 5.63)


def test_context_parallelism_refusals():
  bad_length = lm_config(MESH)
  bad_length.data.seq_len = 100
  with pytest.raises(UserError, match=r"data.seq_len=100 is not divisible by 2 x context = 8"):
    validate(bad_length)
  cnn = experiment("digits_cnn")
  cnn.parallel.update(dict(strategy="dp", mesh="context=4"))
  with pytest.raises(UserError, match="Transformer LM only"):
    validate(cnn)
  for group, values, named in (("model", dict(sliding_window=8), "model.sliding_window"),
                               ("model", dict(num_experts=4), "model.num_experts=4"),
                               ("parallel", dict(mesh="stage=2,context=4"), "stage=2")):
    combined = lm_config(MESH)
    combined[group].update(values)
    with pytest.raises(UserError, match=f"context parallelism does not combine with {named}"):
      validate(combined)
  model = TransformerLM(16, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16, rngs=nnx.Rngs(0))
  decode = pinned(lambda t: model.decode(t, model.init_cache(2, 16), 0)[0])
  with pytest.raises(ValueError, match="decoding under context parallelism"):
    jax.eval_shape(decode, jnp.zeros((2, 8), jnp.int32))  # refused while tracing: nothing compiles


def test_plan_takes_context_meshes_as_try_values():
  config = lm_config()
  points = candidates(config, PlanArgs("x.py", [], ["parallel.strategy=dp", f"parallel.mesh='{MESH}','data=8'"]))
  assert [p["parallel.mesh"] for p in points] == [MESH, "data=8"]


def test_plan_proposes_context_meshes_and_one_fits_where_data_parallelism_does_not():
  """32 heads over 4 sequences of 8,192 tokens on a v5e:2x2 slice (16 GiB chips), compiled ahead of time: data=4
  holds one whole sequence and its (T, T) attention per chip, over 16 GiB of temporaries; context=4 splits each
  sequence over the 4 chips. The search skips what context parallelism refuses."""
  topology_devices()
  T = 8192
  c = lm_config()
  c.data.seq_len = T
  c.model.update(dict(num_heads=32, d_model=64, max_len=T))
  c.train.update(dict(batch_size=4, eval_batch_size=4))
  search = lambda config: candidates(config, PlanArgs("x.py", [], ["parallel.mesh=contexts"], topology="v5e:2x2"))
  points = search(c)
  assert [(p["parallel.strategy"], p["parallel.mesh"]) for p in points] == [("fsdp", "context=2,fsdp=-1"),
                                                                          ("fsdp", "context=4,fsdp=-1")]
  records = []
  for point in ({"parallel.strategy": "dp", "parallel.mesh": "data=4"}, points[1]):
    records.append({"setting": plan.label(point), "config": point,
                    **plan.compile_candidate(plan.with_values(c, point), "v5e:2x2")})
  assert [r["status"] for r in records] == ["too big", "fits"]
  assert [r["config"]["parallel.mesh"] for r in plan.rank(records)[0]] == ["context=4,fsdp=-1"]
  c.train.batch_size = 1  # context=2 leaves 2 devices, which one sequence does not split over
  assert [p["parallel.mesh"] for p in search(c)] == ["context=4,fsdp=-1"]
  for group, values in (("model", dict(sliding_window=8)), ("model", dict(num_experts=4)),
                        ("data", dict(seq_len=T - 2))):  # not divisible by 2 x 2
    refused = plan.with_values(c, {f"{group}.{k}": v for k, v in values.items()})
    with pytest.raises(UserError, match="--try parallel.mesh=contexts: no split of the 4 device\\(s\\) fits"):
      search(refused)
