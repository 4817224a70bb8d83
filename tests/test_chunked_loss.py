"""The language model's chunked cross-entropy (jaxmodels.tasks.chunked, `train.logits_chunk`): the same loss,
accuracy and gradients as the whole logits, and a compiled train step that holds no (tokens, vocab) float32
logits buffer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmodels.models.transformer import TransformerLM
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.tasks import chunked_loss_sums, loss_sums
from jaxmodels.train.step import StepOptions, make_steps, objective, task_loss

B, T = 3, 8


def tiny_lm(vocab, tied, d_model=16, **fields):
  return TransformerLM(vocab, d_model=d_model, num_heads=2, num_layers=1, d_ff=32, max_len=T,
                       tie_embeddings=tied, rngs=nnx.Rngs(0), **fields)


def batch(vocab, seed=1):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  mask = jnp.ones((B, T), jnp.float32).at[0, 5:].set(0.0).at[2, 2:].set(0.0)  # padding
  return {"x": jax.random.randint(keys[0], (B, T), 0, vocab), "y": jax.random.randint(keys[1], (B, T), 0, vocab),
          "mask": mask}


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("tied, fields, packed", [(True, {}, False), (False, {}, False), (True, {}, True),
                                                  (False, {"final_logit_softcap": 2.0}, True)],
                         ids=["tied", "untied", "packed", "softcapped"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tied, fields, packed):
  # packed: rows holding several documents (segment ids: data.source=sft), which the hidden states must see;
  # softcapped: logits that are more than the head's product, which the loss makes whole.
  vocab = 37  # chunks of 8: four full ones and one of 5
  graphdef, params, model_state = split_model(tiny_lm(vocab, tied, **fields))
  data = batch(vocab)
  if packed:
    data["segment_ids"] = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3, 3, 3], [1] * T], jnp.int32)

  def value_and_grad(chunk):
    fn = objective(graphdef, task_loss(StepOptions(task="lm", logits_chunk=chunk)))
    return jax.value_and_grad(fn, has_aux=True)(params, model_state, data, jax.random.PRNGKey(0))

  (whole, (whole_sums, _)), whole_grads = value_and_grad(0)
  (chunked, (chunked_sums, _)), chunked_grads = value_and_grad(8)
  assert relative_error(whole, chunked) <= 1e-6
  assert float(whole_sums["count"]) == float(chunked_sums["count"]) == B * T - 3 - 6
  errors = jax.tree.map(relative_error, whole_grads, chunked_grads)
  assert max(jax.tree.leaves(errors)) <= 1e-6, errors


def test_chunked_accuracy_and_masked_sums():
  M, D, vocab = 20, 8, 23
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  h_MD, w_DV = jax.random.normal(keys[0], (M, D)), jax.random.normal(keys[1], (D, vocab))
  logits_MV = h_MD @ w_DV
  # Half the labels are the argmax (scattered over every chunk), half random.
  labels_M = jnp.where(jnp.arange(M) % 2 == 0, jnp.argmax(logits_MV, -1), jax.random.randint(keys[2], (M,), 0, vocab))
  mask_M = (jnp.arange(M) < 15).astype(jnp.float32)
  whole = loss_sums("lm", logits_MV, labels_M, mask_M)
  for chunk, vocab_axis, w in ((5, 1, w_DV), (5, 0, w_DV.T), (64, 1, w_DV)):
    sums = chunked_loss_sums(h_MD, w, labels_M, mask_M, chunk, vocab_axis=vocab_axis)
    assert float(sums["correct"]) == float(whole["correct"]) >= 8
    assert float(sums["count"]) == 15.0
    np.testing.assert_allclose(sums["loss_sum"], whole["loss_sum"], rtol=1e-6)


def float32_logits_shapes(hlo: str, vocab: int) -> list[str]:
  """Shapes of the optimized HLO's float32 buffers of B x T x vocab elements, the vocabulary a dimension."""
  return sorted({s for s in re.findall(r"f32\[([\d,]+)\]", hlo)
                 if str(vocab) in s.split(",") and np.prod([int(d) for d in s.split(",")]) == B * T * vocab})


def test_compiled_step_holds_no_whole_float32_logits():
  vocab = 20000  # 24 token rows: whole float32 logits are 1.9 MB, a chunk of 4096 0.4 MB
  model = tiny_lm(vocab, tied=True)
  graphdef, params, model_state = split_model(model)
  tx = optax.adamw(1e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params))

  def compiled(chunk):
    train_step, _ = make_steps(graphdef, tx, StepOptions(task="lm", logits_chunk=chunk))
    return jax.jit(train_step).lower(state, batch(vocab)).compile()

  whole, chunked = compiled(0), compiled(4096)
  assert float32_logits_shapes(whole.as_text(), vocab)  # what the test looks for: (B, T, V) or (B x T, V)
  assert float32_logits_shapes(chunked.as_text(), vocab) == []
  assert chunked.memory_analysis().temp_size_in_bytes < whole.memory_analysis().temp_size_in_bytes
