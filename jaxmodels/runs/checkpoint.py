"""Checkpoints through Orbax, under `workdir/checkpoints/<step>/` (local or gs://).

Each checkpoint holds four items: `model` (parameters and non-parameter model
state such as BatchNorm statistics: all a model needs to run), `train` (step
and optimizer state), `config` (the resolved config, JSON) and `loop` (the training loop's metric
rows not yet logged, so a resumed run logs exactly what an uninterrupted one would), and two optional ones:
`ema` (the parameters' moving average, train.ema_decay) and `loss_scale` (model.dtype=float16). A
state that has an optional part the checkpoint lacks (the key was turned on at resume) keeps `like`'s
(abstract) value for the caller to fill; a saved optional part the state has not is left unread. The RNG
and the data position need no item: dropout keys and batches are pure
functions of (seed, step), so the step restores both exactly.

Orbax writes each save into a temporary directory and renames it on commit, so
a step directory that exists was complete when written; temporary leftovers of
a killed save are removed on the next start. Saves are asynchronous: training
goes on while they are written.

Once a save is committed, process 0 writes `<step>/checksums.json`: the size and SHA-256 of every file
of the step (read back once; written after the commit, so a step saved before this existed, or one whose
save was killed between commit and manifest, has none and is read unverified). Reading a step checks the
bytes against it first; a file that differs is reported by name (`DamagedCheckpoint`).

Nothing here moves or deletes a checkpoint except retention (`checkpoint.keep`).
Before restoring, the saved trees (from Orbax's metadata) are compared with the
state the current config builds: a mismatch is a UserError naming the paths and
config keys that differ. A checkpoint that is damaged (a file differs from its
checksum, its metadata or arrays cannot be read) is skipped with a one-line warning and left in
place, and the previous one is read (`Checkpoints.restore_newest`, which training, `eval`,
`export`, `sample`, `compress` and `jaxmodels.load_model` all use); a step deleted while it is read
(retention of a run saving beside the reader) is re-chosen. Process 0 decides which step every process
restores.
"""

import hashlib
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxmodels import config as config_lib
from jaxmodels.models.transformer import other_layer_layout
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["best_step", "checkpoint_dir", "Checkpoints", "CHECKSUMS", "config_differences", "damaged",
           "DamagedCheckpoint", "data_difference", "data_fingerprint", "DATA_RECORD", "FREE_MODEL_KEYS", "is_export",
           "OPTIONAL_ITEMS", "refuse_adapters", "resolve_restore_from", "restore_export", "retention_policy",
           "STATE_SHAPING_KEYS", "verify_checksums", "verify_export", "write_checksums"]

# Config keys that shape the saved state, or split the data into training and held-out examples (train.seed,
# data.test_fraction, data.val_fraction): a resumed run must agree on them.
STATE_SHAPING_KEYS = ("data.source", "data.path", "data.seq_len", "data.tokenizer", "data.tokenizer_path",
                      "data.chat_template", "data.spatial_dims",
                      "data.vocab_size", "data.test_fraction", "data.val_fraction", "train.seed",
                      "train.optimizer", "train.batch_size", "model.")
# model.* keys that do not change the state (or that restore converts, like scan_layers).
FREE_MODEL_KEYS = ("model.dtype", "model.scan_layers", "model.remat", "model.attention_impl", "model.dropout")
# Tensorstore's status prefixes for files that are damaged or missing (not a transient storage error).
_DAMAGED = ("DATA_LOSS", "NOT_FOUND", "INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION")
# Each step's manifest: {"sha256": {relative path: [bytes, hex digest]}} of every other file of the step.
CHECKSUMS = "checksums.json"
# The saved config's record of the data file a run trained on (`data_fingerprint`); not a config key.
DATA_RECORD = "data_fingerprint"
_MIB = 1 << 20
# Times a reader re-chooses the newest step after the one it read was deleted under it.
_REREADS = 5


class DamagedCheckpoint(Exception):
  """A file of a checkpoint is missing, or its size or bytes differ from the step's checksums.json."""


