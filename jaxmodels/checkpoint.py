"""Train-state checkpoints through Orbax, under `workdir/checkpoints/`.

Orbax writes each step to a temporary directory and renames it on commit, so a
checkpoint that exists is complete. A run whose workdir already holds a
checkpoint resumes from the newest one; batches and dropout keys are pure
functions of the step, so the resumed run continues exactly.
"""

import os

import jax
import orbax.checkpoint as ocp

from jaxmodels.models.transformer import other_layer_layout


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` at `step` and waits for the write to commit."""
  mngr.save(step, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like):
  """Restores `step` into the structure, shapes, dtypes and shardings of `like`.

  A Transformer checkpoint saved with the other `model.scan_layers` setting is
  restored in its own layout and converted, so scanned and unrolled runs can
  resume from each other.
  """
  def into(target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))

  try:
    return into(like)
  except ValueError:
    other = other_layer_layout(like)
    if other is None:
      raise
    return other_layer_layout(into(other))
