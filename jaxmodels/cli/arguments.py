"""The argument parser every `jaxmodels` command uses for its own flags: any problem is one line (a UserError)."""

import argparse

from jaxmodels.runtime.errors import UserError

__all__ = ["parse_args"]


def parse_args(prog: str, args: list[str], arguments: list[tuple]) -> argparse.Namespace:
  """Parses a command's flags, each `(name, kwargs)`; any problem (missing, unknown, mistyped) is a UserError."""

  class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; the CLI's way is one line, exit 2
      raise UserError(f"{message} (see {prog} --help)")

  parser = Parser(prog=prog, add_help=False, exit_on_error=False)
  for name, kwargs in arguments:
    parser.add_argument(name, **kwargs)
  try:
    return parser.parse_args(args)
  except argparse.ArgumentError as e:
    raise UserError(f"{e} (see {prog} --help)") from None
