"""Trained parameters for research code: export a run's parameters alone, load them back into a module.
A run with a parameter EMA (train.ema_decay) exports the EMA in place of the raw parameters.

    jaxmodels export --workdir runs/digits_cnn --out exported/digits_cnn

writes `OUT/params/` (Orbax, parameters only: no optimizer state), `OUT/config.json`
and `OUT/model.json` (the input shape, output count and task the model was
built for), plus `OUT/vocab.json` for language models. Then, anywhere:

    import jaxmodels
    model = jaxmodels.load_model("exported/digits_cnn")     # an nnx.Module, ready to call
    params = jaxmodels.load_params("exported/digits_cnn")   # the pure parameter dict
"""

import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxmodels import config as config_lib
from jaxmodels.compress import quantization
from jaxmodels.models import build_model
from jaxmodels.optim import precision
from jaxmodels.runs import checkpoint
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["build_saved_model", "copy_run_files", "export", "load_model", "load_params", "load_run_model",
           "load_trained_model", "refuse_existing", "RUN_FILES", "save_model", "save_params"]

# A run's files an export keeps beside its parameters: what rebuilds the model (and its vocabulary).
RUN_FILES = ("config.json", "model.json", "vocab.json")


def _read_json(directory, name: str) -> dict:
  path = storage.path(directory) / name
  if not path.is_file():
    raise UserError(f"{path} not found: is {directory} a jaxmodels workdir or export?")
  return json.loads(path.read_text())


def build_saved_model(directory) -> nnx.Module:
  """The (randomly initialised) model a workdir or export was trained with, quantized as it was (QAT run,
  `jaxmodels compress` export; jaxmodels.compress.quantization)."""
  config = config_lib.from_saved(_read_json(directory, "config.json"))
  spec = _read_json(directory, "model.json")
  model = build_model(config.model, tuple(spec["input_shape"]), spec["num_outputs"], nnx.Rngs(0),
                      task=spec["task"])
  return quantization.apply(model, quantization.spec_of(directory), tuple(spec["input_shape"]), spec["task"])


def load_run_model(workdir) -> nnx.Module:
  """The model of a training run (local or gs://), with the parameters of its newest checkpoint: their moving
  average (cast to the parameters' dtypes) when the run kept one (train.ema_decay), else the raw parameters."""
  graphdef, params, model_state = split_model(build_saved_model(workdir))
  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
  step = ckpts.latest_step()
  if step is None:
    raise UserError(f"{workdir} has no checkpoint")
  has_ema = "ema" in ckpts.metadata(step)[1]
  like = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=None,
                    ema_params=precision.ema_init(params) if has_ema else None)
  restored = ckpts.restore(step, like, params_only=True)
  ckpts.close()
  if has_ema:
    return nnx.merge(graphdef, precision.ema_as_params(restored.ema_params, restored.params), restored.model_state)
  return nnx.merge(graphdef, restored.params, restored.model_state)


def export(workdir, out) -> str:
  """Writes the newest checkpoint's parameters (and non-parameter model state) of `workdir` to `out`.

  Both may be local paths or gs:// URLs. Raises UserError if `out` exists or `workdir` has no checkpoint.
  """
  refuse_existing(out)
  save_model(out, load_run_model(workdir))
  copy_run_files(workdir, out)
  return str(out)


def refuse_existing(out) -> None:
  """UserError if `out` (local or gs://) exists: exports and conversions never write into an existing path."""
  if storage.path(out).exists():
    raise UserError(f"--out {out} already exists")


def copy_run_files(workdir, out) -> None:
  """Copies the RUN_FILES that `workdir` has into the export `out` (either local or gs://)."""
  for name in RUN_FILES:
    source = storage.path(workdir) / name
    if source.is_file():
      (storage.path(out) / name).write_text(source.read_text())


def save_params(out, params: dict, model_state: dict) -> None:
  """Writes `out/params/` (Orbax; `out` local or gs://): the pure parameter and model-state dicts that `load_model`
  reads."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.path(out) / "params", {"params": params, "model_state": model_state})


def save_model(out, model: nnx.Module) -> None:
  """Writes `out/params/` (local or gs://) from a module: its parameters and non-parameter model state."""
  _, params, model_state = split_model(model)
  save_params(out, params, model_state)


def _load(path):
  graphdef, params, model_state = split_model(build_saved_model(path))
  like = {"params": params, "model_state": model_state}
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(storage.path(path) / "params",
                         jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
  return graphdef, tree


def load_params(path) -> dict:
  """The exported parameters (local path or gs:// URL) as a pure nested dict (what `nnx.merge` and optax take)."""
  return _load(path)[1]["params"]


def load_model(path) -> nnx.Module:
  """The exported model (local path or gs:// URL) as an NNX module with its trained parameters."""
  graphdef, tree = _load(path)
  return nnx.merge(graphdef, tree["params"], tree["model_state"])


def load_trained_model(path) -> nnx.Module:
  """The trained model at `path` (local or gs://): an export's (`export`, `compress`, `import-hf`), or a training
  run's at its newest checkpoint (`load_run_model`)."""
  return load_model(path) if checkpoint.is_export(path) else load_run_model(path)
