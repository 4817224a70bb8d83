"""The model families by name: `model.family` -> its typed config and its modules per task, and `build_model`, the
command line's bridge from the flat `model.*` config group to a module.

One registry holds every family, and a family is any module class that follows one protocol:

- it is an `nnx.Module` subclass with a class attribute `Config`, a frozen dataclass whose fields (each with a
  default) are the family's `model.*` keys, and a class attribute `tasks`, the kinds of data it models (default
  ("classify",)): "classify" for array data (data.task classify, binary, multilabel or regress: `num_outputs` logits
  per example), "lm" for token sequences (text, tokens), "seq2seq" for paired sequences (copy, reverse);
- for "classify" it is built as `Module(input_shape, num_outputs, config, dtype=..., param_dtype=..., rngs=...)`
  and for "lm" and "seq2seq" as `Module(vocab_size, config, dtype=..., param_dtype=..., rngs=...)`, plus
  `axis_name=` (the pmap axis, for BatchNorm) when its constructor takes that keyword;
- it is called as `model(x, train=..., rngs=...)` (seq2seq: `model(source, decoder_input, source_mask_BS=...,
  train=..., rngs=...)`; jaxmodels.models.forward) and returns logits;
- optionally, `flops_per_example(input_shape)` gives the training FLOPs (forward and backward) of one example,
  for MFU (jaxmodels.models.flops); without it MFU counts 6 x parameters per example (per token for "lm").

The built-in families register here (`register`); any other is named by import path, `model.family=
package.module:ClassName`, imported when first named (with the current directory on the import path, as
`python -m` has it) and checked against the protocol.
"""


import dataclasses
import functools
import inspect
import re
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.cnn import CNN
from jaxmodels.models.encdec import EncoderDecoder
from jaxmodels.models.mlp import MLP
from jaxmodels.models.recurrent import RecurrentClassifier, RecurrentLM
from jaxmodels.models.resnet import ResNet
from jaxmodels.models.transformer import TransformerClassifier, TransformerLM
from jaxmodels.models.vit import ViT
from jaxmodels.runtime.errors import UserError
from jaxmodels.runtime.imports import import_object, is_import_path

__all__ = ["build_family", "build_model", "check_module", "COMMON_KEYS", "FAMILIES", "Family", "family_config",
           "get_family", "MODEL_TASKS", "module_tasks", "register", "task_refusal"]

MODEL_TASKS = ("classify", "lm", "seq2seq")  # the kinds of data a module declares in `tasks`
# model.* keys of every family (the rest are fields of one or more families' configs).
COMMON_KEYS = ("family", "preset", "dtype", "param_dtype")


@dataclasses.dataclass(frozen=True)
class Family:
  config: type  # the typed config, `Config` of each of its modules
  modules: Mapping[str, type]  # task ("classify", "lm", "seq2seq") -> its module class


FAMILIES: dict[str, Family] = {}  # the registered families by name; import paths resolve to a Family too


def module_tasks(cls) -> tuple:
  """The kinds of data module class `cls` declares (`tasks`; default ("classify",))."""
  return getattr(cls, "tasks", ("classify",))


