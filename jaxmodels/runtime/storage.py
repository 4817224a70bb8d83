"""Where runs live: every path the project reads or writes, local or `gs://`, and the workdir lock.

Paths go through `etils.epath` (which Orbax uses too): a local path is made
absolute, `gs://bucket/dir` is served by gcsfs (the `gcs` extra; or TensorFlow's gfile
when it is installed), so a run on a TPU VM writes everything to the bucket and
resumes from it after the VM is recreated. A gs:// path without gcsfs is the
one-line error of jaxmodels.runtime.extras, raised when the path is first made,
before anything is written.

Writes: `write_files` replaces a group of small files all or none (each written to
a temporary sibling first, then renamed over its target), and `writing` turns a
failed write anywhere (no space, no permission, a read-only disk, a quota, a bucket
refusing the write; also as Orbax and TensorStore report them) into a
`StorageError`: one line naming the path and the cause, exit code 1.

The lock is written by hand because neither epath nor Orbax has one: a small
JSON file `workdir/LOCK` holding the holder's pid, host, a random token and a
heartbeat. Every change to it is atomic, so the file is never empty or torn:
- created complete or not at all: on a local disk a temporary file hard-linked to
  `LOCK` (`link` fails if it exists); on GCS an upload with the precondition
  `ifGenerationMatch=0`, which fails if the object exists;
- replaced (a take-over, a heartbeat) only if it is still the version that was
  read: on GCS an upload with `ifGenerationMatch=<generation read>` (GCS checks
  and writes in one step; HTTP 412 otherwise); on a local disk, under an exclusive
  `flock` of the workdir directory, a check of the file's inode, mtime and bytes
  followed by `rename` of a complete temporary file over it. Every replacer takes
  that flock, so two processes taking over one dead holder's lock cannot both win:
  the second finds a version other than the one it judged and reads the new holder.
  (A file system without `flock` on directories, such as some NFS mounts, keeps the
  rename's atomicity but not the check-and-replace; run one take-over at a time there.)
"""

import atexit
import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid

import fsspec
from etils import epath

from jaxmodels.runtime import extras
from jaxmodels.runtime.errors import StorageError, UserError

__all__ = ["abandoned_io", "check_workdir", "end_process", "file_sizes", "is_remote", "LOCK_FILE", "path",
           "quiet_late_reports", "read_ranges", "read_utf8", "RUN_DIRECTORIES", "storage_errors", "WorkdirLock",
           "WRITE_ERRNOS", "write_failure", "write_files", "writing"]

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


# The directories a training run writes under its workdir: checkpoints (runs.checkpoint), TensorBoard scalars,
# profiles and W&B files (train): the pre-flight check covers each.
RUN_DIRECTORIES = ("checkpoints", "tb", "profile", "wandb")


