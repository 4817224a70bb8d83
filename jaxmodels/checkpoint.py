"""Checkpoints through Orbax, under `workdir/checkpoints/<step>/`.

Each checkpoint holds three items: `model` (parameters and non-parameter model
state such as BatchNorm statistics: all a model needs to run), `train` (step
and optimizer state) `config` (the resolved config, JSON) and `loop` (the training loop's metric
rows not yet logged, so a resumed run logs exactly what an uninterrupted one would). The RNG
and the data position need no item: dropout keys and batches are pure
functions of (seed, step), so the step restores both exactly.

Orbax writes each save into a temporary directory and renames it on commit, so
a step directory that exists was complete when written; temporary leftovers of
a killed save are removed on the next start. Saves are asynchronous: training
goes on while they are written. A committed checkpoint that cannot be read
(truncated or damaged files) is moved to `workdir/checkpoints_corrupt/` and the
next older one is used.
"""

import json
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxmodels import config as config_lib
from jaxmodels.errors import UserError
from jaxmodels.models.transformer import other_layer_layout

# Config keys that shape the saved state: a resumed run must agree on them.
STATE_SHAPING_KEYS = ("data.source", "data.path", "data.seq_len", "data.tokenizer", "data.spatial_dims",
                      "train.optimizer", "train.batch_size", "model.")
# model.* keys that do not change the state (or that restore converts, like scan_layers).
FREE_MODEL_KEYS = ("model.dtype", "model.scan_layers", "model.remat", "model.attention_impl", "model.dropout")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """'key (saved X, now Y)' for every state-shaping key on which two configs disagree."""
  a, b = _flat(saved), _flat(json.loads(json.dumps(current, default=str)))
  a = {**_flat(json.loads(config_lib.to_json(config_lib.default_config()))), **a}  # newer keys: saved at default
  keys = sorted(k for k in set(a) | set(b)
                if k.startswith(STATE_SHAPING_KEYS) and not k.startswith(FREE_MODEL_KEYS))
  return [f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_item(mngr, step: int, name: str, like):
  """Restores one item into `like`'s structure and shardings, converting scanned <-> unrolled layouts."""
  def into(target):
    return mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(_abstract(target))}))[name]
  try:
    return into(like)
  except ValueError:
    other = other_layer_layout(like)
    if other is None:
      raise
    # Stacking/unstacking leaves the converted arrays with equivalent but differently spelled shardings
    # (P() for P(None, None, None)), which jit keys apart: put them exactly where `like` lives.
    return jax.device_put(other_layer_layout(into(other)), jax.tree.map(lambda x: x.sharding, like))


class Checkpoints:
  """Periodic async saves, newest-N and best-by-metric retention, resume, and preemption-safe final saves."""

  def __init__(self, directory: str, ckpt_config=None):
    """Manages `directory`; without `ckpt_config` it only reads (a run to restore from)."""
    self.directory = os.path.abspath(directory)
    if ckpt_config is None:
      self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True))
      return
    c = ckpt_config
    if c.keep < 1:
      raise UserError(f"checkpoint.keep must be at least 1, got {c.keep}")
    policies = [checkpoint_managers.LatestN(n=c.keep)]
    if c.keep_best:
      if c.best_mode not in ("min", "max"):
        raise UserError(f"checkpoint.best_mode={c.best_mode!r}: expected min or max")
      policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m[c.keep_best], n=1,
                                                reverse=c.best_mode == "min",
                                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, config_dict: dict, metrics: dict | None = None, wait: bool = False,
           unlogged: list | None = None) -> None:
    """Starts writing `state` at `step` (returns at once unless `wait`); a failed earlier save raises here.

    `unlogged`: the training loop's metric rows since its last log line (see `unlogged_metrics`).
    """
    if step in self.manager.all_steps():
      return
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        model=ocp.args.StandardSave({"params": state.params, "model_state": state.model_state}),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        config=ocp.args.JsonSave(config_dict),
        loop=ocp.args.JsonSave({"unlogged_metrics": list(unlogged or [])})))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, like, config_dict: dict | None = None, params_only: bool = False):
    """`like` (a TrainState) filled from `step`; with `config_dict`, refuses a state-shaping mismatch.

    `params_only` restores the model item alone (parameters and model state), keeping
    `like`'s step and optimizer state.
    """
    if config_dict is not None:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      diffs = config_differences(saved, config_dict)
      if diffs:
        raise UserError(f"cannot resume from {self.directory}/{step}: the config differs in keys "
                        f"that shape the state: {'; '.join(diffs)}. Use a new --workdir, or "
                        f"--config.checkpoint.restore_from to start from this run's parameters.")
    model = _restore_item(self.manager, step, "model", {"params": like.params, "model_state": like.model_state})
    if params_only:
      return like.replace(**model)
    train = _restore_item(self.manager, step, "train", {"step": like.step, "opt_state": like.opt_state})
    return like.replace(**model, **train)

  def unlogged_metrics(self, step: int) -> list:
    """The metric rows the loop had not logged when it saved `step`."""
    loop = self.manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]
    return loop["unlogged_metrics"]

  def restore_newest(self, like, config_dict: dict, log=print):
    """The newest readable checkpoint as (state, step), or None; unreadable ones are moved aside."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(step, like, config_dict), step
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        moved = self._quarantine(step)
        log(f"checkpoint {step} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"moved to {moved}, trying the previous one")
    return None

  def _quarantine(self, step: int) -> str:
    target = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def close(self) -> None:
    """Waits for the last async save (raising if it failed) and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_restore_from(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for --config.checkpoint.restore_from: a workdir, its checkpoints/, or a step."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  directory = path if os.path.basename(path) == "checkpoints" else checkpoint_dir(path)
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise UserError(f"checkpoint.restore_from={path!r}: no checkpoint found")
  return directory, steps[-1]