def checkpoint_dir(workdir):
  return storage.path(workdir) / "checkpoints"


def _handlers() -> dict:
  return {"model": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(), "loop": ocp.JsonCheckpointHandler(),
          **{name: ocp.StandardCheckpointHandler() for name in OPTIONAL_ITEMS}}


# Optional checkpoint items: the TrainState field each holds (None in a state without it).
OPTIONAL_ITEMS = {"ema": "ema_params", "loss_scale": "loss_scale"}


def _optional_items(state) -> dict:
  """{item: tree} of the optional parts `state` has; the EMA saved as {"params": ...}, like the model item."""
  out = {}
  if getattr(state, "ema_params", None) is not None:
    out["ema"] = {"params": state.ema_params}
  if getattr(state, "loss_scale", None) is not None:
    out["loss_scale"] = {"scale": state.loss_scale.scale, "good_steps": state.loss_scale.good_steps}
  return out


def damaged(e: BaseException | None) -> bool:
  """Whether an error reading a checkpoint means its files are damaged or missing (not, e.g., a network error).

  Follows the chain of causes: Orbax wraps tensorstore's array-read errors (`OUT_OF_RANGE`, a failed Zstd
  decode) in a bare Exception.
  """
  while e is not None:
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError, DamagedCheckpoint)):
      return True
    if str(e).startswith(_DAMAGED):
      return True
    e = e.__cause__
  return False


