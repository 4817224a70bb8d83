"""Mixture-of-experts feed-forward blocks (MoE): a float32 router sends each token to `experts_per_token` of
`num_experts` MLPs (the family's SwiGLU or GELU), and the token's output is their weighted sum.

Dropless by default (MegaBlocks, Gale et al. 2022): the token x expert assignments are sorted by expert and
each expert multiplies its contiguous rows with one `jax.lax.ragged_dot` (a grouped matmul; no one-hot
tokens x experts x capacity dispatch tensor). With a `capacity_factor` C > 0, an expert takes at most
ceil(C x assignments / experts) of them, in token order (Switch Transformer, Fedus et al. 2021); the rest are
dropped (the token keeps its residual), and the kept rows are still multiplied by `ragged_dot`.

XLA's CPU backend expands `ragged_dot` into one dense matmul over every expert's weights with the other
groups' rows masked (its compiled program multiplies (M, E x D) by (E x D, F)): on a CPU the experts cost E
times their FLOPs, so CPU runs check correctness, not speed.

Under an `expert` mesh axis the experts are split over it and the rows move to their experts' devices and
back with all-to-all collectives (`jaxmodels.parallel.experts`).

Routers (`ROUTERS`): `softmax` takes the top k of the softmax over experts and renormalizes their weights to
sum to 1 (Mixtral); `sigmoid` takes the top k of per-expert sigmoid scores, normalized likewise (DeepSeek-V3).
Training adds two float32 auxiliary losses, both averaged over the MoE layers: the load-balancing loss
(`load_balancing_loss`) and the router z-loss (`router_z_loss`), weighted by `aux_loss_weight` and
`z_loss_weight` (`pop_moe_terms`, which the train step's objective calls).

Shape suffixes: M token rows, D d_model, F d_ff (each expert's hidden width), E experts, K experts per token,
R assignment rows (M x K).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import POSITIVE, axes, choice, require
from jaxmodels.parallel import experts as expert_parallel
from jaxmodels.parallel.sharding import constrain

__all__ = ["capacity", "check_moe_fields", "dispatch", "expert_mlp", "load_balancing_loss", "MoE",
           "moe_block_kwargs", "MOE_METRICS", "moe_period", "MoETerms", "pop_moe_terms", "route", "router_z_loss",
           "ROUTERS"]

ROUTERS = ("softmax", "sigmoid")
# The train step's MoE metrics, each a mean over the MoE layers: the two auxiliary losses (unweighted), the most
# loaded expert's share of the assignments relative to an even share (1.0 = balanced; E = all on one expert),
# and the fraction of assignments dropped by the capacity limit (0 when dropless).
MOE_METRICS = ("moe_aux_loss", "moe_z_loss", "moe_load_max", "moe_dropped")
_BATCH, _EMBED, _ROWS = "activation_batch", "activation_embed", ("activation_batch", "activation_norm_length")


_NON_NEGATIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_NON_NEGATIVE_REAL = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"),
                     "a finite number >= 0")


def check_moe_fields(config) -> None:
  """ValueError naming the first bad MoE field of a TransformerConfig (see its `# Mixture of experts` fields)."""
  require(config, "num_experts", _NON_NEGATIVE)
  if not config.num_experts:
    return
  require(config, "experts_per_token", (lambda v: POSITIVE[0](v) and v <= config.num_experts,
                                        f"an integer from 1 to num_experts={config.num_experts}"))
  require(config, "num_shared_experts", _NON_NEGATIVE)
  require(config, "moe_every", (lambda v: POSITIVE[0](v) and config.num_layers % v == 0,
                                f"a positive divisor of num_layers={config.num_layers}"))
  choice(config, "router", ROUTERS)
  for name in ("capacity_factor", "aux_loss_weight", "z_loss_weight"):
    require(config, name, _NON_NEGATIVE_REAL)
  if config.use_bias:
    raise ValueError("use_bias=True: MoE experts have no biases (set num_experts=0 or use_bias=False)")


def moe_period(config) -> int:
  """`moe_every` for a config with MoE blocks (num_experts > 0), else 0; configs without MoE fields: 0."""
  return config.moe_every if getattr(config, "num_experts", 0) else 0


def moe_block_kwargs(config) -> dict:
  """The `Block` arguments that make a block MoE under `config` ({} without MoE): the `MoE` module's settings
  and the shared experts' total width."""
  if not moe_period(config):
    return {}
  c = config
  return {"moe": {"num_experts": c.num_experts, "experts_per_token": c.experts_per_token, "router": c.router,
                  "capacity_factor": c.capacity_factor},
          "shared_d_ff": c.num_shared_experts * c.d_ff}


