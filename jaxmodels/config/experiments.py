"""Experiment files and `--config.K=V` overrides: loading, the one override parser, saved configs.

`load_experiment(path)` runs an experiment file's `get_config()` and locks the
result, so a misspelled key is an error. `parse_experiment_flags` is the single
parser of `--config PATH --config.GROUP.KEY=VALUE` used by every command (train,
eval, bench sweeps, plan); values are parsed by the type of the key they replace.
A run's `config.json` is read back by `from_saved` and `saved_config`.
"""

import ast
import importlib.util
import json
import os

from absl import flags
from ml_collections import config_dict, config_flags

from jaxmodels.config.defaults import default_config
from jaxmodels.config.validate import validate
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError


def load_experiment(path: str) -> config_dict.ConfigDict:
  """Imports an experiment file and returns its (locked) `get_config()`."""
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_jaxmodels_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} defines no get_config()")
  config = module.get_config()
  config.lock()
  return config


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


def parse_experiment_flags(prog: str, args: list[str], extra_flags=None):
  """(config with overrides applied, parsed FlagValues) for `--config PATH` plus overrides.

  `extra_flags(flag_values)` may define further command flags. The experiment's
  stem names the default workdir: `runs/<stem>`.
  """
  path, rest = pop_config_path(args)
  config = load_experiment(path)
  fv = flags.FlagValues()
  try:  # config_flags resolves every --config.K=V against the config here
    config_flags.DEFINE_config_dict("config", config, "experiment config", flag_values=fv, lock_config=True,
                                    sys_argv=[prog, *rest])
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    message = str(e).encode().decode("unicode_escape")[1:-1].replace("\n", " ")  # str(KeyError) is a repr
    raise UserError(f"bad config override: {message}") from None
  stem = os.path.splitext(os.path.basename(path))[0]
  flags.DEFINE_string("workdir", os.path.join("runs", stem), "run directory (outputs, checkpoints)",
                      flag_values=fv)
  if extra_flags:
    extra_flags(fv)
  try:
    unparsed = fv([prog, *rest])
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0]) from None
  if len(unparsed) > 1:
    raise UserError(f"unexpected arguments: {' '.join(unparsed[1:])}")
  validate(fv.config)  # before a multi-process job is joined or anything is loaded
  return fv.config, fv


def saved_config(workdir, overrides: list[str]) -> config_dict.ConfigDict:
  """The run's config with `--config.data.K=V` overrides applied (values parsed as Python literals, else strings).

  Raises UserError for a missing config.json or an override outside data.*.
  """
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise UserError(f"{path} not found: is {workdir} a jaxmodels workdir?")
  config = from_saved(json.loads(path.read_text()))
  for override in overrides:
    key, _, text = override.removeprefix("--config.").partition("=")
    group, _, name = key.partition(".")
    if not override.startswith("--config.data.") or not _ or name not in config.data:
      raise UserError(f"bad override {override!r}: expected --config.data.KEY=VALUE (a key of data.*)")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    config[group][name] = value
  return config
