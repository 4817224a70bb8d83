"""The Hugging Face architectures that convert, one table entry each: config.json <-> TransformerConfig.

    ARCHITECTURES["qwen2"].to_config(json.load(open("config.json")))   # (TransformerConfig, vocabulary size)

Each `Architecture` names its `model_type`, the `transformers` class, the tensor layout (`gpt2`: fused QKV
Conv1D; `llama`: one `nn.Linear` per projection under `model.layers.i.`, shared by every other entry), a
`to_config` reading config.json (UserError for a field whose value it cannot compute) and a `from_config`
writing it back. `architecture_of` picks the entry a jaxmodels model exports as: the first in EXPORT_ORDER
whose `fits` accepts it. The mixture-of-experts entry (Mixtral) maps its expert tensors in `jaxmodels.hf.moe`.

Adding an architecture of the Llama layout: a `to_config` calling `_llama_like(hf, **fields)` with the
TransformerConfig variant fields it sets, a `from_config` calling `_llama_like_json(c, vocab, model_type,
class, **extra json fields)`, a `fits`, and an entry in ARCHITECTURES (and EXPORT_ORDER, before the entries that
would also fit it). Tensor names that differ from Llama's go into `jaxmodels.hf.convert.layer_names`.
"""

import dataclasses
from collections.abc import Callable

from jaxmodels.hf.moe import MIXTRAL, mixtral_config, mixtral_fits, mixtral_hf_config
from jaxmodels.models.transformer import TransformerConfig
from jaxmodels.runtime.errors import UserError

__all__ = ["Architecture", "ARCHITECTURES", "architecture_of", "EXPORT_ORDER"]


@dataclasses.dataclass(frozen=True)
class Architecture:
  model_type: str  # config.json's model_type
  hf_class: str  # the transformers class that loads it (config.json's architectures)
  layout: str  # tensor names: gpt2 | llama (see jaxmodels.hf.convert)
  to_config: Callable[[dict], TransformerConfig]  # config.json -> our config; UserError for what cannot convert
  from_config: Callable[[TransformerConfig, int], dict]  # (our config, vocabulary size) -> config.json
  fits: Callable[[TransformerConfig], bool]  # whether `from_config` describes this model exactly
  norm_offset: float = 0.0  # added to RMSNorm scales on import, taken off on export (Gemma's norms: x (1 + w))


def _refuse(hf: dict, key: str, allowed, default=None) -> None:
  if hf.get(key, default) not in allowed:
    raise UserError(f"config.json: {key}={hf.get(key, default)!r} is not supported (expected one of "
                    f"{', '.join(map(repr, allowed))})")