def check_workdir(workdir, writes=RUN_DIRECTORIES) -> None:
  """Raises UserError, writing nothing, if `workdir` is empty, a file, or (remote) cannot be reached: a
  network, credential or HTTP error on its first access; StorageError if (local) it or one of the directories
  `writes` (names relative to it: every directory the run will write) cannot be created and written: a file
  in its place, a read-only disk or no permission."""
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
  for directory in [os.fspath(p), *(os.fspath(p / name) for name in writes)]:
    existing, what = directory, (f"--workdir {workdir}:" if directory == os.fspath(p) else
                                 f"cannot write {directory}:")
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      error = UserError if directory == os.fspath(p) else StorageError  # a mistyped --workdir is the input's fault
      raise error(f"{what} {existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
      read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
      raise StorageError(f"{what} {existing} is not writable "
                         f"({'read-only file system' if read_only else 'permission denied'})")


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


def file_sizes(directory) -> dict[str, int]:
  """{name: bytes} of the files directly inside `directory` (local or gs://), from one listing: a bucket answers
  it in one request per 1,000 objects, where a stat of each file would cost a request each. UserError if the
  storage cannot be reached."""
  try:
    fs, root = fsspec.core.url_to_fs(os.fspath(directory))
    entries = fs.ls(root, detail=True)
  except storage_errors() as e:
    raise UserError(f"cannot list {directory}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                    ) from None
  return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}


def read_ranges(paths: list[str], starts: list[int], stops: list[int]) -> list[bytes]:
  """Bytes [starts[i], stops[i]) of file `paths[i]` (all on one file system, e.g. all gs://), fetched concurrently.

  fsspec's `cat_ranges` sends the ranged reads as one batch of concurrent requests (gcsfs: HTTP GETs with a
  Range header, run together on its event loop), so a batch of many small windows costs about one round trip,
  not one each. Raises UserError naming the first path whose read failed (not found, network, credentials).
  """
  if not paths:
    return []
  fs, _ = fsspec.core.url_to_fs(paths[0])
  try:
    out = fs.cat_ranges(list(paths), list(starts), list(stops), on_error="return")
  except storage_errors() as e:
    out = [e]
  for p, data in zip(paths, out):
    if isinstance(data, BaseException):
      raise UserError(f"cannot read {p}: {type(data).__name__}: {(str(data).splitlines() or [''])[0][:200]}")
  return out




# TensorStore's (and so Orbax's) status codes of a failed write, as they start its error messages.
_WRITE_STATUS = {"RESOURCE_EXHAUSTED": "no space left or a quota exceeded", "PERMISSION_DENIED": "permission denied",
                 "UNAUTHENTICATED": "no credentials for the storage"}


# OS errors that only a write raises (a read never runs out of space or meets a read-only disk).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def write_failure(e: BaseException, where, only_writes: bool = False) -> str | None:
  """'cannot write PATH: CAUSE' for an exception a write raised, or None when it is not a storage error.

  Storage errors: an OSError (ENOSPC, EDQUOT, EROFS, EACCES, ...; PATH from the error when it names one), an
  HTTP, network or credential error of gcsfs, and an error of TensorStore (raised by Orbax, also wrapped in a
  bare Exception or chained) whose status is RESOURCE_EXHAUSTED or PERMISSION_DENIED or that carries an OS
  error code. Other errors give None. `only_writes` (for an error of unknown origin) narrows it to the errors
  no read raises: OSErrors of WRITE_ERRNOS and TensorStore's out-of-space or OS-error-code statuses.
  """
  seen = set()
  while e is not None and id(e) not in seen and not isinstance(e, UserError):
    seen.add(id(e))
    if isinstance(e, OSError) and only_writes and e.errno not in WRITE_ERRNOS:
      return None
    if isinstance(e, OSError):
      cause = e.strerror or os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
      return f"cannot write {e.filename or where}: {cause}"
    if isinstance(e, storage_errors()) and not only_writes:  # gcsfs HttpError (403 refused, 429 quota), network
      code = getattr(e, "code", None)
      detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
      return f"cannot write {where}: {f'HTTP {code}: ' if code else ''}{detail}"
    message = str(e)
    os_code = re.search(r"os_error_code='?(\d+)", message)
    status = next((s for s in _WRITE_STATUS if message.startswith(s)), None)
    if only_writes:
      os_code = os_code if os_code and int(os_code.group(1)) in WRITE_ERRNOS else None
      status = status if status == "RESOURCE_EXHAUSTED" else None
    if os_code or status:
      return f"cannot write {where}: {os.strerror(int(os_code.group(1))) if os_code else _WRITE_STATUS[status]}"
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return None


class _ReportedWriteErrors(logging.Filter):
  """Drops Orbax's absl ERROR records (each with a traceback, from every thread of an async save) of a write
  failure: `writing` raises that failure as one StorageError line when the save is waited for. Once it has,
  the tracebacks the failed save's remaining threads log as they wind down (its executor shut down under them)
  are dropped too."""

  reported = False  # set by `writing` when it raised a StorageError

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.exc_info[1] is not None
                and (self.reported or write_failure(record.exc_info[1], "") is not None))


_QUIET = _ReportedWriteErrors()


# Late reports of abandoned I/O. When one TensorStore read or write of an Orbax restore or save fails, Orbax ends
# its event loop and leaves the others in flight; each reports later, from TensorStore's threads or at garbage
# collection: 'Event loop is closed' (asyncio's check, when it calls back into the closed loop), 'Exception ignored
# in <coroutine ...>' for an unawaited read, and the read's own error. The failure itself is reported once, by the
# caller. Written by hand: neither Orbax nor TensorStore can wait for or silence the operations it abandoned.
_LATE: list = []  # predicates (exception -> bool) of the late reports to drop, besides the closed event loop's
_ABANDONED: list = []  # non-empty once a failed read or write left operations in flight