def route(logits_ME, k: int, router: str = "softmax"):
  """(weights_MK, experts_MK, probs_ME): each token's k experts (int32, best first), their combination weights
  (float32, summing to 1 per token) and the router's per-expert probabilities (float32, summing to 1 per token:
  the softmax, or the sigmoid scores normalized), all from float32 logits_ME."""
  logits_ME = logits_ME.astype(jnp.float32)
  scores_ME = jax.nn.softmax(logits_ME, axis=-1) if router == "softmax" else jax.nn.sigmoid(logits_ME)
  top_MK, experts_MK = jax.lax.top_k(scores_ME, k)
  weights_MK = top_MK / top_MK.sum(-1, keepdims=True)
  return weights_MK, experts_MK.astype(jnp.int32), scores_ME / scores_ME.sum(-1, keepdims=True)


def load_balancing_loss(probs_ME, experts_MK):
  """The Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2021, eq. 4) for top-k routing:
  E x sum_e f_e P_e, f_e the fraction of the M x K assignments sent to expert e, P_e the mean router probability
  of e over the tokens. 1.0 when both are uniform; float32 scalar."""
  E = probs_ME.shape[-1]
  f_E = jnp.bincount(experts_MK.reshape(-1), length=E).astype(jnp.float32) / experts_MK.size
  return E * jnp.sum(f_E * probs_ME.astype(jnp.float32).mean(0))


def router_z_loss(logits_ME):
  """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)^2, which keeps
  the router's logits small; float32 scalar."""
  return jnp.mean(jax.nn.logsumexp(logits_ME.astype(jnp.float32), axis=-1) ** 2)


def capacity(rows: int, num_experts: int, capacity_factor: float) -> int:
  """Assignments an expert takes: ceil(capacity_factor x rows / num_experts) (Switch Transformer), or all
  `rows` for capacity_factor 0 (dropless)."""
  return rows if capacity_factor == 0 else min(rows, math.ceil(capacity_factor * rows / num_experts))


def expert_mlp(x_RD, group_sizes_G, up_GDF, down_GFD, gate_GDF=None):
  """Each group's rows through its expert's MLP: GELU (gate None) or SwiGLU, by grouped matmuls
  (`jax.lax.ragged_dot`; rows past sum(group_sizes) come out zero). Weights are cast to x_RD's dtype."""
  dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes_G)
  h_RF = jax.nn.gelu(dot(x_RD, up_GDF)) if gate_GDF is None else jax.nn.silu(dot(x_RD, gate_GDF)) * dot(x_RD,
                                                                                                         up_GDF)
  return dot(h_RF, down_GFD)


