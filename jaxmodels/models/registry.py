"""The model families by name: `model.family` -> its typed config and its modules per task, and `build_model`, the
command line's bridge from the flat `model.*` config group to a module."""


import dataclasses
import re
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.cnn import CNN, CNNConfig
from jaxmodels.models.encdec import EncoderDecoder, EncoderDecoderConfig
from jaxmodels.models.mlp import MLP, MLPConfig
from jaxmodels.models.recurrent import LSTMConfig, RecurrentClassifier, RecurrentLM
from jaxmodels.models.resnet import ResNet, ResNetConfig
from jaxmodels.models.transformer import (
  TransformerClassifier,
  TransformerConfig,
  TransformerLM,
)
from jaxmodels.models.vit import ViT, ViTConfig
from jaxmodels.runtime.errors import UserError


class Family(NamedTuple):
  config: type  # the typed config
  classifier: type | None  # module for task "classify": (input_shape, num_classes, config, ...)
  lm: type | None  # module for task "lm": (vocab_size, config, ...), if the family models text
  seq2seq: type | None = None  # module for task "seq2seq": (vocab_size, config, ...), for paired sequences


FAMILIES = {
    "mlp": Family(MLPConfig, MLP, None),
    "cnn": Family(CNNConfig, CNN, None),
    "lstm": Family(LSTMConfig, RecurrentClassifier, RecurrentLM),
    "transformer": Family(TransformerConfig, TransformerClassifier, TransformerLM),
    "resnet": Family(ResNetConfig, ResNet, None),
    "vit": Family(ViTConfig, ViT, None),
    "encdec": Family(EncoderDecoderConfig, None, None, EncoderDecoder),
}
# model.* keys of every family (the rest are fields of one or more families' configs).
COMMON_KEYS = ("family", "preset", "dtype", "param_dtype")
BATCH_NORM_FAMILIES = ("cnn", "resnet")  # modules that take `axis_name` for BatchNorm under pmap


def _cli_message(message: str, fields) -> str:
  """A config's ValueError with its field names spelled as CLI keys: 'd_model=30 ...' -> 'model.d_model=30 ...'.

  Field names are rewritten where followed by =, /, a comma, a colon or 'and' (how the configs' messages name them).
  """
  names = "|".join(sorted(fields, key=len, reverse=True))
  return re.sub(rf"(?<![\w.])({names})(?=\s*[=/,:]|\s+and\s)", r"model.\1", message)


def family_config(model_config, defaults=None):
  """(family name, typed config) from the flat `model.*` group (a ConfigDict or dict).

  Every `model.*` key that is a field of the family's config is passed to it
  (keys missing from an older saved config take the field's default). A key
  with a value other than its default in `defaults` (the `model` group of
  `jaxmodels.config.default_config()`) that is not a field of the chosen family
  is an error. Raises UserError naming `model.<key>`.
  """
  # A config read back from JSON (config.json of a run) holds lists where the defaults hold tuples.
  m = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(model_config).items()}
  family = m["family"]
  if family not in FAMILIES:
    raise UserError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}")
  cls = FAMILIES[family].config
  fields = {f.name for f in dataclasses.fields(cls)}
  if defaults is not None:
    for key in sorted(m):
      if key not in COMMON_KEYS and key not in fields and key in defaults and m[key] != defaults[key]:
        raise UserError(f"model.{key}={m[key]!r} does not apply to model.family={family} (its keys: "
                        f"{', '.join(sorted(fields))}); leave it at its default {defaults[key]!r}")
  values = {k: v for k, v in m.items() if k in fields}
  try:
    return family, cls(**values)
  except ValueError as e:
    raise UserError(_cli_message(str(e), fields)) from None


def build_family(family: str, config, input_shape, num_outputs: int, *, task: str = "classify", rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, axis_name: str | None = None) -> nnx.Module:
  """The module of `family` for `task`, from its typed config. ValueError if the family has no such task."""
  f = FAMILIES[family]
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if family in BATCH_NORM_FAMILIES:
    kw["axis_name"] = axis_name
  if task == "lm":
    if f.lm is None:
      raise ValueError(f"family={family!r} is not a language model: use transformer or lstm for text")
    return f.lm(num_outputs, config, **kw)
  if (task == "seq2seq") != (f.seq2seq is not None):
    raise ValueError(f"family={family!r} does not fit {task} data: paired sequences (data.source=copy, reverse) "
                     f"take family=encdec, and it takes only them")
  if task == "seq2seq":
    return f.seq2seq(num_outputs, config, **kw)
  return f.classifier(tuple(input_shape), num_outputs, config, **kw)


def build_model(model_config, input_shape, num_outputs: int, rngs: nnx.Rngs, task: str = "classify",
                axis_name: str | None = None):
  """The module named by `model.family` for `task`, sized for `input_shape` and `num_outputs`.

  For "lm" and "seq2seq", `input_shape` is (seq_len,) and `num_outputs` the vocabulary size.
  `axis_name` (the pmap strategy) makes BatchNorm average its statistics over that axis.
  Raises UserError naming the `model.*` key at fault.
  """
  family, config = family_config(model_config)
  if family in ("transformer", "encdec") and task in ("lm", "seq2seq"):
    longest = input_shape[0] + (task == "seq2seq")  # a seq2seq target is the longest source plus EOS
    if longest > config.max_len:
      raise UserError(f"data.seq_len={input_shape[0]} exceeds model.max_len={config.max_len}"
                      + (" - 1 (targets end with EOS)" if task == "seq2seq" else ""))
  try:
    return build_family(family, config, input_shape, num_outputs, task=task, rngs=rngs,
                        dtype=jnp.dtype(model_config["dtype"]), param_dtype=jnp.dtype(model_config["param_dtype"]),
                        axis_name=axis_name)
  except ValueError as e:
    fields = [f.name for f in dataclasses.fields(config)] + ["family"]
    raise UserError(_cli_message(str(e), fields)) from None