def _late_report(value) -> bool:
  return (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or any(p(value) for p in _LATE)


def quiet_late_reports(predicate=None) -> None:
  """From now on, drops the late reports of abandoned I/O (see above) from `sys.unraisablehook` and
  `sys.excepthook`: the closed event loop's, and those `predicate(exception)` recognises (e.g. a damaged file's
  error). Idempotent per predicate."""
  if predicate is not None and predicate not in _LATE:
    _LATE.append(predicate)
  if getattr(sys.unraisablehook, "quiets_late_reports", False):
    return
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def drop_unraisable(report):
    if not _late_report(report.exc_value):
      unraisable(report)

  def drop_excepthook(kind, value, tb):
    if not _late_report(value):
      excepthook(kind, value, tb)

  drop_unraisable.quiets_late_reports = True
  sys.unraisablehook, sys.excepthook = drop_unraisable, drop_excepthook


def abandoned_io() -> None:
  """Records that TensorStore operations may be in flight when the process ends (a failed read or write, already
  reported, left them; or a command reads checkpoints that a run beside it may delete mid-read): the process
  should end through `end_process`, since a late report that arrives during interpreter finalization, when sys's
  hooks are gone, prints a raw traceback."""
  _ABANDONED.append(True)


def end_process(code: int) -> None:
  """Ends the process with exit `code`. After abandoned I/O (`abandoned_io`): runs the atexit handlers, flushes
  and exits without interpreter finalization (see `abandoned_io`); otherwise `sys.exit(code)`."""
  if not _ABANDONED:
    sys.exit(code)
  atexit._run_exitfuncs()  # pylint: disable=protected-access  # what finalization would run first
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def writing(where, on_failure=None):
  """Turns a write error raised inside into StorageError('cannot write WHERE: CAUSE'), after calling
  `on_failure` (e.g. to remove a partial write). Other errors pass unchanged. From the first call on,
  Orbax's logged tracebacks of write failures are dropped (they are raised, and so reported, here), and so are
  the late reports of the operations a failed save abandons (`quiet_late_reports`)."""
  logging.getLogger("absl").addFilter(_QUIET)  # idempotent
  quiet_late_reports()
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax wraps TensorStore's errors in a bare Exception
    message = write_failure(e, where)
    if message is None:
      raise
    if on_failure is not None:
      with contextlib.suppress(Exception):
        on_failure()
    _QUIET.reported = True
    abandoned_io()
    raise StorageError(message) from None


def read_utf8(p, name=None) -> str:
  """The text of the file `p` (local or gs://) decoded as UTF-8; UserError naming it (as `name`, default `p`) and
  the first byte that is not UTF-8: a binary file given where text is read. OSErrors pass unchanged."""
  raw = path(p).read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{name or p} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def write_files(directory, files: dict[str, str | bytes]) -> None:
  """Writes the files `files` ({name: text or bytes}) into `directory` (local or gs://), all or none.

  Each goes to a temporary sibling first; only when all are written are they renamed over their targets, so
  a failed write (StorageError naming the file and the cause) leaves every target as it was: never empty,
  never half written. The directory must exist.
  """
  d, tag = path(directory), f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  temps = {name: d / f".{name}{tag}" for name in files}
  try:
    for name, data in files.items():
      with writing(d / name):
        try:
          temps[name].write_bytes(data.encode() if isinstance(data, str) else data)
        except OSError as e:  # named as the file written, not its temporary sibling (.NAME.tmp-PID-HEX)
          raise OSError(e.errno, e.strerror, os.fspath(d / name)) from None
    for name, tmp in temps.items():
      with writing(d / name):
        tmp.replace(d / name)
  finally:
    for tmp in temps.values():
      with contextlib.suppress(Exception):
        tmp.unlink(missing_ok=True)


class _LockFile:
  """`LOCK`'s atomic operations (see the module docstring); a version is what a compare-and-replace compares."""

  def __init__(self, file: epath.Path):
    self.file, self.remote = file, is_remote(file)
    if self.remote:
      self.fs, self.inner = fsspec.core.url_to_fs(os.fspath(file))

  def create(self, data: bytes) -> None:
    """Writes a new LOCK holding `data`, complete or not at all; FileExistsError if one exists."""
    if self.remote:
      self.fs.pipe_file(self.inner, data, mode="create")  # gcsfs: ifGenerationMatch=0; HTTP 412 -> FileExistsError
      return
    tmp = self._temp(data)
    try:
      os.link(tmp, os.fspath(self.file))
    finally:
      os.unlink(tmp)

  def read(self) -> tuple[bytes | None, object]:
    """(bytes, version) of LOCK; (None, None) if there is none."""
    try:
      if self.remote:
        while True:  # the generation of the bytes read: unchanged before and after the read
          generation = self.fs.info(self.inner)["generation"]
          data = self.fs.cat_file(self.inner)
          self.fs.invalidate_cache(self.inner)
          if self.fs.info(self.inner)["generation"] == generation:
            return data, generation
      with open(os.fspath(self.file), "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
      return data, (st.st_ino, st.st_mtime_ns, data)
    except FileNotFoundError:
      return None, None

  def age_s(self) -> float:
    """Seconds since LOCK was last written (by the storage's clock for the write, this host's for now)."""
    if self.remote:
      return time.time() - self.fs.modified(self.inner).timestamp()
    return time.time() - os.stat(os.fspath(self.file)).st_mtime

  def replace(self, data: bytes, version) -> None:
    """Replaces LOCK by `data` if it is still at `version`; FileExistsError if it changed or is gone."""
    if self.remote:
      bucket, key, _ = self.fs.split_path(self.inner)
      body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}\n"
              f"--==0==\nContent-Type: application/octet-stream\n\n").encode() + data + b"\n--==0==--"
      try:  # a multipart upload, as gcsfs's own: GCS checks the generation and writes in one step (412 otherwise)
        self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{bucket}/o",  # pylint: disable=protected-access
                     uploadType="multipart", headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                     data=body, json_out=True, ifGenerationMatch=str(version))
      except FileNotFoundError:
        raise FileExistsError(self.inner) from None
      self.fs.invalidate_cache(self.inner)
      return
    with self._exclusive():
      if self.read()[1] != version:
        raise FileExistsError(os.fspath(self.file))
      tmp = self._temp(data)
      try:
        os.replace(tmp, os.fspath(self.file))
      except BaseException:
        os.unlink(tmp)
        raise

  def remove(self, version) -> None:
    """Deletes LOCK if it is still at `version` (a lock another process took over is left to it)."""
    if self.remote:
      bucket, key, _ = self.fs.split_path(self.inner)
      with contextlib.suppress(FileNotFoundError, FileExistsError):
        self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(version))
      self.fs.invalidate_cache(self.inner)
      return
    with self._exclusive():
      if self.read()[1] == version:
        os.unlink(os.fspath(self.file))

  def _temp(self, data: bytes) -> str:
    tmp = f"{os.fspath(self.file)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
      with writing(self.file, lambda: os.unlink(tmp)):
        os.write(fd, data)
        os.fsync(fd)
    finally:
      os.close(fd)
    return tmp

  @contextlib.contextmanager
  def _exclusive(self):
    """An exclusive flock of LOCK's directory (see the module docstring), held while the block runs."""
    fd = os.open(os.fspath(self.file.parent), os.O_RDONLY)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError as e:  # a file system without flock: the rename alone
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
          raise
      yield
    finally:
      os.close(fd)  # releases the flock


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

  The holder replaces the file with a new heartbeat (unix seconds) every `refresh_s`
  from a background thread, atomically and only while the file is still its own. A
  lock left by a dead process on this host (a SIGKILL, a crash) is taken over with
  a warning, and so is a lock of another host whose heartbeat has stopped (a
  preempted TPU VM, recreated under a new hostname, resumes from its bucket that
  way; see `_abandoned`), and so is an empty or torn
  one not written for `stale_s`. Take-overs are atomic (see the module docstring):
  of processes taking over one abandoned lock at once, exactly one gets it. A
  live lock is a UserError naming its holder.
  """

  def __init__(self, workdir, log=print, refresh_s: float = 60.0, stale_s: float = 600.0):
    self.workdir, self.file, self.log = path(workdir), path(workdir) / LOCK_FILE, log
    self.refresh_s, self.stale_s = refresh_s, stale_s
    self.held, self._created_dir = False, False
    self.record = {"pid": os.getpid(), "host": socket.gethostname()}
    self._token = uuid.uuid4().hex  # tells this lock from another process's with the same pid and host
    self._lock_file = _LockFile(self.file)
    self._version = None  # the version of LOCK this lock last wrote
    self._stop = threading.Event()
    self._thread = None

  def _data(self) -> bytes:
    return json.dumps({**self.record, "token": self._token, "heartbeat": time.time()}).encode()

  def _in_use(self, holder: dict) -> UserError:
    self.release()
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return UserError(f"--workdir {self.workdir} is in use by {who} (lock file {self.file}); wait for that run "
                     f"to end, or delete the lock file if it is gone")

  def _abandoned(self, holder: dict) -> str | None:
    """Why the lock `holder` left may be taken over, or None while its run may still be going.

    Same host: whether its process is alive. Another host: whether its heartbeat
    is older than `stale_s`, or else stays unchanged while this process watches
    it for 2.5 renewal periods (so the hosts' clocks need not agree). A lock file
    that holds no record (empty or torn, as an older heartbeat could leave it) is
    abandoned once it was last written more than `stale_s` ago.
    """
    pid, beat = holder.get("pid"), holder.get("heartbeat")
    if not holder:
      try:
        age = self._lock_file.age_s()
      except FileNotFoundError:
        return None
      return f"it holds no readable record and was last written {age:.0f} s ago" if age > self.stale_s else None
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
      if self._holder()[0].get("heartbeat") != beat:
        return None
    return f"process {pid} on {holder.get('host')} did not renew it for {2.5 * self.refresh_s:.0f} s"

  def acquire(self) -> None:
    """Takes the lock (creating the workdir if needed); UserError naming the holder if another run has it,
    StorageError if the lock cannot be written."""
    with writing(self.file, self.release):
      if not self.workdir.exists():
        self.workdir.mkdir(parents=True)
        self._created_dir = True
      self._take()
    self.held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, name="jaxmodels-workdir-lock", daemon=True)
    self._thread.start()

  def _take(self) -> None:
    """Creates LOCK, or replaces an abandoned one atomically if it is still the version judged abandoned."""
    try:
      self._lock_file.create(self._data())
    except FileExistsError:
      holder, version = self._holder()
      reason = self._abandoned(holder)
      if reason is None:
        raise self._in_use(holder) from None
      try:
        self._lock_file.replace(self._data(), version)
      except FileExistsError:  # another run took it over (or took it) first
        raise self._in_use(self._holder()[0]) from None
      self.log(f"warning: taking over {self.file}: {reason}")
    holder, self._version = self._holder()
    if holder.get("token") != self._token:  # cannot happen with the atomic create and replace; read back anyway
      raise self._in_use(holder)

  def _renew(self) -> None:
    while not self._stop.wait(self.refresh_s):
      try:
        self._lock_file.replace(self._data(), self._version)
        self._version = self._lock_file.read()[1]
      except FileExistsError:
        self.log(f"warning: {self.file} was taken over by {self._who()}: this run no longer holds its workdir")
        return
      except Exception as e:  # pylint: disable=broad-except  # a storage hiccup: the next heartbeat retries
        self.log(f"warning: could not renew {self.file} ({write_failure(e, self.file) or e})")

  def _who(self) -> str:
    holder = self._holder()[0]
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"

  def _holder(self) -> tuple[dict, object]:
    """(the record in LOCK, its version): ({}, None) if there is none, ({}, version) if it holds no record."""
    data, version = self._lock_file.read()
    try:
      holder = json.loads(data) if data is not None else {}
    except (json.JSONDecodeError, UnicodeDecodeError):  # empty or torn (written by an older heartbeat)
      return {}, version
    return (holder if isinstance(holder, dict) else {}), version

  def release(self) -> None:
    """Removes the lock; a workdir this lock created is removed again if nothing else was written to it."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        self._lock_file.remove(self._version)
      self.held = False
    if self._created_dir and not is_remote(self.workdir) and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
      self._created_dir = False
