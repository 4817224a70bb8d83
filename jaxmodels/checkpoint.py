"""Train-state checkpoints through Orbax, under `workdir/checkpoints/`.

Orbax writes each step to a temporary directory and renames it on commit, so a
checkpoint that exists is complete. A run whose workdir already holds a
checkpoint resumes from the newest one; batches and dropout keys are pure
functions of the step, so the resumed run continues exactly.
"""

import os

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` at `step` and waits for the write to commit."""
  mngr.save(step, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like):
  """Restores `step` into the structure, shapes, dtypes and shardings of `like`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