def _first_line(e: BaseException) -> str:
  """'Type: first line' of the innermost cause (Orbax's bare Exception wraps tensorstore's error, which names the
  array and the file), or of `e` for a DamagedCheckpoint."""
  while e.__cause__ is not None and not isinstance(e, DamagedCheckpoint):
    e = e.__cause__
  return (str(e) if isinstance(e, DamagedCheckpoint) else
          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")


def _digest(p, start: int = 0, length: int | None = None) -> str:
  h = hashlib.sha256()
  with p.open("rb") as f:
    f.seek(start)
    left = length
    while left is None or left > 0:
      chunk = f.read(_MIB if left is None else min(_MIB, left))
      if not chunk:
        break
      h.update(chunk)
      if left is not None:
        left -= len(chunk)
  return h.hexdigest()


def _files(directory) -> dict:
  """{path relative to `directory`: path} of every file under it (the manifest itself excepted)."""
  out = {}

  def visit(d, prefix: str) -> None:  # by hand: epath's glob refuses `**` on GCS, its walk drops gs://
    for f in sorted(d.iterdir(), key=lambda f: f.name):
      if f.is_dir():
        visit(f, f"{prefix}{f.name}/")
      elif prefix or not f.name.startswith((CHECKSUMS, f".{CHECKSUMS}")):
        out[prefix + f.name] = f
  visit(storage.path(directory), "")
  return out


def write_checksums(step_dir) -> None:
  """Writes `step_dir/checksums.json`: the size and SHA-256 of every file under the committed step."""
  sums = {name: [f.stat().length, _digest(f)] for name, f in _files(step_dir).items()}
  storage.write_files(step_dir, {CHECKSUMS: json.dumps({"sha256": sums}, sort_keys=True)})


def verify_checksums(step_dir) -> bool:
  """Checks every file listed in `step_dir/checksums.json`; False if the step has no manifest (saved before
  checksums existed, or killed between commit and manifest).

  Raises DamagedCheckpoint naming the first file that is missing or whose size or bytes differ (or an unreadable
  manifest); storage errors propagate.
  """
  d = storage.path(step_dir)
  manifest = d / CHECKSUMS
  if not manifest.exists():
    return False
  try:
    sums = json.loads(manifest.read_text())["sha256"]
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpoint(f"{manifest} cannot be read ({_first_line(e)})") from None
  for name, (size, digest) in sorted(sums.items()):
    f = d / name
    if not f.exists():
      raise DamagedCheckpoint(f"{f} is missing")
    if f.stat().length != size:
      raise DamagedCheckpoint(f"{f} has {f.stat().length} bytes, {size} when saved")
    if _digest(f) != digest:
      raise DamagedCheckpoint(f"{f} differs from its checksum in {CHECKSUMS}")
  return True


def verify_export(path) -> None:
  """Checks the files of the export (or Hugging Face import) at `path` against `params/checksums.json`, when it
  has one (exports written before checksums existed are read unchecked). UserError in one line naming the first
  missing or changed file; storage errors propagate."""
  try:
    verify_checksums(storage.path(path) / "params")
  except DamagedCheckpoint as e:
    raise UserError(f"{path} is a damaged export: {e}; write it again (jaxmodels export, compress or "
                    f"import-hf)") from None


def data_fingerprint(data_path: str) -> dict | None:
  """What identifies the data file a run reads: {"path": resolved absolute path or URL, "bytes": size,
  "sha256": digest of its first and last MiB}; for a directory, of the sorted names and sizes of its top-level
  entries. None for an empty or missing `data_path` (built-in data, or a path that the data loader refuses)."""
  if not data_path:
    return None
  p = storage.path(data_path)
  if p.is_file():
    size = p.stat().length
    h = hashlib.sha256(_digest(p, 0, _MIB).encode())
    h.update(_digest(p, max(0, size - _MIB)).encode())
    return {"path": os.fspath(p), "bytes": size, "sha256": h.hexdigest()}
  if p.is_dir():
    entries = sorted((f.name, f.stat().length if f.is_file() else -1) for f in p.iterdir())
    return {"path": os.fspath(p), "bytes": sum(max(0, n) for _, n in entries),
            "sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}
  return None


def data_difference(saved_config: dict, config_dict: dict) -> str | None:
  """One line saying how the data file `config_dict`'s data.path resolves to differs from the one the saved run
  trained on (size or content; the same file moved elsewhere is the same data), or None (same data, or no
  record: a checkpoint from before records existed, or data without a file)."""
  saved = saved_config.get(DATA_RECORD)
  path = config_dict.get("data", {}).get("path", "")
  if not saved:
    return None
  now = data_fingerprint(path)
  if now is not None and (now["bytes"], now["sha256"]) == (saved["bytes"], saved["sha256"]):
    return None
  if now is None:
    what = "it does not exist"
  elif now["bytes"] != saved["bytes"]:
    what = f"{now['bytes']} bytes, {saved['bytes']} when the run started"
  else:
    what = "the same size, other content (first and last MiB)"
  return (f"data.path={path!r} now resolves to {now['path'] if now else storage.path(path)}, the run trained on "
          f"{saved['path']}: {what}")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: dict, prefixes=STATE_SHAPING_KEYS, free=FREE_MODEL_KEYS) -> list[str]:
  """'key (saved X, now Y)' for every key under `prefixes` (and not under `free`) on which two configs disagree."""
  a, b = _flat(saved), _flat(json.loads(json.dumps(current, default=str)))
  a = {**_flat(json.loads(config_lib.to_json(config_lib.default_config()))), **a}  # newer keys: saved at default
  keys = sorted(k for k in set(a) | set(b) if k.startswith(prefixes) and not k.startswith(free))
  return [f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree) -> dict[str, tuple]:
  """{'params/conv/kernel': shape, ...} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata.

  Names are the same for a state and its saved metadata (Orbax keeps a
  namedtuple's fields as dict keys, a tuple's positions as indices).
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): tuple(getattr(x, "shape", ())) for path, x in leaves}


def _tree_differences(saved: dict, current: dict) -> list[str]:
  """Paths only in `saved`, only in `current`, or shaped differently: each kind counted, with examples."""
  def kind(paths, what):
    if not paths:
      return []
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return [f"{len(paths)} {'path' if len(paths) == 1 else 'paths'} {what} ({shown})"]
  return (kind(sorted(set(saved) - set(current)), "only in the checkpoint")
          + kind(sorted(set(current) - set(saved)), "only in this config's state")
          + kind([f"{k} saved {saved[k]}, now {current[k]}" for k in sorted(set(saved) & set(current))
                  if saved[k] != current[k]], "shaped differently"))


# How Orbax's array reads wrap their errors (orbax/checkpoint/_src/serialization/serialization.py).
_ABANDONED_READ = "Encountered error while reading array index"


def _abandoned_read(e: BaseException) -> bool:
  """Whether `e` is the late report of an array read Orbax abandoned when another read of a restore failed (its
  cause, or its cancellation, wrapped by Orbax): see storage.quiet_late_reports."""
  return damaged(e) or str(e).startswith(_ABANDONED_READ)


def _listing(make):
  """`make()` (Orbax's listing of the steps), again if a step vanished while it was listed (retention)."""
  for attempt in range(_REREADS):
    try:
      return make()
    except FileNotFoundError:
      if attempt == _REREADS - 1:
        raise
  return None


class Checkpoints:
  """Periodic async saves, newest-N and best-by-metric retention, resume, and preemption-safe final saves."""

  def __init__(self, directory, ckpt_config=None):
    """Manages `directory` (local or gs://); without `ckpt_config` it only reads and creates nothing."""
    self.directory = storage.path(directory)
    self._metadata = {}
    self._unsealed = []  # steps saved (possibly still in flight) without their checksums.json yet
    self._data_records = {}  # data.path -> data_fingerprint, computed once per run
    if ckpt_config is None:
      options = ocp.CheckpointManagerOptions(create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
          preservation_policy=retention_policy(ckpt_config))
    self.manager = _listing(lambda: ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                                          options=options))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, config_dict: dict, metrics: dict | None = None, wait: bool = False,
           unlogged: list | None = None, early_stopping: dict | None = None) -> None:
    """Starts writing `state` at `step` (returns at once unless `wait`); a failed earlier save raises here.

    `unlogged`: the training loop's metric rows since its last log line; `early_stopping`: the early-stopping
    record (actions.EarlyStop); both read back by `loop_state`.
    """
    if step in self.manager.all_steps():
      return
    with self._writing():  # a failed write (this save's or an earlier async one's): one StorageError line
      self._seal()  # the previous save's checksums (Orbax's save would wait for it anyway)
      self._save(step, state, config_dict, metrics, wait, unlogged, early_stopping)

  def _writing(self):
    """storage.writing for a save; a failed save's temporary directories are removed."""
    def remove_partial_saves():
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        tmp.rmtree()
    return storage.writing(f"checkpoints in {self.directory}", remove_partial_saves)

  def _save(self, step, state, config_dict, metrics, wait, unlogged, early_stopping) -> None:
    path = config_dict.get("data", {}).get("path", "")
    if path not in self._data_records:
      self._data_records[path] = data_fingerprint(path)
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        model=ocp.args.StandardSave({"params": state.params, "model_state": state.model_state}),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        config=ocp.args.JsonSave({**config_dict, DATA_RECORD: self._data_records[path]}),
        loop=ocp.args.JsonSave({"unlogged_metrics": list(unlogged or []), "early_stopping": early_stopping}),
        **{name: ocp.args.StandardSave(tree) for name, tree in _optional_items(state).items()}))
    self._unsealed.append(step)
    if wait:
      self._seal()

  def _seal(self) -> None:
    """Waits for the saves in flight and writes each committed step's checksums.json (process 0)."""
    if not self._unsealed:
      return
    self.manager.wait_until_finished()
    steps, self._unsealed = self._unsealed, []
    if jax.process_index() == 0:
      for step in steps:
        if step in self.manager.all_steps():  # not already removed by retention
          write_checksums(self.directory / str(step))

  def metadata(self, step: int) -> tuple[dict, dict]:
    """(saved config, {'model': shapes, 'train': shapes}) of `step`, read without reading its arrays, after
    process 0 has checked the step's files against its checksums.json.

    Raises what reading raised: `damaged(e)` tells a damaged checkpoint (DamagedCheckpoint naming the file that
    differs) from other errors.
    """
    if step not in self._metadata:
      if jax.process_index() == 0:
        verify_checksums(self.directory / str(step))
      md = self.manager.item_metadata(step)
      trees = {}
      for name in ("model", "train"):
        if md[name] is None:
          raise FileNotFoundError(f"no readable {name!r} item in {self.directory}/{step}")
        trees[name] = _shapes(getattr(md[name], "tree", md[name]))
      for name in OPTIONAL_ITEMS:
        if md.get(name) is not None:
          trees[name] = _shapes(getattr(md[name], "tree", md[name]))
      # The handler, not the manager: the manager's restore waits at a barrier for every process,
      # and process 0 reads metadata alone when it picks the step.
      config = ocp.JsonCheckpointHandler().restore(self.directory / str(step) / "config")
      self._metadata[step] = (config, trees)
    return self._metadata[step]

  def _warn_damaged(self, step: int, e: BaseException, log) -> None:
    log(f"warning: checkpoint {self.directory}/{step} cannot be read ({_first_line(e)}); left in place, "
        f"trying the previous one")

  def _vanished(self, step: int) -> bool:
    """Whether `step` is gone from storage (retention of a run saving beside this reader removed it), looked at
    again after a moment, so that a step whose deletion had begun is not reported as damaged."""
    self._metadata.pop(step, None)
    for wait in (0.0, 0.5):
      time.sleep(wait)
      _listing(self.manager.reload)
      if step not in self.manager.all_steps():
        return True
    return False

  def newest_readable_step(self, log=print, skip=()) -> int | None:
    """The newest step (not in `skip`) whose files match their checksums and whose metadata reads, the same on
    every process (process 0 decides), or None.

    A damaged checkpoint is skipped with a one-line warning naming the file and left where it is; a step that
    vanishes while it is read is passed over; any other error (a storage outage, a permission) propagates.
    """
    chosen = -1
    if jax.process_index() == 0:
      for _ in range(_REREADS):
        listed = set(self.manager.all_steps())
        for step in sorted(listed - set(skip), reverse=True):
          try:
            self.metadata(step)
          except Exception as e:  # pylint: disable=broad-exception-caught
            if not damaged(e):
              raise
            if not self._vanished(step):
              self._warn_damaged(step, e, log)
              skip = {*skip, step}
            continue
          chosen = step
          break
        if chosen >= 0:
          break
        _listing(self.manager.reload)
        if not set(self.manager.all_steps()) - listed:
          break  # else steps were deleted while they were read and newer ones saved: read those
    if jax.process_count() > 1:
      chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
    return None if chosen < 0 else chosen

  def restore(self, step: int, like, config_dict: dict | None = None, params_only: bool = False):
    """`like` (a TrainState of arrays or of ShapeDtypeStructs with shardings) filled from `step`.

    Each array is read straight into `like`'s sharding. Raises UserError, reading
    no array, when the saved trees do not match `like`'s (naming the paths, and
    with `config_dict` the config keys that differ) or, with `config_dict`,
    when a state-shaping key differs. `params_only` restores the model item
    alone (and the EMA, parameters too), keeping `like`'s step, optimizer state and loss scale.
    A damaged checkpoint is a UserError naming the file; `restore_newest` falls back instead.
    """
    storage.quiet_late_reports(_abandoned_read)
    try:
      return self._read(step, like, config_dict, params_only)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      storage.abandoned_io()
      if not damaged(e):
        raise
      raise self._unreadable(step, e) from None

  def _unreadable(self, step: int, e: BaseException) -> UserError:
    return UserError(f"checkpoint {self.directory}/{step} cannot be read ({_first_line(e)}). Move it out of "
                     f"{self.directory} to use the previous one.")

  def restore_newest(self, like, config_dict: dict | None = None, params_only: bool = False, log=print,
                     step: int | None = None):
    """(step, state) of the newest intact checkpoint, or (None, None) if there is none: what training's resume,
    `eval`, `export`, `sample`, `compress` and `jaxmodels.load_model` read. With `step`, that checkpoint's
    (no fallback: UserError naming the saved steps if it is not one, or naming the damaged file).

    `like(trees)` gives the state to fill (see `restore`) from the step's saved trees (`metadata(step)[1]`).
    A damaged step (a file that differs from its checksum, metadata or arrays that cannot be read) is reported
    in one line and the previous one is read; a step deleted while it is read (a run saving beside this reader
    with checkpoint.keep) makes the newest be chosen again, at most a few times, then a UserError. In a
    multi-process job an array that fails to read on restore is a UserError (the processes cannot agree on a
    fallback); damage the checksums show is found before, by process 0, and falls back everywhere.
    """
    if step is not None:
      steps = self.manager.all_steps()
      if step not in steps:
        raise UserError(f"{self.directory} has no checkpoint {step} (saved steps: "
                        f"{', '.join(map(str, sorted(steps))) or 'none'})")
      try:
        state = like(self.metadata(step)[1])
      except Exception as e:  # pylint: disable=broad-exception-caught
        if not damaged(e):
          raise
        raise self._unreadable(step, e) from None
      return step, self.restore(step, state, config_dict, params_only)
    skipped, rereads = set(), 0
    while True:
      step = self.newest_readable_step(log, skipped)
      if step is None:
        return None, None
      state = like(self.metadata(step)[1])
      if jax.process_count() > 1:
        return step, self.restore(step, state, config_dict, params_only)
      storage.quiet_late_reports(_abandoned_read)
      try:
        return step, self._read(step, state, config_dict, params_only)
      except Exception as e:  # pylint: disable=broad-exception-caught
        storage.abandoned_io()
        gone = self._vanished(step)
        if not gone and (isinstance(e, UserError) or not damaged(e)):
          raise
        if gone:
          rereads += 1
          if rereads > _REREADS:
            raise UserError(f"checkpoints in {self.directory} were deleted while being read, {rereads} times in a "
                            f"row (a run saving there with a small checkpoint.keep): try again, or read a "
                            f"copy") from None
          log(f"note: checkpoint {self.directory}/{step} was deleted while it was read; reading the newest again")
          continue
        self._warn_damaged(step, e, log)
        skipped.add(step)

  def resume_newest(self, like, config_dict: dict | None = None, log=print):
    """`restore_newest` for a run that goes on training here: (None, None) only when nothing was saved. If every
    saved checkpoint is damaged, UserError (a fresh start would train step 0 on over them)."""
    step, restored = self.restore_newest(like, config_dict, log=log)
    if step is None and (saved := sorted(self.manager.all_steps())):
      raise UserError(f"{self.directory}: none of the saved checkpoints ({', '.join(map(str, saved))}) is intact, "
                      f"so the run cannot resume; move them away to start over, or use a new workdir")
    return step, restored

  def nothing_readable(self, run) -> UserError:
    """The one-line error of a reader that found no checkpoint of `run` to read (restore_newest gave None):
    none saved, or every saved one damaged."""
    saved = sorted(self.manager.all_steps())
    if not saved:
      return UserError(f"{run} has no checkpoint")
    return UserError(f"{run} has no readable checkpoint: every saved one ({', '.join(map(str, saved))}) is "
                     f"damaged (the warnings above name the files)")

  def _read(self, step: int, like, config_dict: dict | None, params_only: bool):
    """`restore` without turning a damaged checkpoint's error into a UserError."""
    saved_config, trees = self.metadata(step)
    where = f"{self.directory}/{step}"
    if config_dict is not None:
      diffs = config_differences(saved_config, config_dict)
      if diffs:
        raise UserError(f"cannot resume from {where}: the config differs in keys that shape the state or split "
                        f"the data: {'; '.join(diffs)}. Use a new --workdir, or --config.checkpoint.restore_from "
                        f"to start from this run's parameters.")
      changed = data_difference(saved_config, config_dict)
      if changed:
        raise UserError(f"cannot resume from {where}: {changed}. Give data.path as the run's file (an absolute "
                        f"path, or run from the directory the run started in), or use a new --workdir.")
    items = {"model": {"params": like.params, "model_state": like.model_state}}
    if not params_only:
      items["train"] = {"step": like.step, "opt_state": like.opt_state}
    items.update({name: tree for name, tree in _optional_items(like).items()
                  if name in trees and (name == "ema" or not params_only)})
    targets, problems = {}, []
    for name, tree in items.items():
      targets[name] = _target(_abstract(tree), trees[name])
      if targets[name] is None:
        problems += _tree_differences(trees[name], _shapes(tree))
    if problems:
      if config_dict is None and not params_only:  # the Trainer's resume: its arguments built the state, no config
        raise UserError(f"cannot restore {where}: its saved state does not match the state built here: "
                        f"{'; '.join(problems)}. Use a new workdir, or the module and optimizer it was saved with.")
      changed = ("" if config_dict is None else "; config keys that changed: " + (
          "; ".join(config_differences(saved_config, config_dict, ("data.", "model.", "train."), ()))
          or "none (did the code change?)"))
      raise UserError(f"cannot restore {where}: its saved state does not match the state this config builds: "
                      f"{'; '.join(problems)}{changed}. Use a new --workdir, or "
                      f"--config.checkpoint.restore_from with restore_mode=params to start from its parameters.")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(target) for name, (target, _) in targets.items()}))
    out = {}
    for name, (target, convert) in targets.items():
      tree = restored[name]
      if convert:  # saved in the other layer layout (scanned <-> unrolled): convert, then place like `like`
        tree = jax.device_put(other_layer_layout(tree), jax.tree.map(lambda x: x.sharding, _abstract(items[name])))
      if name == "ema":
        out["ema_params"] = tree["params"]
      elif name == "loss_scale":
        out["loss_scale"] = like.loss_scale.replace(**tree)
      else:
        out.update(tree)
    return like.replace(**out)

  def loop_state(self, step: int) -> dict:
    """What the loop kept at `step`: `unlogged_metrics` (rows not yet logged) and `early_stopping` (or None)."""
    loop = self.manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]
    return {"unlogged_metrics": loop["unlogged_metrics"], "early_stopping": loop.get("early_stopping")}

  def close(self) -> None:
    """Waits for the last async save (StorageError if it failed to write), writes its checksums and releases the
    manager."""
    try:
      with self._writing():
        self._seal()
        self.manager.wait_until_finished()
    finally:
      self.manager.close()


