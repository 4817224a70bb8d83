"""Where runs live: every path the project reads or writes, local or `gs://`, and the workdir lock.

Paths go through `etils.epath` (which Orbax uses too): a local path is made
absolute, `gs://bucket/dir` is served by gcsfs (or TensorFlow's gfile when it is
installed), so a run on a TPU VM writes everything to the bucket and resumes
from it after the VM is recreated.

The lock is written by hand because neither epath nor Orbax has one: a small
JSON file `workdir/LOCK` holding the holder's pid and host, created atomically
(`O_CREAT | O_EXCL` on a local disk; on GCS an upload with the precondition
`ifGenerationMatch=0`, which fails if the object exists).
"""

import json
import os
import socket

import fsspec
from etils import epath

from jaxmodels.errors import UserError

LOCK_FILE = "LOCK"


def path(p) -> epath.Path:
  """`p` (str or path) as an epath.Path: URLs such as gs://bucket/x as given, local paths made absolute."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(p) -> bool:
  """True for a URL (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def check_workdir(workdir) -> None:
  """Raises UserError, writing nothing, if `workdir` is a file or (local) cannot be created and written."""
  p = path(workdir)
  if p.exists() and not p.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory")
  if is_remote(p):
    return  # permissions on a bucket show only when writing; the lock is the first write
  existing = os.fspath(p)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"--workdir {workdir}: {existing} is a file, so the directory cannot be created")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir}: {existing} is not writable")


def _create_exclusive(p: epath.Path, data: bytes) -> None:
  """Writes `data` to a new file `p`; FileExistsError if it exists (atomic on local disks and on GCS)."""
  if is_remote(p):
    fs, inner = fsspec.core.url_to_fs(os.fspath(p))
    fs.pipe_file(inner, data, mode="create")  # gcsfs: ifGenerationMatch=0; HTTP 412 -> FileExistsError
    return
  fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  try:
    os.write(fd, data)
  finally:
    os.close(fd)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """One run per workdir: `workdir/LOCK` holds the running process's pid and host until it exits.

  A lock left by a dead process on this host (a SIGKILL, a crash) is taken over
  with a warning. A lock of another host cannot be checked: the error says
  which host holds it and to delete the file if that run is gone.
  """

  def __init__(self, workdir, log=print):
    self.workdir, self.file, self.log = path(workdir), path(workdir) / LOCK_FILE, log
    self.held, self._created_dir = False, False
    self.record = {"pid": os.getpid(), "host": socket.gethostname()}

  def acquire(self) -> None:
    """Takes the lock (creating the workdir if needed); UserError naming the holder if another run has it."""
    if not self.workdir.exists():
      self.workdir.mkdir(parents=True)
      self._created_dir = True
    data = json.dumps(self.record).encode()
    try:
      _create_exclusive(self.file, data)
    except FileExistsError:
      holder = self._holder()
      if holder.get("host") != self.record["host"] or not isinstance(holder.get("pid"), int) \
          or _alive(holder["pid"]):
        self.release()
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise UserError(f"--workdir {self.workdir} is in use by {who} (lock file {self.file}); wait for that "
                        f"run to end, or delete the lock file if it is gone") from None
      self.log(f"warning: taking over {self.file} from process {holder['pid']} on this host, which has ended")
      self.file.unlink()
      _create_exclusive(self.file, data)
    self.held = True

  def _holder(self) -> dict:
    try:
      holder = json.loads(self.file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # released meanwhile, or being written right now
      return {}
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    """Removes the lock; a workdir this lock created is removed again if nothing else was written to it."""
    if self.held:
      self.file.unlink(missing_ok=True)
      self.held = False
    if self._created_dir and not is_remote(self.workdir) and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
      self._created_dir = False
