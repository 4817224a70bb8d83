"""Magnitude pruning during training (`train.pruning.*`): an Optax transformation that keeps pruned weights at zero.

Neither optax nor optax.contrib has magnitude pruning, so it is written here, as
a GradientTransformation that `optim.make_optimizer` chains last. Its state holds
the masks (True = kept, shaped like the parameters) and its own step count, so
checkpoints and resumes keep them exactly. At the schedule's mask-update steps it
ranks the current weights by magnitude and keeps the largest; on every step it
returns updates such that `new_params = (params + updates) * mask`, exactly: a
pruned weight is exactly zero after every update, inside the compiled step.

Patterns: `unstructured` (any weights; `global` ranks every prunable weight of
the model together, `layer` each tensor on its own, a scanned Transformer's
stacked kernels per layer) or N:M, e.g. `2:4` (N kept in every M consecutive
weights along a kernel's input axis, -2: NVIDIA's sparse tensor cores' layout).
The sparsity follows Zhu & Gupta's (2017) cubic schedule from `start_step` to
`end_step` (initial sparsity 0); N:M reaches its M - N pruned per group in
stages along it. Embeddings, norm scales and biases are never pruned (by name,
as `decay_mask`), nor N:M kernels whose input axis M does not divide.
"""

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmodels.optim.decay import decay_mask
from jaxmodels.runtime.errors import UserError

__all__ = ["check", "compute_masks", "from_config", "magnitude_pruning", "parse_pattern", "prunable", "prune",
           "PruningState", "SCOPES", "sparsity_at", "sparsity_of", "valid_pattern"]

SCOPES = ("layer", "global")


class PruningState(NamedTuple):
  count: jax.Array  # int32 scalar: updates applied (the schedule's step)
  masks: Any  # bool, shaped like the parameters: True = kept (always True for params that are never pruned)
  sparsity: jax.Array  # float32 scalar: fraction of the prunable weights that are zero after the latest update


def parse_pattern(pattern: str, prefix: str = "train.pruning.") -> tuple[int, int] | None:
  """None for `unstructured`, (n, m) for "n:m" (n kept of every m, 0 < n < m); UserError otherwise (`prefix`: how
  the message names the option, e.g. "--" for `jaxmodels compress`'s flags)."""
  if pattern == "unstructured":
    return None
  n, _, m = pattern.partition(":")
  if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
    raise UserError(f"{prefix}pattern={pattern!r}: expected unstructured or N:M with 0 < N < M (e.g. 2:4)")
  return int(n), int(m)


def valid_pattern(pattern) -> bool:
  try:
    parse_pattern(pattern)
  except UserError:
    return False
  return True


def check(p, prefix: str = "train.pruning.") -> None:
  """Raises UserError for a `train.pruning` group (or `jaxmodels compress --method prune`'s flags: sparsity,
  pattern, scope, start_step, end_step) that cannot run; `prefix` names the options in the message."""
  nm = parse_pattern(p.pattern, prefix)
  if p.scope not in SCOPES:
    raise UserError(f"{prefix}scope={p.scope!r}: expected one of {', '.join(SCOPES)}")
  if not p.sparsity:
    return
  if nm is not None and abs(p.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
    raise UserError(f"{prefix}sparsity={p.sparsity} with pattern {p.pattern}: expected {1 - nm[0] / nm[1]} "
                    f"(= 1 - {nm[0]}/{nm[1]})")
  if nm is not None and p.scope == "global":
    raise UserError(f"{prefix}scope=global ranks weights across tensors: N:M pattern {p.pattern} prunes "
                    f"within each group; use {prefix}scope=layer")
  if p.end_step < p.start_step:
    raise UserError(f"{prefix}end_step={p.end_step} is below {prefix}start_step={p.start_step}")


def sparsity_at(step, final: float, start: int, end: int):
  """Zhu & Gupta's cubic schedule: s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3) for t0 <= t <= t1, 0 before
  t0, s_f after t1 (initial sparsity 0; start == end: s_f from t0 on). `step` a Python or traced int; float32."""
  step = jnp.asarray(step, jnp.float32)
  progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0) if end > start else jnp.float32(1.0)
  return jnp.where(step < start, 0.0, final * (1.0 - (1.0 - progress) ** 3)).astype(jnp.float32)


def prunable(params, pattern: str = "unstructured"):
  """True for the weights pruning may zero: kernels (rank >= 2) that take weight decay with embeddings excluded
  (decay_mask: no biases, norm scales, embeddings, CLS token); for N:M, those whose input axis M divides."""
  nm = parse_pattern(pattern)
  takes_decay = decay_mask(params, decay_embeddings=False)
  return jax.tree.map(lambda d, p: bool(d) and p.ndim >= 2 and (nm is None or p.shape[-2] % nm[1] == 0),
                      takes_decay, params)


def _stacked(path) -> bool:
  """Whether a leaf is a scanned Transformer stack's (layers, ...) array: under `blocks` not keyed by layer."""
  keys = [k for k in path if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey))]
  names = [getattr(k, "key", getattr(k, "idx", None)) for k in keys]
  return "blocks" in names[:-1] and isinstance(names[names.index("blocks") + 1], str)