def _target(abstract, saved_shapes: dict):
  """(restore target, whether to convert layouts) for an item saved with `saved_shapes`, or None if none fits.

  A tree saved in the other layer layout (scanned <-> unrolled) restores
  replicated in that layout, then converts.
  """
  if _shapes(abstract) == saved_shapes:
    return abstract, False
  other = jax.eval_shape(other_layer_layout, abstract)
  if other is None or _shapes(other) != saved_shapes:
    return None
  sharding = jax.tree.leaves(abstract)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), other), True


def retention_policy(c):
  """Orbax's preservation policy for `checkpoint.keep` and `checkpoint.keep_best`; UserError for bad values."""
  if c.keep < 1:
    raise UserError(f"checkpoint.keep must be at least 1, got {c.keep}")
  policies = [checkpoint_managers.LatestN(n=c.keep)]
  if c.keep_best:
    if c.best_mode not in ("min", "max"):
      raise UserError(f"checkpoint.best_mode={c.best_mode!r}: expected min or max")
    policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m[c.keep_best], n=1,
                                              reverse=c.best_mode == "min", keep_checkpoints_without_metrics=False))
  return checkpoint_managers.AnyPreservationPolicy(policies)


def is_export(path) -> bool:
  """Whether `path` (local or gs://) holds parameters alone, written by `jaxmodels export`, `compress` or `import-hf`
  (a `params/` directory), rather than a training run's checkpoints.

  `params/` alone decides: no run has one, and an export whose other files are missing (a killed export) is still
  an export, so readers name the missing file instead of looking for checkpoints it never had.
  """
  return (storage.path(path) / "params").is_dir()


