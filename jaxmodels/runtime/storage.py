"""Where runs live: every path the project reads or writes, local or `gs://`, and the workdir lock.

Paths go through `etils.epath` (which Orbax uses too): a local path is made
absolute, `gs://bucket/dir` is served by gcsfs (the `gcs` extra; or TensorFlow's gfile
when it is installed), so a run on a TPU VM writes everything to the bucket and
resumes from it after the VM is recreated. A gs:// path without gcsfs is the
one-line error of jaxmodels.runtime.extras, raised when the path is first made,
before anything is written.

The lock is written by hand because neither epath nor Orbax has one: a small
JSON file `workdir/LOCK` holding the holder's pid, host and heartbeat, created atomically
(`O_CREAT | O_EXCL` on a local disk; on GCS an upload with the precondition
`ifGenerationMatch=0`, which fails if the object exists).
"""

import importlib
import json
import os
import socket
import threading
import time

import fsspec
from etils import epath

from jaxmodels.runtime import extras
from jaxmodels.runtime.errors import UserError

LOCK_FILE = "LOCK"


def path(p) -> epath.Path:
  """`p` (str or path) as an epath.Path: URLs such as gs://bucket/x as given, local paths made absolute.

  UserError for a gs:// path when gcsfs (`jaxmodels[gcs]`) is not installed.
  """
  s = os.fspath(p)
  if is_remote(s):
    if s.startswith("gs://"):
      extras.check("gcsfs", s)
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(p) -> bool:
  """True for a URL (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def check_workdir(workdir) -> None:
  """Raises UserError, writing nothing, if `workdir` is empty, a file, (local) cannot be created and written,
  or (remote) cannot be reached: a network, credential or HTTP error on its first access."""
  if not os.fspath(workdir).strip():
    raise UserError("--workdir is empty: give the run's directory (a local path or gs://bucket/dir)")
  p = path(workdir)
  try:
    is_file = p.exists() and not p.is_dir()
  except storage_errors() as e:
    raise UserError(f"--workdir {workdir}: cannot reach the storage ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:200]})") from None
  if is_file:
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


def storage_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean a storage cannot be reached or used (network, credentials, HTTP status).

  Local disks raise OSError; gcsfs raises its HttpError, aiohttp's client
  errors, timeouts and google-auth's errors, each imported only if installed.
  """
  errors = [OSError, TimeoutError]
  for module, name in (("gcsfs.retry", "HttpError"), ("aiohttp", "ClientError"),
                       ("google.auth.exceptions", "GoogleAuthError")):
    try:
      errors.append(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
      pass
  return tuple(errors)


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
  """One run per workdir: `workdir/LOCK` holds the running process's pid, host and a heartbeat until it exits.

  The holder rewrites the heartbeat (unix seconds) every `refresh_s` from a
  background thread. A lock left by a dead process on this host (a SIGKILL, a
  crash) is taken over with a warning, and so is a lock of another host whose
  heartbeat has stopped (a preempted TPU VM, recreated under a new hostname,
  resumes from its bucket that way; see `_abandoned`). A live lock is a
  UserError naming its holder.
  """

  def __init__(self, workdir, log=print, refresh_s: float = 60.0, stale_s: float = 600.0):
    self.workdir, self.file, self.log = path(workdir), path(workdir) / LOCK_FILE, log
    self.refresh_s, self.stale_s = refresh_s, stale_s
    self.held, self._created_dir = False, False
    self.record = {"pid": os.getpid(), "host": socket.gethostname()}
    self._stop = threading.Event()
    self._thread = None

  def _data(self) -> bytes:
    return json.dumps({**self.record, "heartbeat": time.time()}).encode()

  def _in_use(self, holder: dict) -> UserError:
    self.release()
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return UserError(f"--workdir {self.workdir} is in use by {who} (lock file {self.file}); wait for that run "
                     f"to end, or delete the lock file if it is gone")

  def _abandoned(self, holder: dict) -> str | None:
    """Why the lock `holder` left may be taken over, or None while its run may still be going.

    Same host: whether its process is alive. Another host: whether its heartbeat
    is older than `stale_s`, or else stays unchanged while this process watches
    it for 2.5 renewal periods (so the hosts' clocks need not agree).
    """
    pid, beat = holder.get("pid"), holder.get("heartbeat")
    if holder.get("host") == self.record["host"] and isinstance(pid, int):
      return None if _alive(pid) else f"process {pid} on this host has ended"
    if not isinstance(beat, (int, float)):
      return None
    if time.time() - beat > self.stale_s:
      return f"process {pid} on {holder.get('host')} has not renewed it for {time.time() - beat:.0f} s"
    self.log(f"{self.file} is held by process {pid} on {holder.get('host')}: checking that it is still renewed "
             f"(up to {2.5 * self.refresh_s:.0f} s)")
    deadline = time.monotonic() + 2.5 * self.refresh_s
    while time.monotonic() < deadline:
      time.sleep(min(1.0, self.refresh_s / 4))
      if self._holder().get("heartbeat") != beat:
        return None
    return f"process {pid} on {holder.get('host')} did not renew it for {2.5 * self.refresh_s:.0f} s"

  def acquire(self) -> None:
    """Takes the lock (creating the workdir if needed); UserError naming the holder if another run has it."""
    if not self.workdir.exists():
      self.workdir.mkdir(parents=True)
      self._created_dir = True
    try:
      _create_exclusive(self.file, self._data())
    except FileExistsError:
      holder = self._holder()
      reason = self._abandoned(holder)
      if reason is None:
        raise self._in_use(holder) from None
      self.log(f"warning: taking over {self.file}: {reason}")
      self.file.unlink(missing_ok=True)
      try:
        _create_exclusive(self.file, self._data())
      except FileExistsError:  # another run took it over first
        raise self._in_use(self._holder()) from None
    self.held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, name="jaxmodels-workdir-lock", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.refresh_s):
      self.file.write_bytes(self._data())

  def _holder(self) -> dict:
    try:
      holder = json.loads(self.file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # released meanwhile, or being written right now
      return {}
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    """Removes the lock; a workdir this lock created is removed again if nothing else was written to it."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self.held:
      self.file.unlink(missing_ok=True)
      self.held = False
    if self._created_dir and not is_remote(self.workdir) and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
      self._created_dir = False