def _keep_largest(magnitude, sparsity):
  """Bool mask of `magnitude`'s shape keeping all but its floor(sparsity * size) smallest entries (exactly that
  many, ties broken by position; zeros go first, so earlier prunes stay pruned)."""
  flat = magnitude.ravel()
  n = flat.size
  pruned = jnp.floor(sparsity * n).astype(jnp.int32)
  ranks = jnp.zeros(n, jnp.int32).at[jnp.argsort(flat, stable=True)].set(jnp.arange(n, dtype=jnp.int32))
  return (ranks >= pruned).reshape(magnitude.shape)


def _keep_n_of_m(magnitude, sparsity, m: int):
  """Bool mask keeping the largest m - floor(sparsity * m) of every m consecutive entries along axis -2."""
  x = jnp.swapaxes(magnitude, -1, -2)  # (..., out, in)
  groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
  pruned = jnp.floor(sparsity * m + 1e-4).astype(jnp.int32)  # 1e-4: s_f * m is an integer up to rounding
  ranks = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1)
  return jnp.swapaxes((ranks >= pruned).reshape(x.shape), -1, -2)


def compute_masks(params, sparsity, pattern: str = "unstructured", scope: str = "layer"):
  """Masks (bool, like `params`, True = kept) pruning the smallest-magnitude prunable weights to `sparsity`.

  `sparsity` a float32 scalar (traced or not); per tensor (`layer`; per layer of a
  scanned stack), over all prunable weights (`global`), or per N:M group.
  Excluded parameters' masks are all True.
  """
  nm = parse_pattern(pattern)
  keep = prunable(params, pattern)
  magnitudes = jax.tree.map(lambda p: jnp.abs(p.astype(jnp.float32)), params)

  if scope == "global" and nm is None:
    leaves = [m for m, k in zip(jax.tree.leaves(magnitudes), jax.tree.leaves(keep)) if k]
    if not leaves:
      return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    flat_mask = _keep_largest(jnp.concatenate([m.ravel() for m in leaves]), sparsity)
    ends = list(itertools.accumulate(m.size for m in leaves))[:-1]
    pieces = iter(m.reshape(s.shape) for m, s in zip(jnp.split(flat_mask, ends), leaves))
    return jax.tree.map(lambda p, k: next(pieces) if k else jnp.ones(p.shape, bool), params, keep)

  def one(path, magnitude, k):
    if not k:
      return jnp.ones(magnitude.shape, bool)
    if nm is not None:
      return _keep_n_of_m(magnitude, sparsity, nm[1])
    if _stacked(path):
      return jax.vmap(lambda m: _keep_largest(m, sparsity))(magnitude)
    return _keep_largest(magnitude, sparsity)

  return jax.tree_util.tree_map_with_path(one, magnitudes, keep)


def prune(params, sparsity: float, pattern: str = "unstructured", scope: str = "layer"):
  """One-shot magnitude pruning: `params` (a pure dict) with the weights `compute_masks` drops set to exactly zero,
  dtypes kept (`jaxmodels compress --method prune`)."""
  masks = compute_masks(params, jnp.float32(sparsity), pattern, scope)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


def magnitude_pruning(sparsity: float, pattern: str = "unstructured", scope: str = "layer", start_step: int = 0,
                      end_step: int = 0, every: int = 100) -> optax.GradientTransformation:
  """Chain last: masks recomputed from the current weights' magnitudes at steps start_step + k * every (and
  end_step) up to end_step, at `sparsity_at` that step; updates returned make `params + updates` zero where
  masked. `update` needs `params`. Arguments are `train.pruning.*` (checked by `check`)."""

  def init_fn(params):
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    return PruningState(count=jnp.zeros((), jnp.int32), masks=masks, sparsity=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("magnitude_pruning needs the parameters: call update(grads, state, params)")
    t = state.count
    due = (t >= start_step) & (t <= end_step) & (((t - start_step) % every == 0) | (t == end_step))
    masks = jax.lax.cond(due, lambda: compute_masks(params, sparsity_at(t, sparsity, start_step, end_step),
                                                    pattern, scope),
                         lambda: state.masks)
    # params + (-params) is exactly 0 in floating point: the pruned weights are zero, not merely small.
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)), updates, params, masks)
    keep = jax.tree.leaves(prunable(params, pattern))
    new = [p + u for p, u, k in zip(jax.tree.leaves(params), jax.tree.leaves(updates), keep) if k]
    zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in new)
    total = max(sum(x.size for x in new), 1)
    return updates, PruningState(count=t + 1, masks=masks, sparsity=zeros / total)

  return optax.GradientTransformation(init_fn, update_fn)


def from_config(t) -> optax.GradientTransformation | None:
  """The `train.pruning` group's transformation, or None when pruning is off (sparsity 0)."""
  p = t.pruning
  check(p)
  if not p.sparsity:
    return None
  return magnitude_pruning(p.sparsity, p.pattern, p.scope, p.start_step, p.end_step, p.every)


def sparsity_of(opt_state) -> jax.Array | None:
  """The share of prunable weights that are zero (float32 scalar, on the device) in an optimizer state that
  prunes; None otherwise."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState))
           if isinstance(s, PruningState)]
  return found[0].sparsity if found else None