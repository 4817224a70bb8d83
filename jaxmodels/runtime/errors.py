"""The exceptions that the CLI turns into a one-line message and an exit code.

Exit codes of every `jaxmodels` command: 0 done; 1 a write failed (`StorageError`: the input was fine, the
storage refused) or an unexpected error (a traceback); 2 a problem with the config, data or command line
(`UserError`); 3 the loss became NaN or inf (`NonFiniteLoss`); 75 preempted after saving (`Preempted`: rerun
to resume); 130 interrupted by Ctrl-C before training started.
"""

__all__ = ["NonFiniteLoss", "Preempted", "StorageError", "UserError"]


class UserError(Exception):
  """A problem with the user's config, data or command line, reported without a traceback."""

  exit_code = 2


class StorageError(UserError):
  """A write failed: no space, no permission, a quota, a bucket refusing the write. One line naming the path
  and the cause; exit code 1, since the input was fine. The file being written is left as it was before."""

  exit_code = 1


class NonFiniteLoss(UserError):
  """The loss became NaN or inf; the run stopped without saving that state."""

  exit_code = 3


class Preempted(Exception):
  """SIGTERM or SIGINT: the current step finished and a checkpoint was saved; rerun to resume."""

  exit_code = 75  # EX_TEMPFAIL: try again later