def refuse_adapters(path: str, saved_config: dict) -> None:
  """UserError naming checkpoint.restore_from=`path` when the run or export it names (its saved config) holds
  LoRA adapters apart from the weights: a run starts from a model without them, which `jaxmodels export` (merged,
  the default) makes."""
  rank = saved_config.get("train", {}).get("lora", {}).get("rank", 0)
  if rank:
    raise UserError(f"checkpoint.restore_from={path!r} holds LoRA adapters apart from its weights (train.lora.rank="
                    f"{rank}): a run starts from a model without them; merge them first (jaxmodels export "
                    f"--workdir RUN --out DIR, without --keep-adapters) and restore from DIR")


def restore_export(path: str, like, config_dict: dict):
  """`like` (a TrainState of ShapeDtypeStructs with shardings) with its params and model_state read from the
  export or Hugging Face import at `path`, straight into `like`'s shardings (scanned <-> unrolled layouts
  convert); step and optimizer state stay as in `like`.

  Raises UserError, reading no array, when the export's model.family is not `config_dict`'s or its parameter
  shapes differ from those `like` holds (naming the paths and the model keys that differ).
  """
  p, key = storage.path(path), f"checkpoint.restore_from={path!r}"
  saved = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
  family, saved_family = config_dict["model"]["family"], saved.get("model", {}).get("family")
  if saved_family != family:
    raise UserError(f"{key} holds a model.family={saved_family} model, but this run builds model.family={family}")
  refuse_adapters(path, saved)
  tree = {"params": like.params, "model_state": like.model_state}
  verify_export(path)
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(p / "params").item_metadata
    saved_shapes = _shapes(getattr(metadata, "tree", metadata))
    target = _target(_abstract(tree), saved_shapes)
    if target is None:
      keys = "; ".join(config_differences(saved, config_dict, ("model.",), FREE_MODEL_KEYS)) or "none"
      current = _shapes(tree)
      other = jax.eval_shape(other_layer_layout, _abstract(tree))
      if other is not None and set(_shapes(other)) == set(saved_shapes):  # compared in the saved layer layout
        current = _shapes(other)
      raise UserError(f"{key}: its parameters do not fit this config's model: "
                      f"{'; '.join(_tree_differences(saved_shapes, current))}; model keys that differ: {keys}")
    restored = ckptr.restore(p / "params", target[0])
  if target[1]:  # saved in the other layer layout
    restored = jax.device_put(other_layer_layout(restored), jax.tree.map(lambda x: x.sharding, _abstract(tree)))
  return like.replace(**restored)


