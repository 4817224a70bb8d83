"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
  """A problem with the user's config, data or command line, reported without a traceback."""
