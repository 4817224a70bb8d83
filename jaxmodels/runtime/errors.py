"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
  """A problem with the user's config, data or command line, reported without a traceback."""

  exit_code = 2


class NonFiniteLoss(UserError):
  """The loss became NaN or inf; the run stopped without saving that state."""

  exit_code = 3


class Preempted(Exception):
  """SIGTERM or SIGINT: the current step finished and a checkpoint was saved; rerun to resume."""

  exit_code = 75  # EX_TEMPFAIL: try again later
