"""A language model's softmax cross-entropy that never materialises the whole float32 (tokens, vocab) logits.

`chunked_cross_entropy(h_MD, w, labels_M, chunk)` computes each token's loss and whether its argmax is the label
from the final hidden states and the head's weights, one vocabulary chunk of `chunk` columns at a time: a
chunk's logits (M, chunk) float32 are made, folded into a running log-sum-exp (the online softmax of Milakov
and Gimelshein 2018, arXiv:1805.02867), a running argmax and the label's logit, and dropped. The gradient is a
custom VJP that makes each chunk's logits again from the saved log-sum-exp, so neither pass holds more than one
chunk: for Llama 3.2's 128,256-token vocabulary at 4,096 tokens per chip, 134 MB per 8K chunk instead of 2.1 GB.
The loss and gradients equal the whole-logits softmax cross-entropy within float32 rounding
(tests/test_chunked_loss.py). A last chunk narrower than `chunk` takes the vocabulary's remainder.

`train.logits_chunk` turns it on for language models whose vocabulary is larger than the chunk
(jaxmodels.train.step.task_loss). Written here rather than taken from optax: optax's cross-entropy takes whole
logits.
"""

import functools

import jax
import jax.numpy as jnp

from jaxmodels.runtime.fence import fenced

__all__ = ["chunked_cross_entropy", "chunked_loss_sums"]


def _chunks(vocab: int, chunk: int) -> tuple[int, int]:
  """(full chunks, width of the last partial chunk, 0 if none)."""
  return vocab // chunk, vocab % chunk


def _slice(w, start, size: int, vocab_axis: int):
  if isinstance(start, int):
    return jax.lax.slice_in_dim(w, start, start + size, axis=vocab_axis)
  return jax.lax.dynamic_slice_in_dim(w, start, size, axis=vocab_axis)


def _logits(h_MD, w_chunk, vocab_axis: int, dtype):
  """(M, C) float32 logits of one chunk of the head, its operands in `dtype` (the model's compute dtype)."""
  spec = "md,dc->mc" if vocab_axis == 1 else "md,cd->mc"
  return jnp.einsum(spec, h_MD.astype(dtype), w_chunk.astype(dtype), preferred_element_type=jnp.float32)


def _chunk_of(w, start, size: int, vocab_axis: int):
  """The head's columns [start, start + size), fenced (jaxmodels.runtime.fence): cast to the compute dtype
  here, chunk by chunk, not the whole head ahead of the loop (for Llama 3.2 1B's tied table on a v5e 2x2
  slice, a 0.13 GB bfloat16 copy per chip)."""
  return fenced(_slice(w, start, size, vocab_axis))


def _over_chunks(fn, carry, vocab: int, chunk: int):
  """`carry = fn(carry, start, size)` over the vocabulary's chunks in order: a loop over the full chunks (one
  chunk live at a time), then the partial one."""
  full, rest = _chunks(vocab, chunk)
  if full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: fn(c, i * chunk, chunk), carry)
  return fn(carry, full * chunk, rest) if rest else carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cross_entropy(h_MD, w, labels_M, chunk, vocab_axis, dtype):
  return _forward(h_MD, w, labels_M, chunk, vocab_axis, dtype)[0]


def _forward(h_MD, w, labels_M, chunk, vocab_axis, dtype):
  M = h_MD.shape[0]

  def fold(carry, start, size):
    max_M, sum_M, label_M, argmax_M = carry
    z_MC = _logits(h_MD, _chunk_of(w, start, size, vocab_axis), vocab_axis, dtype)
    chunk_max_M = jnp.max(z_MC, axis=-1)
    new_max_M = jnp.maximum(max_M, chunk_max_M)
    sum_M = sum_M * jnp.exp(max_M - new_max_M) + jnp.sum(jnp.exp(z_MC - new_max_M[:, None]), axis=-1)
    argmax_M = jnp.where(chunk_max_M > max_M, jnp.argmax(z_MC, axis=-1).astype(jnp.int32) + start, argmax_M)
    local_M = labels_M - start
    inside_M = (local_M >= 0) & (local_M < size)
    picked_M = jnp.take_along_axis(z_MC, jnp.clip(local_M, 0, size - 1)[:, None], axis=-1)[:, 0]
    return new_max_M, sum_M, label_M + jnp.where(inside_M, picked_M, 0.0), argmax_M

  init = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M,), jnp.float32),
          jnp.zeros((M,), jnp.int32))
  max_M, sum_M, label_M, argmax_M = _over_chunks(fold, init, w.shape[vocab_axis], chunk)
  lse_M = max_M + jnp.log(sum_M)
  out = (lse_M - label_M, (argmax_M == labels_M).astype(jnp.float32))
  return out, (h_MD, w, labels_M, lse_M)


