"""`jaxmodels eval`: a run's checkpoint evaluated on its own or another dataset, without training.

The run's `config.json` rebuilds the experiment (data, model, layout); `--config.data.*` overrides point it at
other data of the same shapes. The parameters (and model state) of the checkpoint are restored and
`Experiment.evaluate` computes exactly what the training loop's evaluation computed, so evaluating a run's
final checkpoint on its own data reproduces its final eval record. The metrics are printed and written to
`workdir/eval_<step>.json` (with the confusion matrix for classifiers).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp

from jaxmodels.config.experiments import saved_config
from jaxmodels.runs import checkpoint, export
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.runtime import storage
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.step import make_steps, step_options

__all__ = ["evaluate_model", "evaluate_run"]


def evaluate_model(exp, model) -> dict:
  """`Experiment.evaluate` of any module of the experiment's task and shapes (a compressed one too), compiled on its
  own graph."""

  graphdef, params, model_state = split_model(model)
  _, eval_fn = make_steps(graphdef, exp.tx, step_options(exp.config.train, exp.dataset))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=None)
  return dataclasses.replace(exp, eval_step=jax.jit(eval_fn)).evaluate(state)


def evaluate_run(workdir, step: int | None = None, overrides: tuple[str, ...] = (),
                 write: bool = False) -> tuple[int | None, dict]:
  """(step, metrics) of checkpoint `step` (default: the newest intact one) of `workdir`. An export (`jaxmodels
  export` or `compress` output) evaluates its parameters: (None, metrics).

  Writes nothing unless `write` (as `jaxmodels eval` asks): then `workdir/eval_<step>.json` (`eval_export.json`),
  replaced atomically, so it may run beside the training run that writes `workdir` (no file of the run's is
  touched, and no lock is taken). A damaged newest checkpoint is reported and the previous one evaluated; one
  deleted while it is read (a run saving with checkpoint.keep) makes the newest be read again.
  """

  config = saved_config(workdir, list(overrides))
  exp = build_experiment(config)
  if checkpoint.is_export(workdir):  # `jaxmodels export` / `compress` output: its parameters, no checkpoints
    metrics = evaluate_model(exp, export.load_model(workdir))
    if write:
      storage.write_files(workdir, {"eval_export.json": json.dumps({"step": None, "data": config.data.to_dict(),
                                                                    **metrics})})
    return None, metrics
  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
  try:
    step, restored = ckpts.restore_newest(lambda _trees: exp.checkpoint_state, params_only=True, step=step)
    if step is None:
      raise ckpts.nothing_readable(workdir)
  finally:
    ckpts.close()
  state = exp.layout.from_checkpoint(restored)
  metrics = exp.evaluate(state)
  if write:
    storage.write_files(workdir, {f"eval_{step}.json": json.dumps({"step": step, "data": config.data.to_dict(),
                                                                    **metrics})})
  return step, metrics