def dispatch(x_MD, experts_MK, weights_MK, mlp, num_experts: int, capacity_factor: float = 0.0, *,
             axis_name=None, shards: int = 1):
  """(y_MD, kept): the weighted sum of each token's experts' outputs, and how many assignments were kept.

  `mlp(rows_RD, group_sizes)` runs this device's experts (num_experts / shards of them, contiguous) on rows
  sorted by expert. Assignments are sorted by expert; those past an expert's `capacity` are dropped; the rest are
  packed per destination device into equal buffers (the worst case, R rows each: every row to one device) that
  `jax.lax.all_to_all` over `axis_name` exchanges (none when `axis_name` is None: one device holds every
  expert). There each device sorts what it received by its own experts, runs `mlp`, and the results travel back
  the same way. Inside `shard_map` the arguments are one device's tokens.
  """
  M, K = experts_MK.shape
  D, local = x_MD.shape[-1], num_experts // shards
  flat_R = experts_MK.reshape(-1)
  order_R = jnp.argsort(flat_R, stable=True)
  expert_R = flat_R[order_R]
  counts_E = jnp.bincount(flat_R, length=num_experts)
  position_R = jnp.arange(M * K) - (jnp.cumsum(counts_E) - counts_E)[expert_R]  # rank within its expert
  cap = capacity(M * K, num_experts, capacity_factor)
  keep_R = position_R < cap
  rows = min(M * K, local * cap)  # per destination buffer
  dest_R = expert_R // local
  kept_P = jnp.bincount(dest_R, weights=keep_R.astype(jnp.int32), length=shards)
  rank_R = jnp.cumsum(keep_R) - 1 - (jnp.cumsum(kept_P) - kept_P)[dest_R]  # rows sorted by expert: dest-major
  slot_R = jnp.where(keep_R, dest_R * rows + rank_R, shards * rows)  # out of range: dropped
  send_xD = jnp.zeros((shards * rows, D), x_MD.dtype).at[slot_R].set(x_MD[order_R // K], mode="drop")
  send_tag = jnp.full((shards * rows,), local, jnp.int32).at[slot_R].set(expert_R - dest_R * local, mode="drop")
  exchange = ((lambda a: a) if axis_name is None else
              lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True))
  recv_xD, recv_tag = exchange(send_xD), exchange(send_tag)  # rows from every device, each tagged by local expert
  order_tag = jnp.argsort(recv_tag, stable=True)  # empty slots (tag `local`) last
  y_sorted = mlp(recv_xD[order_tag], jnp.bincount(recv_tag, length=local))
  back_xD = exchange(jnp.zeros_like(y_sorted).at[order_tag].set(y_sorted))
  y_RD = back_xD.at[slot_R].get(mode="fill", fill_value=0)  # dropped assignments: zero
  y_MKD = jnp.zeros_like(y_RD).at[order_R].set(y_RD).reshape(M, K, D)
  return jnp.einsum("mkd,mk->md", y_MKD, weights_MK.astype(y_MKD.dtype)), keep_R.sum()


class MoE(nnx.Module):
  """A mixture-of-experts MLP: x_MD (token rows) -> (y_MD, stats).

  `stats`: float32 scalars named by MOE_METRICS (this layer's auxiliary losses, expert load and dropped
  fraction). Router weights (D, E) are float32 computations whatever `dtype`; expert weights are (E, D, F)
  `up` (and `gate` for SwiGLU) and (E, F, D) `down`, logical axes (`expert`, `embed`, `mlp`); experts have no
  biases. ValueError for experts_per_token outside [1, num_experts] or an unknown router.
  """

  def __init__(self, d_model: int, d_ff: int, num_experts: int, experts_per_token: int, *, kind: str = "swiglu",
               router: str = "softmax", capacity_factor: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if not 1 <= experts_per_token <= num_experts:
      raise ValueError(f"experts_per_token={experts_per_token}: expected 1 to num_experts={num_experts}")
    if router not in ROUTERS:
      raise ValueError(f"router={router!r}: expected one of {', '.join(ROUTERS)}")
    self.router = nnx.Linear(d_model, num_experts, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                             kernel_metadata=axes("embed", None), rngs=rngs)
    init = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    param = lambda shape, names: nnx.Param(init(rngs.params(), shape, param_dtype), **axes(*names))
    self.up = param((num_experts, d_model, d_ff), ("expert", "embed", "mlp"))
    self.gate = param((num_experts, d_model, d_ff), ("expert", "embed", "mlp")) if kind == "swiglu" else None
    self.down = param((num_experts, d_ff, d_model), ("expert", "mlp", "embed"))
    self.num_experts, self.k, self.router_kind = num_experts, experts_per_token, router
    self.capacity_factor, self.dtype = capacity_factor, dtype

  def __call__(self, x_MD):
    x_MD = constrain(x_MD, (_BATCH, _EMBED)).astype(self.dtype)
    logits_ME = self.router(x_MD.astype(jnp.float32))
    weights_MK, experts_MK, probs_ME = route(logits_ME, self.k, self.router_kind)
    weights = {"up_GDF": self.up[...], "down_GFD": self.down[...],
               **({} if self.gate is None else {"gate_GDF": self.gate[...]})}
    y_MD, kept = expert_parallel.run(dispatch, expert_mlp, x_MD, experts_MK, weights_MK, weights,
                                     num_experts=self.num_experts, capacity_factor=self.capacity_factor)
    counts_E = jnp.bincount(experts_MK.reshape(-1), length=self.num_experts)
    stats = {"moe_aux_loss": load_balancing_loss(probs_ME, experts_MK), "moe_z_loss": router_z_loss(logits_ME),
             "moe_load_max": jnp.max(counts_E) * self.num_experts / experts_MK.size,
             "moe_dropped": (experts_MK.size - kept) / experts_MK.size}
    return constrain(y_MD, (_ROWS, _EMBED)), {k: v.astype(jnp.float32) for k, v in stats.items()}


class MoETerms(nnx.Intermediate):
  """A training forward pass's (penalty, stats) of a Stack's MoE layers, which `pop_moe_terms` removes."""


def pop_moe_terms(model: nnx.Module):
  """(penalty, stats) of the MoE layers' last training forward pass, removed from `model`: the weighted
  auxiliary losses to add to a per-target mean objective (float32 scalar) and the MOE_METRICS means over layers;
  (None, {}) for a model without MoE layers (or not called in training). `jaxmodels.train.step.objective`
  calls it after the loss function."""
  found = [variable.get_value() for _, variable in nnx.to_flat_state(nnx.pop(model, MoETerms))]
  if not found:
    return None, {}
  penalty, stats = jax.tree.map(lambda *a: sum(a), *found)
  return penalty, {k: v / len(found) for k, v in stats.items()}
