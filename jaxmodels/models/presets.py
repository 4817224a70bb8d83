"""Named model configurations at published sizes: a preset is a family and its typed config.

    from jaxmodels.models import presets
    config = presets.config("gpt2", dropout=0.1)       # a TransformerConfig, overridden field by field
    model = presets.build("resnet50", rngs=nnx.Rngs(0))  # at the reference input and output sizes

On the command line `--config.model.preset=NAME` fills every `model.*` key left at
its default with the preset's value (`config.expand_preset`); keys set in the
experiment or on the command line win. The data decide the vocabulary and class
count; `reference` holds the sizes the published parameter counts are measured at.
"""

import dataclasses

from jaxmodels.models.registry import build_family
from jaxmodels.models.resnet import ResNetConfig
from jaxmodels.models.transformer import TransformerConfig
from jaxmodels.models.vit import ViTConfig

__all__ = ["build", "config", "get", "IMAGENET", "Preset", "PRESETS"]

IMAGENET = dict(input_shape=(224, 224, 3), num_outputs=1000)


@dataclasses.dataclass(frozen=True)
class Preset:
  family: str  # model.family
  config: object  # the family's typed config
  reference: dict  # input_shape (classifiers; for LMs (max_len,)), num_outputs (classes or vocabulary size)
  params: int  # parameters at the reference sizes: the published count (llama-tiny/-small: ours, no paper)
  about: str  # what it is for
  active_params: int | None = None  # mixtures of experts: parameters one token uses (the published count)


def _gpt2(d, layers, heads):
  return TransformerConfig(d_model=d, num_heads=heads, num_layers=layers, d_ff=4 * d, max_len=1024, norm="layer",
                           norm_eps=1e-5, mlp="gelu", positions="learned", use_bias=True, tie_embeddings=True)


def _llama(d, layers, heads, kv_heads, d_ff, max_len, theta=10000.0, tied=False, eps=1e-5, mlp="swiglu", **variants):
  return TransformerConfig(d_model=d, num_heads=heads, num_kv_heads=kv_heads, num_layers=layers, d_ff=d_ff,
                           max_len=max_len, norm="rms", norm_eps=eps, mlp=mlp, positions="rotary",
                           rope_theta=theta, use_bias=False, tie_embeddings=tied, **variants)


def _llama3(d, layers, heads, kv_heads, d_ff, factor, tied):
  """Llama 3.1 / 3.2: 128K context by rope_scaling=llama3 from 8K (Meta's config.json of each release)."""
  return _llama(d, layers, heads, kv_heads, d_ff, 131072, theta=500000.0, tied=tied, rope_scaling="llama3",
                rope_factor=factor, rope_original_max_len=8192, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)


def _mixtral(d, layers, heads, kv_heads, d_ff, experts, k, max_len, theta):
  return dataclasses.replace(_llama(d, layers, heads, kv_heads, d_ff, max_len, theta), num_experts=experts,
                             experts_per_token=k, aux_loss_weight=0.02)


def _vit(d, layers, heads):
  return ViTConfig(patch_size=16, d_model=d, num_heads=heads, num_layers=layers, d_ff=4 * d, norm="layer",
                   norm_eps=1e-6, mlp="gelu", use_bias=True, pooling="cls")


