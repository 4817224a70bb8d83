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

Nothing here moves or deletes a checkpoint except retention (`checkpoint.keep`).
Before restoring, the saved trees (from Orbax's metadata) are compared with the
state the current config builds: a mismatch is a UserError naming the paths and
config keys that differ. A checkpoint whose metadata cannot be read at all
(damaged files) is skipped with a warning and left in place; process 0 decides
which step every process restores.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxmodels import config as config_lib
from jaxmodels.models.transformer import other_layer_layout
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["checkpoint_dir", "Checkpoints", "config_differences", "damaged", "FREE_MODEL_KEYS", "is_export",
           "OPTIONAL_ITEMS", "resolve_restore_from", "restore_export", "retention_policy", "STATE_SHAPING_KEYS"]

# Config keys that shape the saved state: a resumed run must agree on them.
STATE_SHAPING_KEYS = ("data.source", "data.path", "data.seq_len", "data.tokenizer", "data.spatial_dims",
                      "data.vocab_size", "train.optimizer", "train.batch_size", "model.")
# model.* keys that do not change the state (or that restore converts, like scan_layers).
FREE_MODEL_KEYS = ("model.dtype", "model.scan_layers", "model.remat", "model.attention_impl", "model.dropout")
# Tensorstore's status prefixes for files that are damaged or missing (not a transient storage error).
_DAMAGED = ("DATA_LOSS", "NOT_FOUND", "INVALID_ARGUMENT")


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


def damaged(e: Exception) -> bool:
  """Whether an error reading a checkpoint means its files are damaged or missing (not, e.g., a network error)."""
  if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
    return True
  return isinstance(e, ValueError) and str(e).startswith(_DAMAGED)


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


class Checkpoints:
  """Periodic async saves, newest-N and best-by-metric retention, resume, and preemption-safe final saves."""

  def __init__(self, directory, ckpt_config=None):
    """Manages `directory` (local or gs://); without `ckpt_config` it only reads and creates nothing."""
    self.directory = storage.path(directory)
    self._metadata = {}
    if ckpt_config is None:
      options = ocp.CheckpointManagerOptions(create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
          preservation_policy=retention_policy(ckpt_config))
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

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
      self._save(step, state, config_dict, metrics, wait, unlogged, early_stopping)

  def _writing(self):
    """storage.writing for a save; a failed save's temporary directories are removed."""
    def remove_partial_saves():
      for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
        tmp.rmtree()
    return storage.writing(f"checkpoints in {self.directory}", remove_partial_saves)

  def _save(self, step, state, config_dict, metrics, wait, unlogged, early_stopping) -> None:
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        model=ocp.args.StandardSave({"params": state.params, "model_state": state.model_state}),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        config=ocp.args.JsonSave(config_dict),
        loop=ocp.args.JsonSave({"unlogged_metrics": list(unlogged or []), "early_stopping": early_stopping}),
        **{name: ocp.args.StandardSave(tree) for name, tree in _optional_items(state).items()}))
    if wait:
      self.manager.wait_until_finished()

  def metadata(self, step: int) -> tuple[dict, dict]:
    """(saved config, {'model': shapes, 'train': shapes}) of `step`, read without reading its arrays.

    Raises what reading raised: `damaged(e)` tells a damaged checkpoint from other errors.
    """
    if step not in self._metadata:
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

  def newest_readable_step(self, log=print) -> int | None:
    """The newest step whose metadata reads, the same on every process (process 0 decides), or None.

    A damaged checkpoint is skipped with a warning and left where it is; any
    other error (a storage outage, a permission) propagates.
    """
    chosen = -1
    if jax.process_index() == 0:
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          self.metadata(step)
        except (OSError, ValueError) as e:
          if not damaged(e):
            raise
          log(f"warning: checkpoint {self.directory}/{step} cannot be read ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); left in place, trying the previous one")
          continue
        chosen = step
        break
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
    """
    saved_config, trees = self.metadata(step)
    where = f"{self.directory}/{step}"
    if config_dict is not None:
      diffs = config_differences(saved_config, config_dict)
      if diffs:
        raise UserError(f"cannot resume from {where}: the config differs in keys that shape the state: "
                        f"{'; '.join(diffs)}. Use a new --workdir, or --config.checkpoint.restore_from to start "
                        f"from this run's parameters.")
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
      changed = ("" if config_dict is None else "; config keys that changed: " + (
          "; ".join(config_differences(saved_config, config_dict, ("data.", "model.", "train."), ()))
          or "none (did the code change?)"))
      raise UserError(f"cannot restore {where}: its saved state does not match the state this config builds: "
                      f"{'; '.join(problems)}{changed}. Use a new --workdir, or "
                      f"--config.checkpoint.restore_from with restore_mode=params to start from its parameters.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(target) for name, (target, _) in targets.items()}))
    except ValueError as e:
      if not damaged(e):
        raise
      raise UserError(f"checkpoint {where} cannot be read ({str(e).splitlines()[0][:200]}). Move it out of "
                      f"{self.directory} to resume from the previous one.") from None
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
    """Waits for the last async save (StorageError if it failed to write) and releases the manager."""
    try:
      with self._writing():
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
  tree = {"params": like.params, "model_state": like.model_state}
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


def resolve_restore_from(path: str):
  """(checkpoints directory, step) for --config.checkpoint.restore_from: a workdir, its checkpoints/, or a step."""
  p = storage.path(path)
  if p.name.isdigit():
    return p.parent, int(p.name)
  directory = p if p.name == "checkpoints" else checkpoint_dir(p)
  reader = Checkpoints(directory)
  step = reader.latest_step()
  reader.close()
  if step is None:
    raise UserError(f"checkpoint.restore_from={path!r}: no checkpoint found")
  return directory, step