def _gpt2(hf: dict) -> TransformerConfig:
  _refuse(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
  _refuse(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
  _refuse(hf, "tie_word_embeddings", (True,), True)
  d = hf["n_embd"]
  return TransformerConfig(d_model=d, num_heads=hf["n_head"], num_layers=hf["n_layer"], d_ff=hf.get("n_inner") or 4 * d,
                           max_len=hf["n_positions"], norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           mlp="gelu", positions="learned", use_bias=True, tie_embeddings=True)


def _gpt2_json(c: TransformerConfig, vocab_size: int) -> dict:
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size, "n_embd": c.d_model,
          "n_head": c.num_heads, "n_layer": c.num_layers, "n_inner": c.d_ff, "n_positions": c.max_len,
          "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new", "tie_word_embeddings": True,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


# config.json's rope_type -> rope_scaling, and (our field, its rope_parameters key, default) read for it
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
_ROPE_KEYS = {
    "linear": (("rope_factor", "factor", None),),
    "llama3": (("rope_factor", "factor", None), ("rope_original_max_len", "original_max_position_embeddings", None),
               ("rope_low_freq_factor", "low_freq_factor", None), ("rope_high_freq_factor", "high_freq_factor", None)),
    "yarn": (("rope_factor", "factor", None), ("rope_original_max_len", "original_max_position_embeddings", None),
             ("rope_beta_fast", "beta_fast", 32.0), ("rope_beta_slow", "beta_slow", 1.0),
             ("rope_attention_factor", "attention_factor", None)),
}


def _rope(hf: dict) -> dict:
  """TransformerConfig's rope fields from config.json's rope_parameters (transformers 5) or rope_scaling (4.x)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  _refuse({"rope_type": kind}, "rope_type", tuple(_ROPE_TYPES))
  fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "rope_scaling": _ROPE_TYPES[kind]}
  if kind == "yarn":
    _refuse(rope, "truncate", (True,), True)
    for key in ("mscale", "mscale_all_dim"):
      _refuse(rope, key, (None, 0, 1, 1.0), None)
  for field, key, default in _ROPE_KEYS.get(kind, ()):
    value = rope.get(key) if rope.get(key) is not None else default
    if value is None and key == "original_max_position_embeddings":
      value = hf["max_position_embeddings"]
    if value is None and field != "rope_attention_factor":
      raise UserError(f"config.json: rope_parameters has no {key!r}, which rope_type={kind!r} needs")
    fields[field] = value if field == "rope_original_max_len" or value is None else float(value)
  return fields


def _rope_json(c: TransformerConfig) -> dict:
  kind = {v: k for k, v in _ROPE_TYPES.items()}[c.rope_scaling]
  rope = {"rope_type": kind, "rope_theta": c.rope_theta}
  for field, key, _ in _ROPE_KEYS.get(kind, ()):
    if getattr(c, field) is not None:
      rope[key] = getattr(c, field)
  return rope


_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}  # config.json's hidden_act -> our gated mlp


def _llama_like(hf: dict, activation: str = "silu", **variants) -> TransformerConfig:
  """The config of a Llama-layout model (RMSNorm, gated MLP, rotary, no MLP biases) with `variants` set."""
  _refuse(hf, "hidden_act", (activation,), activation)
  _refuse(hf, "mlp_bias", (False,), False)
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim")
  return TransformerConfig(d_model=d, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                           num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
                           max_len=hf["max_position_embeddings"], norm="rms", norm_eps=hf["rms_norm_eps"],
                           mlp=_ACTIVATIONS[activation], positions="rotary", use_bias=False,
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           head_dim=None if head_dim in (None, d // heads) else head_dim, **_rope(hf), **variants)


def _llama_like_json(c: TransformerConfig, vocab_size: int, model_type: str, hf_class: str, **fields) -> dict:
  return {"model_type": model_type, "architectures": [hf_class], "vocab_size": vocab_size,
          "hidden_size": c.d_model, "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
          "head_dim": c.head_dim or c.d_model // c.num_heads, "num_hidden_layers": c.num_layers,
          "intermediate_size": c.d_ff, "max_position_embeddings": c.max_len, "rms_norm_eps": c.norm_eps,
          "hidden_act": {v: k for k, v in _ACTIVATIONS.items()}[c.mlp], "tie_word_embeddings": c.tie_embeddings,
          "rope_theta": c.rope_theta,
          "rope_parameters": _rope_json(c), **fields}


def _llama(hf: dict) -> TransformerConfig:
  _refuse(hf, "attention_bias", (False,), False)
  return _llama_like(hf)


def _mistral(hf: dict) -> TransformerConfig:
  return _llama_like(hf, sliding_window=hf.get("sliding_window"))


def _qwen(hf: dict, **variants) -> TransformerConfig:
  if hf.get("use_sliding_window"):  # Qwen's windows cover only the layers from max_window_layers on
    raise UserError("config.json: use_sliding_window=True is not supported (expected False: every released Qwen2/3 "
                    "checkpoint attends to its whole context)")
  return _llama_like(hf, **variants)


def _qwen3(hf: dict) -> TransformerConfig:
  _refuse(hf, "attention_bias", (False,), False)
  return _qwen(hf, qk_norm="head")


def _gemma(hf: dict) -> TransformerConfig:
  _refuse(hf, "attention_bias", (False,), False)
  _refuse(hf, "hidden_activation", (None, "gelu_pytorch_tanh"))
  return _llama_like(hf, activation="gelu_pytorch_tanh", embed_scale=True)


def _gemma2(hf: dict) -> TransformerConfig:
  _refuse(hf, "attention_bias", (False,), False)
  _refuse(hf, "hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
  n, window = hf["num_hidden_layers"], hf.get("sliding_window")
  alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  if window is not None and hf.get("layer_types", alternating) != alternating:
    raise UserError(f"config.json: layer_types={hf['layer_types']!r} is not supported (expected sliding and full "
                    f"attention alternating, starting with sliding)")
  return _llama_like({k: v for k, v in hf.items() if k != "hidden_act"}, activation="gelu_pytorch_tanh",
                     embed_scale=True, norm_position="sandwich", sliding_window=window,
                     global_layer_every=2 if window else 0, attn_logit_softcap=hf.get("attn_logit_softcapping"),
                     final_logit_softcap=hf.get("final_logit_softcapping"),
                     attention_scale_dim=float(hf["query_pre_attn_scalar"]))  # an integer in transformers


def _gemma2_json(c: TransformerConfig, vocab_size: int) -> dict:
  h = c.head_dim or c.d_model // c.num_heads
  layer_types = ["sliding_attention" if c.sliding_window and (i + 1) % 2 else "full_attention"
                 for i in range(c.num_layers)]
  hf = _llama_like_json(c, vocab_size, "gemma2", "Gemma2ForCausalLM", attention_bias=False,
                        hidden_activation="gelu_pytorch_tanh", sliding_window=c.sliding_window,
                        layer_types=layer_types, query_pre_attn_scalar=int(c.attention_scale_dim or h),
                        attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap)
  del hf["hidden_act"]
  return hf


def _olmo2(hf: dict) -> TransformerConfig:
  _refuse(hf, "attention_bias", (False,), False)
  return _llama_like(hf, qk_norm="full", norm_position="post")


def _variants(c: TransformerConfig, **expected) -> bool:
  """Whether `c` has the Llama layout with exactly these architecture variants (the others at their defaults;
  "set": any value but None; `...`: any value)."""
  want = {"norm": "rms", "mlp": "swiglu", "positions": "rotary", "use_bias": False, "sliding_window": None,
          "qkv_bias": False, "qk_norm": "none", "norm_position": "pre", "embed_scale": False,
          "global_layer_every": 0, "attn_logit_softcap": None, "final_logit_softcap": None,
          "attention_scale_dim": None, "num_experts": 0, **expected}
  return all(v is ... or (getattr(c, k) is not None if v == "set" else getattr(c, k) == v) for k, v in want.items())


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("gpt2", "GPT2LMHeadModel", "gpt2", _gpt2, _gpt2_json,
                 lambda c: (c.norm, c.mlp, c.positions, c.use_bias, c.tie_embeddings, c.kv_heads, c.head_dim,
                            c.rope_scaling, c.sliding_window, c.qkv_bias, c.qk_norm, c.norm_position) ==
                 ("layer", "gelu", "learned", True, True, c.num_heads, None, "none", None, False, "none", "pre")),
    Architecture("llama", "LlamaForCausalLM", "llama", _llama,
                 lambda c, v: _llama_like_json(c, v, "llama", "LlamaForCausalLM", attention_bias=False,
                                               mlp_bias=False),
                 _variants),
    Architecture("mistral", "MistralForCausalLM", "llama", _mistral,
                 lambda c, v: _llama_like_json(c, v, "mistral", "MistralForCausalLM",
                                               sliding_window=c.sliding_window),
                 lambda c: _variants(c, sliding_window="set") and c.rope_scaling == "none"),
    Architecture("qwen2", "Qwen2ForCausalLM", "llama", lambda hf: _qwen(hf, qkv_bias=True),
                 lambda c, v: _llama_like_json(c, v, "qwen2", "Qwen2ForCausalLM", use_sliding_window=False),
                 lambda c: _variants(c, qkv_bias=True)),
    Architecture("qwen3", "Qwen3ForCausalLM", "llama", _qwen3,
                 lambda c, v: _llama_like_json(c, v, "qwen3", "Qwen3ForCausalLM", attention_bias=False,
                                               use_sliding_window=False),
                 lambda c: _variants(c, qk_norm="head")),
    Architecture("gemma", "GemmaForCausalLM", "llama", _gemma,
                 lambda c, v: _llama_like_json(c, v, "gemma", "GemmaForCausalLM", attention_bias=False),
                 lambda c: _variants(c, mlp="geglu", embed_scale=True) and c.rope_scaling == "none", norm_offset=1.0),
    Architecture("gemma2", "Gemma2ForCausalLM", "llama", _gemma2, _gemma2_json,
                 lambda c: _variants(c, mlp="geglu", embed_scale=True, norm_position="sandwich", sliding_window=...,
                                     global_layer_every=2 if c.sliding_window else 0, attn_logit_softcap=...,
                                     final_logit_softcap=..., attention_scale_dim=...) and c.rope_scaling == "none"
                 and float(c.attention_scale_dim or 0).is_integer(),  # query_pre_attn_scalar: an integer
                 norm_offset=1.0),
    Architecture("olmo2", "Olmo2ForCausalLM", "llama", _olmo2,
                 lambda c, v: _llama_like_json(c, v, "olmo2", "Olmo2ForCausalLM", attention_bias=False),
                 lambda c: _variants(c, qk_norm="full", norm_position="post")),
    # Mistral's attention with a sparse MoE block per layer (its tensors: jaxmodels.hf.moe)
    Architecture(MIXTRAL, "MixtralForCausalLM", "llama", lambda hf: mixtral_config(hf, _mistral(hf)),
                 lambda c, v: mixtral_hf_config(c, _llama_like_json(c, v, MIXTRAL, "MixtralForCausalLM")),
                 lambda c: _variants(c, sliding_window=..., num_experts=...) and mixtral_fits(c)),
)}
# architecture_of's preference
EXPORT_ORDER = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", MIXTRAL)


def architecture_of(config: TransformerConfig) -> Architecture:
  """The architecture a model of `config` exports as; UserError naming the supported ones if none fits."""
  for name in EXPORT_ORDER:
    if ARCHITECTURES[name].fits(config):
      return ARCHITECTURES[name]
  raise UserError(f"this model fits none of the Hugging Face architectures that export ({', '.join(EXPORT_ORDER)}): "
                  "GPT-2 is model.norm=layer, mlp=gelu, positions=learned, use_bias=true, tied; the others are "
                  "norm=rms, mlp=swiglu, positions=rotary, use_bias=false with one of sliding_window (mistral), "
                  "qkv_bias (qwen2), qk_norm=head (qwen3), mlp=geglu + embed_scale (gemma; with "
                  "norm_position=sandwich, gemma2), qk_norm=full + norm_position=post (olmo2), Mixtral's mixture of "
                  "experts (num_experts > 0, moe_every=1, num_shared_experts=0, router=softmax, capacity_factor=0)")