PRESETS = {
    "gpt2": Preset("transformer", _gpt2(768, 12, 12), dict(input_shape=(1024,), num_outputs=50257), 124_439_808,
                   "GPT-2 small (124M): the baseline of nanoGPT and most small-LM papers"),
    "gpt2-medium": Preset("transformer", _gpt2(1024, 24, 16), dict(input_shape=(1024,), num_outputs=50257),
                          354_823_168, "GPT-2 medium (355M)"),
    "llama-tiny": Preset("transformer", _llama(256, 4, 8, 2, 688, 512), dict(input_shape=(512,), num_outputs=32000),
                         19_155_200, "a Llama-style decoder for quick experiments on one host"),
    "llama-small": Preset("transformer", _llama(768, 12, 12, 4, 2048, 2048),
                          dict(input_shape=(2048,), num_outputs=32000), 124_668_672,
                          "a Llama-style decoder of GPT-2 small's width and depth (GQA, untied head)"),
    "tinyllama-1.1b": Preset("transformer", _llama(2048, 22, 32, 4, 5632, 2048),
                             dict(input_shape=(2048,), num_outputs=32000), 1_100_048_384,
                             "TinyLlama 1.1B's architecture (Llama 2 layout, GQA 32/4)"),
    "llama3.2-1b": Preset("transformer", _llama3(2048, 16, 32, 8, 8192, 32.0, tied=True),
                          dict(input_shape=(131072,), num_outputs=128256), 1_235_814_400,
                          "Llama 3.2 1B's architecture (tied head, rope_theta 500000, llama3 rope scaling x32)"),
    "llama3.1-8b": Preset("transformer", _llama3(4096, 32, 32, 8, 14336, 8.0, tied=False),
                          dict(input_shape=(131072,), num_outputs=128256), 8_030_261_248,
                          "Llama 3.1 8B's architecture (GQA 32/8, llama3 rope scaling x8 to 128K)"),
    "mistral-7b": Preset("transformer", _llama(4096, 32, 32, 8, 14336, 32768, sliding_window=4096),
                         dict(input_shape=(32768,), num_outputs=32000), 7_241_732_096,
                         "Mistral 7B v0.1's architecture (GQA 32/8, 4096-token sliding window)"),
    "qwen2.5-0.5b": Preset("transformer", _llama(896, 24, 14, 2, 4864, 32768, theta=1000000.0, tied=True, eps=1e-6,
                                                 qkv_bias=True),
                           dict(input_shape=(32768,), num_outputs=151936), 494_032_768,
                           "Qwen2.5 0.5B's architecture (q/k/v biases, GQA 14/2, tied head)"),
    "gemma2-2b": Preset("transformer", _llama(2304, 26, 8, 4, 9216, 8192, tied=True, eps=1e-6, mlp="geglu",
                                              head_dim=256, embed_scale=True, norm_position="sandwich",
                                              sliding_window=4096, global_layer_every=2, attn_logit_softcap=50.0,
                                              final_logit_softcap=30.0, attention_scale_dim=256.0),
                        dict(input_shape=(8192,), num_outputs=256000), 2_614_341_888,
                        "Gemma 2 2B's architecture (GeGLU, sandwich norms, local/global layers, soft-capping)"),
    "mixtral-8x7b": Preset("transformer", _mixtral(4096, 32, 32, 8, 14336, 8, 2, 32768, 1e6),
                           dict(input_shape=(32768,), num_outputs=32000), 46_702_792_704,
                           "Mixtral 8x7B (Jiang et al. 2024): 8 SwiGLU experts, top-2, GQA 32/8",
                           active_params=12_879_925_248),
    # OLMoE also normalizes queries and keys (RMSNorm, 2 x 2048 per layer) and does not renormalize the top-8
    # weights; this architecture omits both (65,536 parameters fewer than the published 6.92B).
    "olmoe-1b-7b": Preset("transformer", dataclasses.replace(_mixtral(2048, 16, 16, 16, 1024, 64, 8, 4096, 1e4),
                                                             aux_loss_weight=0.01),
                          dict(input_shape=(4096,), num_outputs=50304), 6_919_096_320,
                          "OLMoE-1B-7B's architecture (Muennighoff et al. 2024): 64 experts, top-8",
                          active_params=1_281_951_744),
    "mixtral-tiny": Preset("transformer", _mixtral(64, 2, 4, 2, 128, 8, 2, 256, 1e6),
                           dict(input_shape=(256,), num_outputs=256), 451_904,
                           "a Mixtral-style MoE decoder for tests and CPU experiments (ours, no paper)",
                           active_params=156_992),
    "resnet18": Preset("resnet", ResNetConfig((2, 2, 2, 2), "basic"), IMAGENET, 11_689_512,
                       "ResNet-18 (v1.5); stem=small for 32x32 images"),
    "resnet50": Preset("resnet", ResNetConfig((3, 4, 6, 3), "bottleneck"), IMAGENET, 25_557_032,
                       "ResNet-50 (v1.5), the ImageNet baseline"),
    "vit-s16": Preset("vit", _vit(384, 12, 6), IMAGENET, 22_050_664, "ViT-S/16 (DeiT-S / big_vision's S/16)"),
    "vit-b16": Preset("vit", _vit(768, 12, 12), IMAGENET, 86_567_656, "ViT-B/16"),
}


def get(name: str) -> Preset:
  """The preset called `name`; ValueError naming the known ones otherwise."""
  if name not in PRESETS:
    raise ValueError(f"preset={name!r}: expected one of {', '.join(PRESETS)}")
  return PRESETS[name]


def config(name: str, **overrides):
  """The preset's typed config with `overrides` (field=value) replaced; ValueError for a bad name or field."""
  return dataclasses.replace(get(name).config, **overrides)


def build(name: str, *, rngs, dtype=None, param_dtype=None, **overrides):
  """The preset's module at its reference input and output sizes (under `nnx.eval_shape`: nothing allocated)."""
  p = get(name)
  dtypes = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype).items() if v is not None}
  task = "lm" if p.family == "transformer" else "classify"
  return build_family(p.family, config(name, **overrides), p.reference["input_shape"], p.reference["num_outputs"],
                      task=task, rngs=rngs, **dtypes)