def check_module(cls, name: str) -> None:
  """Raises ValueError saying how `cls` (named `name`) breaks the module protocol (the module docstring)."""
  if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
    raise ValueError(f"{name} is not an nnx.Module class")
  config = getattr(cls, "Config", None)
  if not (isinstance(config, type) and dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
    raise ValueError(f"{name} has no Config class attribute that is a frozen dataclass")
  for field in dataclasses.fields(config):
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ValueError(f"{name}.Config field {field.name!r} has no default (every field is a model.* key)")
    if field.name in COMMON_KEYS:
      raise ValueError(f"{name}.Config field {field.name!r} is a key of every family: rename it")
  tasks = module_tasks(cls)
  if not (isinstance(tasks, tuple) and tasks and set(tasks) <= set(MODEL_TASKS)):
    raise ValueError(f"{name}.tasks={tasks!r}: expected a tuple of {', '.join(MODEL_TASKS)}")


def register(name: str, *modules: type) -> None:
  """Registers family `name`: its module classes (one per task they declare), which share one `Config`.

  Raises ValueError if a module breaks the protocol or two modules claim one task.
  """
  by_task = {}
  for cls in modules:
    check_module(cls, cls.__name__)
    for task in module_tasks(cls):
      if task in by_task:
        raise ValueError(f"family {name!r}: {by_task[task].__name__} and {cls.__name__} both take {task}")
      by_task[task] = cls
  configs = {cls.Config for cls in modules}
  if len(configs) != 1:
    raise ValueError(f"family {name!r}: its modules have different Config classes")
  FAMILIES[name] = Family(configs.pop(), by_task)


register("mlp", MLP)
register("cnn", CNN)
register("lstm", RecurrentClassifier, RecurrentLM)
register("transformer", TransformerClassifier, TransformerLM)
register("resnet", ResNet)
register("vit", ViT)
register("encdec", EncoderDecoder)


@functools.cache
def _imported(path: str) -> Family:
  key = f"model.family={path!r}"
  obj = import_object(path, "model.family")
  try:
    check_module(obj, path)
  except ValueError as e:
    raise UserError(f"{key}: {e}; see the module protocol in docs/models.md#your-own-module") from None
  return Family(obj.Config, {task: obj for task in module_tasks(obj)})


def get_family(family: str) -> Family:
  """The registered family `family`, or the module at import path `package.module:ClassName`.

  Raises UserError naming `model.family` for an unknown name, a path that does not import, a missing attribute,
  or a class that breaks the module protocol.
  """
  if family in FAMILIES:
    return FAMILIES[family]
  if is_import_path(family):
    return _imported(family)
  raise UserError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}, or an import path "
                  f"package.module:ClassName")


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
  cls = get_family(family).config
  fields = {f.name for f in dataclasses.fields(cls)}
  if defaults is not None:
    for key in sorted(m):
      if key not in COMMON_KEYS and key not in fields and key in defaults and m[key] != defaults[key]:
        raise UserError(f"model.{key}={m[key]!r} does not apply to model.family={family} (its keys: "
                        f"{', '.join(sorted(fields))}); leave it at its default {defaults[key]!r}")
  values = {k: v for k, v in m.items() if k in fields}
  try:
    return family, cls(**values)
  except (ValueError, TypeError) as e:
    raise UserError(_cli_message(str(e), fields)) from None


def task_refusal(family: str, task: str) -> str:
  """Why `family` cannot model `task` data, for a message that names the family first; for a module named by
  import path, it also says how the module declares what it models."""
  own = "" if family in FAMILIES else (f"; your module declares the data it models in its `tasks` attribute "
                                       f"(tasks = ({task!r},): see docs/models.md#your-own-module)")
  if task == "lm":
    lms = " or ".join(n for n, f in FAMILIES.items() if "lm" in f.modules)
    return f"is not a language model: use {lms} for text{own}"
  takes = {"classify": "array data", "lm": "text", "seq2seq": "paired sequences (data.source=copy or reverse)"}
  return (f"does not take {takes[task]}: it takes {' and '.join(takes[t] for t in get_family(family).modules)}; "
          f"families for {takes[task]}: {', '.join(n for n, f in FAMILIES.items() if task in f.modules)}{own}")


def build_family(family: str, config, input_shape, num_outputs: int, *, task: str = "classify", rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, axis_name: str | None = None) -> nnx.Module:
  """The module of `family` (a registered name or an import path) for `task` ("classify", "lm" or "seq2seq"),
  from its typed config. ValueError if the family does not take that task."""
  f = get_family(family)
  if task not in f.modules:
    raise ValueError(f"family={family!r} {task_refusal(family, task)}")
  cls = f.modules[task]
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if "axis_name" in inspect.signature(cls.__init__).parameters:
    kw["axis_name"] = axis_name
  if task == "classify":
    return cls(tuple(input_shape), num_outputs, config, **kw)
  return cls(num_outputs, config, **kw)


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