def _backward(chunk, vocab_axis, dtype, residuals, cotangents):
  h_MD, w, labels_M, lse_M = residuals
  g_M = cotangents[0].astype(jnp.float32)  # the accuracy output has no gradient

  def step(carry, start, size):
    dh_MD, dw = carry
    w_chunk = _chunk_of(w, start, size, vocab_axis)
    z_MC = _logits(h_MD, w_chunk, vocab_axis, dtype)
    # d loss / d z = softmax(z) - onehot(label), per token scaled by its cotangent (the mask, in a masked sum).
    onehot_MC = (labels_M[:, None] - start) == jnp.arange(size)[None, :]
    dz_MC = ((jnp.exp(z_MC - lse_M[:, None]) - onehot_MC) * g_M[:, None]).astype(dtype)
    spec_h, spec_w = ("mc,dc->md", "md,mc->dc") if vocab_axis == 1 else ("mc,cd->md", "md,mc->cd")
    dh_MD = dh_MD + jnp.einsum(spec_h, dz_MC, w_chunk.astype(dtype), preferred_element_type=jnp.float32)
    dw_chunk = jnp.einsum(spec_w, h_MD.astype(dtype), dz_MC, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh_MD, jax.lax.dynamic_update_slice_in_dim(dw, dw_chunk, start, axis=vocab_axis)

  init = (jnp.zeros(h_MD.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
  dh_MD, dw = _over_chunks(step, init, w.shape[vocab_axis], chunk)
  return dh_MD.astype(h_MD.dtype), dw, None


_cross_entropy.defvjp(_forward, _backward)


def chunked_cross_entropy(h_MD, w, labels_M, chunk: int, *, vocab_axis: int = 1, dtype=None):
  """(loss_M, correct_M), both float32 (M,): each token's softmax cross-entropy of the logits h_MD @ w (nats)
  and 1.0 where the logits' argmax (the first, as jnp.argmax) is its label, computed one vocabulary chunk of
  `chunk` logits at a time (the module docstring). Differentiable in `h_MD` and `w` (a custom VJP; the
  accuracy has no gradient).

  `h_MD` (M, D) the final hidden states; `w` the head's weights, (D, V) with `vocab_axis` 1 or (V, D) (a tied
  embedding table) with `vocab_axis` 0; `labels_M` int (M,) in [0, V); `dtype` the matmuls' operand dtype (the
  model's compute dtype; None: h_MD's), accumulated and returned in float32. Raises ValueError for a `chunk`
  below 1 or a `vocab_axis` other than 0 or 1.
  """
  if chunk < 1 or vocab_axis not in (0, 1):
    raise ValueError(f"chunk={chunk}, vocab_axis={vocab_axis}: expected chunk >= 1 and vocab_axis 0 or 1")
  return _cross_entropy(h_MD, w, labels_M.astype(jnp.int32), chunk, vocab_axis, jnp.dtype(dtype or h_MD.dtype))


def chunked_loss_sums(h_MD, w, labels, mask, chunk: int, *, vocab_axis: int = 1, dtype=None) -> dict:
  """`jaxmodels.tasks.loss_sums` of the lm task from hidden states and head weights (`chunked_cross_entropy`'s
  arguments) instead of logits: float32 `loss_sum`, `correct` and `count` over unmasked tokens; `labels` and
  `mask` of any shape holding M elements."""
  loss_M, correct_M = chunked_cross_entropy(h_MD, w, labels.reshape(-1), chunk, vocab_axis=vocab_axis, dtype=dtype)
  mask_M = mask.reshape(-1).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss_M * mask_M), "correct": jnp.sum(correct_M * mask_M), "count": jnp.sum(mask_M)}
