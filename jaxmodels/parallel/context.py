"""Context parallelism: each sequence split over the `context` mesh axis, attention by a ring of key/value blocks.

The logical activation axis `activation_length` (a sequence's tokens) maps to the `context` mesh axis
(`parallel.activation_rules`), so every activation of the Transformer LM holds 1/C of each sequence's tokens
on each of the C devices of a context group: embeddings, norms, MLPs and logits need nothing else. Attention
needs every earlier key, so `attention` passes the key/value blocks round the group (ring attention, Liu et al.
2023, arXiv:2310.01889): C steps, each attending to the block in hand while a collective permute brings the
next, the partial results merged by the online softmax (flash attention's, Dao et al. 2022), in float32.

Causal load balancing (the "zigzag" layout of MaxText's `context_parallel_load_balance` and torchtitan's
context parallel): split the sequence into 2C chunks; device i holds chunks i and 2C-1-i (`load_balance_order`).
Under a causal mask a contiguous split gives device C-1 C times device 0's work; with this layout every device
attends to 2C+1 chunk pairs at every C: at the first ring step its own two chunks (3 pairs: the chunk pair
wholly in the future is skipped), then at each of the other C-1 steps exactly 2 of the 4 pairs, the others
being wholly masked: from a device j < i both local chunks see j's first chunk, from j > i the second local
chunk sees both of j's. Every device does the same attention FLOPs, (2C+1) / (4C) of the masked dense work.

The reorder of the batch's tokens, targets and positions is done once per step by the train and eval steps
(`jaxmodels.models.forward.context_order`); the loss sums over tokens, so the logits never go back. Decoding
is out of scope (`TransformerLM.decode` refuses under context parallelism).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.parallel.sharding import active_sharding, activation_spec
from jaxmodels.runtime.errors import UserError

__all__ = ["attention", "check_length", "context_axes", "load_balance", "load_balance_order", "ring_attention",
           "size"]

_LENGTH, _BATCH, _HEADS = "activation_length", "activation_batch", "activation_heads"


def context_axes(mesh, rules) -> tuple[str, ...]:
  """The mesh axes (of size > 1) a sequence's tokens are split over: those `rules` (`activation_rules`'s dict)
  map `activation_length` to."""
  return tuple(a for a in rules.get(_LENGTH, ()) if mesh.shape[a] > 1)


def size() -> int:
  """C, the devices each sequence is split over under the active `activation_sharding`; 1 outside one."""
  active = active_sharding()
  return 1 if active is None else math.prod(active[0].shape[a] for a in context_axes(*active))


def check_length(length: int, context: int, key: str = "the sequence length") -> None:
  """UserError unless `length` tokens split into the 2 x `context` chunks of the load-balanced layout."""
  if context > 1 and length % (2 * context):
    raise UserError(f"{key}={length} is not divisible by 2 x context = {2 * context}: causal load balancing "
                    f"splits each sequence into 2 x context equal chunks")


def load_balance_order(length: int, context: int) -> np.ndarray:
  """The token indices of a sequence of `length` in the load-balanced order (int64, (length,)): chunks 0, 2C-1,
  1, 2C-2, ... of length / 2C tokens, so that device i of the C holds chunks i and 2C-1-i. UserError unless
  2C divides `length`."""
  check_length(length, context)
  chunk = length // (2 * context)
  chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def load_balance(x_BT, context: int):
  """`x_BT` (B, T, ...) with its tokens (axis 1) in `load_balance_order(T, context)`: a static gather of whole
  chunks, local to each device when the sequence axis is not split (as the steps' input batches are)."""
  if context == 1:
    return x_BT
  B, T = x_BT.shape[:2]
  order = load_balance_order(2 * context, context)  # the chunk order
  chunks = x_BT.reshape(B, 2 * context, T // (2 * context), *x_BT.shape[2:])
  return jnp.take(chunks, order, axis=1).reshape(x_BT.shape)


# Recomputed in the backward pass (flash attention's trade): a device keeps its key/value blocks, not the
# probabilities of every ring step.
@jax.checkpoint
def _block(q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
  """One block's unnormalised attention: (out_BKGTH, max_BKGT, sum_BKGT), float32; masked scores count 0."""
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores = scores * q_BTKGH.shape[-1] ** -0.5
  if mask_BTS is not None:
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  # The result does not depend on the subtracted maximum, so its gradient is exactly zero: stop it.
  m = jax.lax.stop_gradient(scores.max(axis=-1))
  p = jnp.exp(scores - m[..., None])
  if mask_BTS is not None:
    p = jnp.where(mask_BTS[:, None, None], p, 0.0)
  out = jnp.einsum("bkgts,bskh->bkgth", p.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32)
  return out, m, p.sum(axis=-1)


def _merge(acc, block):
  """Two partial softmax results for the same queries, combined (the online softmax's rescaling)."""
  (o1, m1, l1), (o2, m2, l2) = acc, block
  m = jnp.maximum(m1, m2)
  a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
  return o1 * a1[..., None] + o2 * a2[..., None], m, l1 * a1 + l2 * a2


def _empty(q_BTKGH):
  B, T, K, G, H = q_BTKGH.shape
  return (jnp.zeros((B, K, G, T, H), jnp.float32), jnp.full((B, K, G, T), jnp.finfo(jnp.float32).min),
          jnp.zeros((B, K, G, T), jnp.float32))


def _segments(q_ids, k_ids):
  return None if q_ids is None else q_ids[:, :, None] == k_ids[:, None, :]


def _both(a, b):
  return b if a is None else a if b is None else a & b


def ring_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, axis, context: int, causal: bool,
                   load_balanced: bool = True):
  """Attention of one device's share of the sequences, inside `jax.shard_map` over the context `axis` (a mesh
  axis name or a tuple of them, of `context` devices in all); returns out_BTNH (q's dtype).

  q_BTNH, k_BTKH, v_BTKH: this device's T = (sequence length) / C tokens, K key/value heads serving N = K x G
  query heads; `segment_ids_BT` (int, optional): a query attends only to keys of its own segment. The tokens
  are in `load_balance_order` (`load_balanced`; T even) or contiguous (device i holds the i-th 1/C). `causal`:
  a query attends to keys at or before it in the sequence, which the ring's block structure decides (its
  RoPE positions may restart per segment). Each of the C steps attends to the key/value block in hand and
  passes it (with its segment ids) to the next device by `jax.lax.ppermute`. Causal and load-balanced, the
  wholly masked blocks are skipped (module docstring); otherwise every step computes its whole masked block.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  q = q_BTNH.reshape(B, T, K, N // K, H)
  i = jax.lax.axis_index(axis)
  ring = [(d, (d + 1) % context) for d in range(context)]
  skip = causal and load_balanced
  half = T // 2
  tril = jnp.tril(jnp.ones((half, half), bool))[None] if skip else None
  # Query parts with their accumulators: the two chunks when blocks are skipped, else the whole share.
  parts = [q[:, :half], q[:, half:]] if skip else [q]
  q_ids = segment_ids_BT
  q_id_parts = [None, None] if q_ids is None else [q_ids[:, :half], q_ids[:, half:]]
  accs = [_empty(p) for p in parts]
  kv = (k_BTKH, v_BTKH, segment_ids_BT)
  for step in range(context):
    k, v, k_ids = kv
    j = (i - step) % context  # the device whose keys are in hand
    if skip:
      ka, kb, va, vb = k[:, :half], k[:, half:], v[:, :half], v[:, half:]
      ka_ids, kb_ids = (None, None) if k_ids is None else (k_ids[:, :half], k_ids[:, half:])
      if step == 0:  # own chunks a = i and b = 2C-1-i: (a, a) and (b, b) causal, (b, a) whole, (a, b) future
        accs[0] = _merge(accs[0], _block(parts[0], ka, va, _both(tril, _segments(q_id_parts[0], ka_ids))))
        accs[1] = _merge(accs[1], _block(parts[1], ka, va, _segments(q_id_parts[1], ka_ids)))
        accs[1] = _merge(accs[1], _block(parts[1], kb, vb, _both(tril, _segments(q_id_parts[1], kb_ids))))
      else:  # (b, j's first chunk) always; then (a, j's first) from j < i, (b, j's second) from j > i
        accs[1] = _merge(accs[1], _block(parts[1], ka, va, _segments(q_id_parts[1], ka_ids)))
        earlier = j < i
        pick = lambda x, y: jnp.where(earlier, x, y)
        qs = pick(parts[0], parts[1])
        q_ids_s = None if q_ids is None else pick(q_id_parts[0], q_id_parts[1])
        ks_ids = None if k_ids is None else pick(ka_ids, kb_ids)
        block = _block(qs, pick(ka, kb), pick(va, vb), _segments(q_ids_s, ks_ids))
        accs = [jax.tree.map(lambda new, old: jnp.where(take, new, old), _merge(acc, block), acc)
                for acc, take in ((accs[0], earlier), (accs[1], ~earlier))]
    else:
      mask = _segments(q_ids, k_ids)
      if causal:  # contiguous shares: compare the tokens' places in the sequence
        rows = i * T + jnp.arange(T)
        cols = j * T + jnp.arange(T)
        mask = _both(mask, (rows[:, None] >= cols[None, :])[None])
      accs[0] = _merge(accs[0], _block(q, k, v, mask))
    if step < context - 1:
      kv = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring), kv)
  o = jnp.concatenate([a[0] for a in accs], axis=3)
  l = jnp.concatenate([a[2] for a in accs], axis=3)
  out_BKGTH = jnp.where(l[..., None] > 0, o / jnp.maximum(l, 1e-30)[..., None], 0.0)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def attention(q_BTNH, k_BTKH, v_BTKH, *, causal: bool, segment_ids_BT=None, load_balanced: bool = True):
  """Context-parallel attention of whole-sequence arrays under the active `activation_sharding`: q_BTNH,
  k_BTKH, v_BTKH (T the sequence length, tokens in `load_balance_order` when `load_balanced`), the tokens split
  over the mesh axes `activation_length` maps to, the batch and heads as `activation_batch` and
  `activation_heads` map them (heads whole where the K key/value heads cannot split like the N query heads).
  `segment_ids_BT` (int, optional) restricts each query to keys of its own segment. Returns out_BTNH.

  Runs `ring_attention` on each device's share (`jax.shard_map`). Raises ValueError outside an
  `activation_sharding` whose `activation_length` is split, or where the split cannot hold (see the message).
  """
  active = active_sharding()
  if active is None or not context_axes(*active):
    raise ValueError("context-parallel attention needs an activation_sharding that splits activation_length "
                     "over a mesh axis of size > 1")
  mesh, rules = active
  axes = context_axes(mesh, rules)
  context = math.prod(mesh.shape[a] for a in axes)
  if segment_ids_BT is not None and segment_ids_BT.ndim != 2:
    raise ValueError(f"context-parallel attention takes (B, T) segment ids, not a mask of shape "
                     f"{segment_ids_BT.shape}")
  names = (_BATCH, _LENGTH, _HEADS)
  specs = [tuple(activation_spec(a.shape, names, mesh, rules)) + (None,) * 4 for a in (q_BTNH, k_BTKH)]
  want = axes[0] if len(axes) == 1 else axes
  if specs[0][1] != want:
    raise ValueError(f"sequence length {q_BTNH.shape[1]} cannot be split over mesh axes {axes} (activation_length) "
                     f"after the batch took its axes: got {specs[0][1]!r}")
  heads = specs[0][2] if specs[0][2] == specs[1][2] else None
  spec = jax.sharding.PartitionSpec(specs[0][0], want, heads, None)
  body = functools.partial(ring_attention, axis=want, context=context, causal=causal, load_balanced=load_balanced)
  args = (q_BTNH, k_BTKH, v_BTKH) + (() if segment_ids_BT is None else (segment_ids_BT,))
  in_specs = (spec,) * 3 + (() if segment_ids_BT is None else (jax.sharding.PartitionSpec(spec[0], want),))
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