def best_step(directory) -> int:
  """The step of `directory` (a run's checkpoints/) that `checkpoint.keep_best` keeps: of the kept steps, the one
  whose evaluation (the run's metrics.jsonl, beside checkpoints/) has the best value of that metric
  (`checkpoint.best_mode`; the oldest of equal ones, as retention keeps). UserError if the run kept no best
  checkpoint."""
  reader = Checkpoints(directory)
  try:
    newest = reader.newest_readable_step()
    c = reader.metadata(newest)[0].get("checkpoint", {}) if newest is not None else {}
    kept = set(reader.manager.all_steps())
  finally:
    reader.close()
  metric, sign = c.get("keep_best"), (-1 if c.get("best_mode") == "min" else 1)
  log = storage.path(directory).parent / "metrics.jsonl"
  scored = []
  for line in (log.read_text().splitlines() if metric and log.is_file() else []):
    try:
      row = json.loads(line)
    except ValueError:  # a line torn by a kill
      continue
    if row.get("split") == "eval" and row.get("step") in kept and isinstance(row.get(metric), (int, float)):
      scored.append((sign * row[metric], -row["step"]))
  if not scored:
    raise UserError(f"{directory}: the run kept no best checkpoint (checkpoint.keep_best was not set, or no kept "
                    f"step was evaluated): pass step=N")
  return -max(scored)[1]


def resolve_restore_from(path: str):
  """(checkpoints directory, step) for --config.checkpoint.restore_from: a workdir, its checkpoints/ (their newest
  intact step), or a step."""
  p = storage.path(path)
  if p.name.isdigit():
    return p.parent, int(p.name)
  directory = p if p.name == "checkpoints" else checkpoint_dir(p)
  reader = Checkpoints(directory)
  try:
    step = reader.newest_readable_step()
  finally:
    reader.close()
  if step is None:
    raise UserError(f"checkpoint.restore_from={path!r}: no checkpoint found")
  return directory, step
