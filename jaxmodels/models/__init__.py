"""Flax NNX model families. Research code imports them directly:

    from jaxmodels.models import TransformerConfig, TransformerLM, presets
    model = TransformerLM(vocab_size, TransformerConfig(d_model=256, num_layers=4), rngs=nnx.Rngs(0))
    gpt2 = TransformerLM(50257, presets.config("gpt2"), rngs=nnx.Rngs(0))

Each family has a frozen dataclass config (`MLPConfig`, `CNNConfig`, `LSTMConfig`,
`TransformerConfig`, `ResNetConfig`, `ViTConfig`, `EncoderDecoderConfig`) that validates its fields
(ValueError naming the field); modules take it, or its fields as keyword
arguments, plus a compute `dtype` and a `param_dtype`, and are called as
`model(x, train=..., rngs=...)`, where `rngs` (an `nnx.Rngs` with a `dropout`
stream) is needed only when training with dropout. Language models also have
`init_cache(batch, length)` and `decode(tokens, cache, index)` for compiled
sampling; the encoder-decoder (`EncoderDecoder`, called as `model(source, decoder_input, ...)`) has
`init_cache(source, length)`, `decode` and greedy `generate`. Each refuses what it cannot compute (a sequence
longer than `max_len`, a cache write past its slots, a known token id outside the vocabulary) with a ValueError
naming the sizes. `count_params(model)` counts a model's parameters. `build_model` is the command line's bridge: it
maps the flat `model.*` config group onto the family's dataclass (`family_config`). Each module class names its
config (`TransformerLM.Config`) and the data it models (`tasks`): the protocol of `registry`, which holds the
families by name (`FAMILIES`, `register`) and resolves your own module by import path (`get_family`).
`apply_lora` adds LoRA adapters to any module's Linear layers and `merge_lora` folds them back in (`lora`).
"""

from jaxmodels.models import presets
from jaxmodels.models.cnn import CNN, CNNConfig
from jaxmodels.models.encdec import EncoderDecoder, EncoderDecoderConfig
from jaxmodels.models.lora import LoRALinear, apply_lora, merge_lora
from jaxmodels.models.mlp import MLP, MLPConfig
from jaxmodels.models.params import count_active_params, count_params
from jaxmodels.models.recurrent import LSTMConfig, RecurrentClassifier, RecurrentLM
from jaxmodels.models.registry import FAMILIES, build_family, build_model, family_config, get_family, register
from jaxmodels.models.resnet import ResNet, ResNetConfig
from jaxmodels.models.transformer import (
           TransformerClassifier,
           TransformerConfig,
           TransformerLM,
)
from jaxmodels.models.vit import ViT, ViTConfig

__all__ = ["CNN", "CNNConfig", "EncoderDecoder", "EncoderDecoderConfig", "FAMILIES", "LoRALinear", "LSTMConfig", "MLP",
           "MLPConfig", "RecurrentClassifier", "RecurrentLM",
           "ResNet", "ResNetConfig", "TransformerClassifier", "TransformerConfig", "TransformerLM", "ViT", "ViTConfig",
           "apply_lora", "build_family", "build_model", "count_active_params", "count_params", "family_config",
           "get_family", "merge_lora",
           "presets", "register"]
