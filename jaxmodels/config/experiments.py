"""Experiment files and `--config.GROUP.KEY=VALUE` overrides: loading, the one override parser, saved configs.

`load_experiment(path, overrides)` runs an experiment file's `get_config()` (which starts from the locked
`default_config()`, so a misspelled key is an error there too), adds the `model.*` keys of a module named by import
path (`add_family_keys`; `set_family` does so inside `get_config`) and applies the overrides;
`parse_experiment_args` does so for a command's `--config PATH` and `--config.K=V` arguments. `apply_overrides`
is the one parser of overrides, used by every command (train, bench and plan, eval's other data, a run's saved
config), and `parse_override`, which it calls for each, parses the values of a `bench compile --sweep` or
`plan --try` too: a value is parsed by the type of the key it replaces.
A run's `config.json` is read back by `from_saved` and `saved_config`.
"""

import ast
import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import traceback
import typing
from collections.abc import Iterable, Mapping

from ml_collections import config_dict

from jaxmodels.config.defaults import default_config
from jaxmodels.config.validate import validate
from jaxmodels.models.registry import FAMILIES, get_family
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["add_family_keys", "apply_overrides", "BOOLEANS", "from_saved", "load_experiment", "OVERRIDE",
           "parse_experiment_args", "parse_override", "pop_config_path", "saved_config", "set_family", "to_json",
           "with_values"]

OVERRIDE = "--config."  # the command-line flag of an override: --config.GROUP.KEY=VALUE
BOOLEANS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}  # absl's spellings


def load_experiment(path: str, overrides: Iterable[str] = ()) -> config_dict.ConfigDict:
  """Imports an experiment file and returns its `get_config()`, locked, with the `model.*` keys of a module named by
  import path added (`add_family_keys`) and `overrides` applied.

  Raises UserError for a missing file, and in one line naming the file and line for an error in it: a syntax
  error, an exception inside `get_config()`, a key that `default_config()` (locked) does not have.
  """
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_jaxmodels_experiment", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise UserError(f"{path} defines no get_config()")
    config = module.get_config()
  except UserError:
    raise
  except Exception as e:  # the user's code: where it failed and why, in one line
    raise UserError(_experiment_error(path, e)) from None
  if not isinstance(config, config_dict.ConfigDict):
    raise UserError(f"{path}: get_config() returned {type(config).__name__}: expected the ConfigDict that "
                    f"default_config() returns")
  config.lock()
  return apply_overrides(add_family_keys(config), overrides)


def _experiment_error(path: str, e: Exception) -> str:
  """'PATH:LINE: what went wrong' for an exception raised while running experiment file `path`."""
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == os.path.abspath(path):
    return f"{path}:{e.lineno}: {type(e).__name__}: {e.msg}"
  frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f"{path}:{frames[-1].lineno}" if frames else path
  text = str(e)
  if isinstance(e, (KeyError, AttributeError)) and e.args:  # ConfigDict's: a KeyError('text') inside either
    inner = e.args[0]
    text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
  missing = re.match(r'Key "(\w+)" does not exist and cannot be added since the config is locked', text)
  if missing:  # a ConfigDict locked by default_config(): a misspelled key
    close = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
    line = f" ({frames[-1].line})" if frames and frames[-1].line else ""
    return (f"{where}{line}: {missing.group(1)!r} is not a key of the config (default_config() has every key)."
            + (f" {close.group(0)}" if close else ""))
  return f"{where}: {type(e).__name__}: {' '.join(text.split())}"


