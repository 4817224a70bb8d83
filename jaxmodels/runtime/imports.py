"""Objects named by import path, `package.module:name`: what a config key names when it is not a built-in choice
(e.g. `data.source=mypkg.data:load_corpus`)."""

import importlib

from jaxmodels.runtime.errors import UserError


def is_import_path(value) -> bool:
  """Whether `value` is written as an import path (a string holding ':'), whether or not it imports."""
  return isinstance(value, str) and ":" in value


def import_object(path: str, key: str):
  """The object `package.module:name` names (`name` may be dotted: `module:Class.method`).

  The module must be importable in this process (installed, or its directory on PYTHONPATH). Raises UserError,
  one line naming the config `key` and the cause, for a malformed path, a module that does not import (anything
  it raises while importing), or a missing name.
  """
  module_name, _, name = path.partition(":")
  if not module_name or not name or ":" in name:
    raise UserError(f"{key}={path!r}: expected package.module:name")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-exception-caught  # the user's module may raise anything
    cause = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"{key}={path!r}: module {module_name} does not import ({type(e).__name__}: {cause}; is its "
                    f"directory on PYTHONPATH?)") from None
  for part in name.split("."):
    if not hasattr(obj, part):
      raise UserError(f"{key}={path!r}: module {module_name} has no {name!r}")
    obj = getattr(obj, part)
  return obj
