"""Objects named by import path, `package.module:name`: what a config key names when it is not a built-in choice
(`model.family=mypkg.models:Mixer`, `data.source=mypkg.data:load_corpus`)."""

import importlib
import os
import re
import sys

from jaxmodels.runtime.errors import UserError

__all__ = ["import_object", "IMPORT_PATH", "is_import_path"]

IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # package.module:name


def is_import_path(value) -> bool:
  """Whether `value` is written as an import path (`package.module:name`), whether or not it imports."""
  return isinstance(value, str) and IMPORT_PATH.fullmatch(value) is not None


def import_object(path: str, key: str):
  """The object import path `package.module:name` names (`name` may be dotted: `module:Class.attribute`).

  The module must import in this process: installed, on PYTHONPATH, or in the working directory (added to
  sys.path, as `python -m jaxmodels` has it). Raises UserError, one line naming the config `key`
  (`{key}={path!r}: ...`), for a module that does not import (whatever it raises while importing) or a missing
  name.
  """
  module_name, _, attribute = path.partition(":")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.append(os.getcwd())
  where = f"{key}={path!r}"
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-exception-caught  # any failure of the user's import, on one line
    raise UserError(f"{where}: cannot import {module_name} ({type(e).__name__}: {e})".replace("\n", " ")) from None
  for part in attribute.split("."):
    if not hasattr(obj, part):
      raise UserError(f"{where}: {module_name} has no attribute {attribute}")
    obj = getattr(obj, part)
  return obj