def add_family_keys(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """`config` with the `model.*` keys of its `model.family`'s Config added, at their defaults, where it lacks them
  (a module named by import path, package.module:ClassName); in place, and returned. A key set already keeps its
  value; the built-in families' keys are all in `default_config()`.

  Raises UserError naming `model.family` for a family that does not resolve (jaxmodels.models.get_family) and for
  a Config field named as a key of `default_config().model` whose default or type differs from that key's.
  """
  model = config.model
  if model.family in FAMILIES:
    return config
  cls = get_family(model.family).config
  defaults = default_config().model
  hints = _type_hints(cls)
  for field in dataclasses.fields(cls):
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if field.name in defaults:
      known = defaults[field.name]
      if type(value) is not type(known) or value != (tuple(known) if isinstance(known, list) else known):
        raise UserError(f"model.family={model.family}: its Config field {field.name}={value!r} is also the key "
                        f"model.{field.name} of the built-in families, whose default is {known!r}: give the field "
                        f"that default or another name")
      continue
    if field.name not in model:
      with model.unlocked():
        model[field.name] = _typed_default(value, hints.get(field.name))
  return config


def _type_hints(cls) -> dict:
  try:
    return typing.get_type_hints(cls)
  except Exception:  # an annotation that does not resolve: keys then take the types of their defaults
    return {}


def _typed_default(value, hint):
  """A Config field's default as a ConfigDict value: a None default of `X | None` (X a scalar or tuple type) is a
  placeholder of X, so overrides parse as X; any other value types itself."""
  kinds = [a for a in typing.get_args(hint) if a is not type(None)]
  if value is None and len(kinds) == 1 and kinds[0] in (bool, int, float, str, tuple):
    return config_dict.placeholder(kinds[0])
  return value


def set_family(config: config_dict.ConfigDict, family: str) -> None:
  """Sets `model.family` (a built-in family or `package.module:ClassName`) and adds its module's `model.*` keys
  (`add_family_keys`), in place, so that an experiment file can set them next:

      set_family(c, "mixer:Mixer")
      c.model.depth = 4

  Raises UserError naming `model.family` for a family that does not resolve.
  """
  config.model.family = family
  add_family_keys(config)


def to_json(config: config_dict.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_saved(saved: dict) -> config_dict.ConfigDict:
  """A run's saved config (its config.json as a dict) over today's defaults.

  Keys added to jaxmodels after the run was saved take their defaults (every new
  feature is off by default), so older runs still evaluate, export, compress and
  teach; every saved value wins, including keys jaxmodels no longer has.
  """
  def merge(defaults: dict, values: dict) -> dict:
    out = dict(defaults)
    for key, value in values.items():
      both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
      out[key] = merge(defaults[key], value) if both else value
    return out

  return config_dict.ConfigDict(merge(default_config().to_dict(), saved))


def pop_config_path(args: list[str]) -> tuple[str, list[str]]:
  """Takes `--config PATH` / `--config=PATH` out of args (overrides `--config.K=V` stay)."""
  rest, path = [], None
  it = iter(args)
  for a in it:
    if a in ("--config", "-config"):
      path = next(it, None)
    elif a.startswith(("--config=", "-config=")):
      path = a.split("=", 1)[1]
    else:
      rest.append(a)
  if not path:
    raise UserError("missing --config PATH (an experiment file such as experiments/digits_cnn.py)")
  return path, rest


def parse_experiment_args(args: list[str]) -> tuple[config_dict.ConfigDict, str, list[str]]:
  """(config, experiment file, the other arguments) of a command's `--config PATH` and `--config.K=V` overrides.

  The config is the experiment's with the overrides applied, validated before a multi-process job is joined or
  anything is loaded; the other arguments are the command's own flags.
  """
  path, rest = pop_config_path(args)
  config = load_experiment(path, [a for a in rest if a.startswith(OVERRIDE)])
  validate(config)
  return config, path, [a for a in rest if not a.startswith(OVERRIDE)]


def apply_overrides(config: config_dict.ConfigDict, overrides: Iterable[str]) -> config_dict.ConfigDict:
  """A copy of `config` with each override `GROUP.KEY=VALUE` (or the flag `--config.GROUP.KEY=VALUE`) applied in
  order, a later one of a key winning: the one parser of overrides, by every command. Each value is parsed by the
  type of the key it replaces (`parse_override`). Raises UserError naming the first bad override.
  """
  overrides = list(overrides)
  # A module named by import path brings its own model.* keys: added before the overrides that may set them.
  family = [o for o in overrides if o.removeprefix(OVERRIDE).partition("=")[0] == "model.family"]
  if family:
    config = add_family_keys(with_values(config, dict([_parsed(config, family[-1])])))
  values = {}
  for override in overrides:
    key, value = _parsed(config, override)
    values[key] = value
  return with_values(config, values)


def _parsed(config: config_dict.ConfigDict, override: str) -> tuple[str, object]:
  try:
    return parse_override(config, override)
  except UserError as e:
    raise UserError(f"bad config override {override}: {e}") from None


def parse_override(config: config_dict.ConfigDict, override: str) -> tuple[str, object]:
  """`GROUP.KEY=VALUE` (or the flag `--config.GROUP.KEY=VALUE`) -> (`GROUP.KEY`, VALUE parsed by the type of the
  key it replaces). Raises UserError naming the problem; its caller names the override.

  The rules (for scalars, those of absl's flags, which parsed overrides before):
  - bool: true, t, 1, false, f, 0 in any case; int: decimal, 0x hexadecimal or 0o octal; float: what float()
    reads (nan and inf too); str: the text as it is;
  - tuple (or list): a Python literal of a tuple or list, `(64,)` or `(128,64)`;
  - `none` in any case is None for any key but a string; a key that holds None and declares no type (one of a
    saved config.json) takes a Python literal, else the text.
  A key of any depth (`train.early_stopping.metric`) can be overridden, a group of keys cannot.
  """
  key, equals, text = override.removeprefix(OVERRIDE).partition("=")
  parts = key.split(".")
  parent, node = None, config
  for part in parts:
    if not (isinstance(node, config_dict.ConfigDict) and part in node):
      known = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f' Did you mean "{close[0]}" instead of "{part}"?' if close else ""
      raise UserError(f"{key or 'nothing'} is not a key of the config (expected GROUP.KEY=VALUE).{hint}")
    parent, node = node, node[part]
  if isinstance(node, config_dict.ConfigDict) or len(parts) < 2:
    raise UserError(f"{key} is a group of keys: override one of them, GROUP.KEY=VALUE")
  if not equals:
    raise UserError("expected GROUP.KEY=VALUE, with a value")
  return key, _parse_value(text, parent.get_type(parts[-1]))


def _parse_value(text: str, kind: type):
  """One override's text as a value of `kind`, by the rules of `parse_override`."""
  if kind is not str and text.lower() == "none":
    return None
  if kind is bool:
    if text.lower() not in BOOLEANS:
      raise UserError(f"{text!r} is not true or false")
    return BOOLEANS[text.lower()]
  if kind in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, (tuple, list)):
      raise UserError(f"{text!r} is not a {kind.__name__} literal such as (64,) or (128,64)")
    return kind(value)
  try:
    if kind is int:
      return int(text, {"0x": 16, "0o": 8}.get(text[:2], 10))  # absl's integer flags read these
    if kind is float:
      return float(text)
  except ValueError:
    raise UserError(f"{text!r} is not of type {kind.__name__}") from None
  if kind is str:
    return text
  try:  # None of no declared type
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def with_values(config: config_dict.ConfigDict, values: Mapping[str, object]) -> config_dict.ConfigDict:
  """A copy of `config` with each `GROUP.KEY: value` of `values` (parsed already: a sweep point) set."""
  config = copy.deepcopy(config)  # not copy_and_resolve_references: a placeholder keeps its type
  for key, value in values.items():
    *groups, name = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  return config


def saved_config(workdir, overrides: list[str]) -> config_dict.ConfigDict:
  """The run's config with `--config.data.K=V` overrides applied (`apply_overrides`; eval reads other data).

  Raises UserError for a missing config.json or an override outside data.*.
  """
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise UserError(f"{path} not found: is {workdir} a jaxmodels workdir?")
  for override in overrides:
    if not override.startswith(f"{OVERRIDE}data."):
      raise UserError(f"bad override {override!r}: expected --config.data.KEY=VALUE (a key of data.*)")
  return apply_overrides(from_saved(json.loads(path.read_text())), overrides)
