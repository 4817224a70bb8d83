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
from jaxmodels.runtime.errors import UserError
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


def evaluate_run(workdir, step: int | None = None, overrides: tuple[str, ...] = ()) -> tuple[int | None, dict]:
  """(step, metrics) of checkpoint `step` (default: the newest) of `workdir`; writes `eval_<step>.json`. An export
  (`jaxmodels export` or `compress` output) evaluates its parameters: (None, metrics), `eval_export.json`."""

  config = saved_config(workdir, list(overrides))
  exp = build_experiment(config)
  if checkpoint.is_export(workdir):  # `jaxmodels export` / `compress` output: its parameters, no checkpoints
    metrics = evaluate_model(exp, export.load_model(workdir))
    (storage.path(workdir) / "eval_export.json").write_text(
        json.dumps({"step": None, "data": config.data.to_dict(), **metrics}))
    return None, metrics
  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
  try:
    steps = ckpts.manager.all_steps()
    step = ckpts.latest_step() if step is None else step
    if step is None or step not in steps:
      raise UserError(f"{workdir} has no checkpoint {step if step is not None else ''}".rstrip()
                      + f" (saved steps: {', '.join(map(str, sorted(steps))) or 'none'})")
    state = exp.layout.from_checkpoint(ckpts.restore(step, exp.checkpoint_state, params_only=True))
  finally:
    ckpts.close()
  metrics = exp.evaluate(state)
  (storage.path(workdir) / f"eval_{step}.json").write_text(
      json.dumps({"step": step, "data": config.data.to_dict(), **metrics}))
  return step, metrics
