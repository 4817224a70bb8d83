"""`jaxmodels eval`: a run's checkpoint evaluated on its own or another dataset, without training.

The run's `config.json` rebuilds the experiment (data, model, layout); `--config.data.*` overrides point it at
other data of the same shapes. The parameters (and model state) of the checkpoint are restored and
`Experiment.evaluate` computes exactly what the training loop's evaluation computed, so evaluating a run's
final checkpoint on its own data reproduces its final eval record. The metrics are printed and written to
`workdir/eval_<step>.json` (with the confusion matrix for classifiers).
"""

import ast
import dataclasses
import json

import jax
import jax.numpy as jnp

from ml_collections import config_dict

from jaxmodels import checkpoint
from jaxmodels import config as config_lib
from jaxmodels import export
from jaxmodels import storage
from jaxmodels.errors import UserError


def saved_config(workdir, overrides: list[str]) -> config_dict.ConfigDict:
  """The run's config with `--config.data.K=V` overrides applied (values parsed as Python literals, else strings).

  Raises UserError for a missing config.json or an override outside data.*.
  """
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise UserError(f"{path} not found: is {workdir} a jaxmodels workdir?")
  config = config_lib.from_saved(json.loads(path.read_text()))
  for override in overrides:
    key, _, text = override.removeprefix("--config.").partition("=")
    group, _, name = key.partition(".")
    if not override.startswith("--config.data.") or not _ or name not in config.data:
      raise UserError(f"bad override {override!r}: expected --config.data.KEY=VALUE (a key of data.*)")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    config[group][name] = value
  return config


def evaluate_model(exp, model) -> dict:
  """`Experiment.evaluate` of any module of the experiment's task and shapes (a compressed one too), compiled on its
  own graph."""
  from jaxmodels import train  # pylint: disable=import-outside-toplevel

  graphdef, params, model_state = train.split_model(model)
  t = exp.config.train
  _, eval_fn = train.make_steps(graphdef, exp.tx, t.seed, **train.evaluation_options(t, exp.dataset))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=None)
  return dataclasses.replace(exp, eval_step=jax.jit(eval_fn)).evaluate(state)


def evaluate_run(workdir, step: int | None = None, overrides: tuple[str, ...] = ()) -> tuple[int | None, dict]:
  """(step, metrics) of checkpoint `step` (default: the newest) of `workdir`; writes `eval_<step>.json`. An export
  (`jaxmodels export` or `compress` output) evaluates its parameters: (None, metrics), `eval_export.json`."""
  from jaxmodels.train import build_experiment  # pylint: disable=import-outside-toplevel

  config = saved_config(workdir, list(overrides))
  exp = build_experiment(config)
  if export.is_export(workdir):  # `jaxmodels export` / `compress` output: its parameters, no checkpoints
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
