"""Hugging Face Mixtral checkpoints (`MixtralForCausalLM`): Llama's layout with a sparse MoE block per layer.

`jaxmodels.hf.architectures` and `jaxmodels.hf.convert` read and write the Llama part; this module maps the MoE
block:

| jaxmodels (`stack.blocks.<i>.mlp`) | Mixtral (`model.layers.<i>.block_sparse_moe.`)      |
|------------------------------------|-----------------------------------------------------|
| `router.kernel` (D, E)             | `gate.weight` (E, D), transposed                    |
| `gate` (E, D, F)                   | `experts.<e>.w1.weight` (F, D), transposed, stacked |
| `up` (E, D, F)                     | `experts.<e>.w3.weight` (F, D), transposed, stacked |
| `down` (E, F, D)                   | `experts.<e>.w2.weight` (D, F), transposed, stacked |

Mixtral's router takes the top k of a float32 softmax and renormalizes their weights: `router=softmax`.
"""

import dataclasses

import numpy as np

from jaxmodels.models.transformer import TransformerConfig

__all__ = ["MIXTRAL", "mixtral_config", "mixtral_fits", "mixtral_hf_config", "mixtral_mlp_from_hf", "mixtral_mlp_to_hf"]

MIXTRAL = "mixtral"  # config.json's model_type
_EXPERT_WEIGHTS = (("gate", "w1"), ("up", "w3"), ("down", "w2"))  # (ours, Mixtral's)


def mixtral_config(hf: dict, llama: TransformerConfig) -> TransformerConfig:
  """The TransformerConfig of a Mixtral config.json, from the config `llama` of its attention and norms."""
  return dataclasses.replace(llama, num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
                             router="softmax", aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.02)))


def mixtral_fits(config: TransformerConfig) -> bool:
  """Whether a mixture of experts is Mixtral's: every block MoE, no shared experts, a softmax top-k router,
  dropless."""
  c = config
  return c.num_experts > 0 and (c.moe_every, c.num_shared_experts, c.router, c.capacity_factor) == (1, 0, "softmax", 0)


def mixtral_hf_config(config: TransformerConfig, llama: dict) -> dict:
  """Mixtral's config.json for `config`, from the Llama config.json `llama` of its attention and norms."""
  return {**llama, "model_type": MIXTRAL, "architectures": ["MixtralForCausalLM"],
          "num_local_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token,
          "router_aux_loss_coef": config.aux_loss_weight, "sliding_window": config.sliding_window}


def mixtral_mlp_from_hf(take, prefix: str, num_experts: int) -> dict:
  """One layer's `mlp` parameters from its tensors (`take(name)` returns and consumes one; `prefix`:
  'model.layers.<i>.')."""
  p = prefix + "block_sparse_moe."
  stack = lambda w: np.stack([take(f"{p}experts.{e}.{w}.weight").T for e in range(num_experts)])
  return {"router": {"kernel": take(p + "gate.weight").T}, **{ours: stack(hf) for ours, hf in _EXPERT_WEIGHTS}}


def mixtral_mlp_to_hf(mlp: dict, prefix: str) -> dict:
  """One layer's Mixtral tensors from its `mlp` parameters: the inverse of `mixtral_mlp_from_hf`."""
  p = prefix + "block_sparse_moe."
  out = {p + "gate.weight": mlp["router"]["kernel"].T}
  for ours, hf in _EXPERT_WEIGHTS:
    out.update({f"{p}experts.{e}.{hf}.weight": w.T for e, w in enumerate(mlp[ours])})
  return out
