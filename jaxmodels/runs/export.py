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

import contextlib
import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxmodels import config as config_lib
from jaxmodels.compress import quantization
from jaxmodels.models import build_model, lora
from jaxmodels.optim import precision
from jaxmodels.runs import checkpoint
from jaxmodels.runs.state import TrainState, split_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["build_saved_model", "copy_run_files", "export", "load_model", "load_params", "load_run_model",
           "load_trained_model", "load_trained_params", "refuse_existing", "RUN_FILES", "save_model", "save_params",
           "writing_out"]

# A run's files an export keeps beside its parameters: what rebuilds the model (and its vocabulary).
RUN_FILES = ("config.json", "model.json", "vocab.json", "chat_template.json")  # chat: data.source=sft


def _read_json(directory, name: str) -> dict:
  path = storage.path(directory) / name
  if not path.is_file():
    raise UserError(f"{path} not found: is {directory} a jaxmodels workdir or export?")
  return json.loads(path.read_text())


def build_saved_model(directory) -> nnx.Module:
  """The (randomly initialised) model a workdir or export was trained with, quantized as it was (QAT run,
  `jaxmodels compress` export; jaxmodels.compress.quantization), with its LoRA adapters (`train.lora`)."""
  config = config_lib.from_saved(_read_json(directory, "config.json"))
  spec = _read_json(directory, "model.json")
  model = build_model(config.model, tuple(spec["input_shape"]), spec["num_outputs"], nnx.Rngs(0),
                      task=spec["task"])
  model = quantization.apply(model, quantization.spec_of(directory), tuple(spec["input_shape"]), spec["task"])
  return lora.from_config(model, config.train.lora, nnx.Rngs(0))


def load_run_model(workdir, step: int | None = None, log=print) -> nnx.Module:
  """The model of a training run (local or gs://), with the parameters of its newest intact checkpoint (or of
  checkpoint `step`): their moving average (cast to the parameters' dtypes) when the run kept one
  (train.ema_decay), else the raw parameters. A damaged newest checkpoint is reported through `log` and the
  previous one is read (checkpoint.Checkpoints.restore_newest). UserError if the run has no readable checkpoint."""
  graphdef, params, model_state = split_model(build_saved_model(workdir))

  def like(trees):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=None,
                      ema_params=precision.ema_init(params) if "ema" in trees else None)

  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
  try:
    step, restored = ckpts.restore_newest(like, params_only=True, log=log, step=step)
    if step is None:
      raise ckpts.nothing_readable(workdir)
  finally:
    ckpts.close()
  if restored.ema_params is not None:
    return nnx.merge(graphdef, precision.ema_as_params(restored.ema_params, restored.params), restored.model_state)
  return nnx.merge(graphdef, restored.params, restored.model_state)


def export(workdir, out, merge_lora: bool = True) -> str:
  """Writes the newest checkpoint's parameters (and non-parameter model state) of `workdir` to `out`.

  A LoRA run's adapters (`train.lora`) are merged into their kernels (W + (alpha / r) A B; jaxmodels.models.lora),
  and the export's config says `train.lora.rank=0`: a plain model of the base's structure, which `load_model`,
  `export-hf` and `restore_from` take. `merge_lora=False` keeps W, A and B apart (`load_model` rebuilds the
  LoRA layers). Both paths may be local or gs:// URLs. Raises UserError if `out` exists or `workdir` has no
  checkpoint.
  """
  refuse_existing(out)
  model = load_run_model(workdir)
  with writing_out(out):
    save_model(out, lora.merge_lora(model) if merge_lora else model)
    copy_run_files(workdir, out, lora_merged=merge_lora)
  return str(out)


def refuse_existing(out) -> None:
  """UserError if `out` (local or gs://) exists: exports and conversions never write into an existing path."""
  if storage.path(out).exists():
    raise UserError(f"--out {out} already exists")


@contextlib.contextmanager
def writing_out(out):
  """`storage.writing` for a command that writes the new or empty directory `out` (export, compress, import-hf,
  export-hf): a write the storage refuses (no space, read-only, ...) is a StorageError naming `out` and the cause,
  after what was written under `out` is removed (and `out` itself where it did not exist), so a failed write
  leaves no half-written export for `load_model` to find."""
  p = storage.path(out)
  existed = p.exists()

  def remove_partial():
    if not existed:
      p.rmtree(missing_ok=True)
      return
    for child in p.iterdir():
      if child.is_dir():
        child.rmtree()
      else:
        child.unlink()
  with storage.writing(out, remove_partial):
    yield


def copy_run_files(workdir, out, lora_merged: bool = False) -> None:
  """Copies the RUN_FILES that `workdir` has into the export `out` (either local or gs://). `lora_merged`: `out`
  holds the model with any LoRA adapters merged (jaxmodels.models.lora.merge_lora), so its config says
  `train.lora.rank=0` and it rebuilds as the plain model."""
  for name in RUN_FILES:
    source = storage.path(workdir) / name
    if source.is_file():
      text = source.read_text()
      if name == "config.json" and lora_merged and json.loads(text).get("train", {}).get("lora", {}).get("rank"):
        saved = json.loads(text)
        saved["train"]["lora"]["rank"] = 0
        text = json.dumps(saved, indent=2)
      (storage.path(out) / name).write_text(text)


def save_params(out, params: dict, model_state: dict) -> None:
  """Writes `out/params/` (Orbax; `out` local or gs://): the pure parameter and model-state dicts that `load_model`
  reads, and `out/params/checksums.json` (the size and SHA-256 of each file), which loading checks."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.path(out) / "params", {"params": params, "model_state": model_state})
  if jax.process_index() == 0:
    checkpoint.write_checksums(storage.path(out) / "params")


def save_model(out, model: nnx.Module) -> None:
  """Writes `out/params/` (local or gs://) from a module: its parameters and non-parameter model state."""
  _, params, model_state = split_model(model)
  save_params(out, params, model_state)


def _load(path):
  graphdef, params, model_state = split_model(build_saved_model(path))
  like = {"params": params, "model_state": model_state}
  checkpoint.verify_export(path)
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


def load_trained_model(path, step: int | str | None = None, log=print) -> nnx.Module:
  """The trained model at `path` (local or gs://), rebuilt with its parameters.

  `path` is an export (`jaxmodels export`, `compress`, `import-hf`: a `params/` directory), or a training workdir
  (`config.json` and `checkpoints/`; also its `checkpoints/` or `checkpoints/<step>` directory). A workdir gives
  its newest intact checkpoint (a damaged newer one is reported through `log` and passed over), `step=N` that
  checkpoint, `step="best"` the one kept by `checkpoint.keep_best`. Raises UserError, in one line, for a path
  that is neither, a step an export cannot have, a step that is no int, "best" or None, or a step the run did
  not keep.
  """
  if isinstance(step, str) and step.isdigit():
    step = int(step)
  if not (step is None or step == "best" or (isinstance(step, int) and not isinstance(step, bool) and step >= 0)):
    raise UserError(f"step={step!r}: expected a saved step (an int), 'best', or None for the newest intact one")
  p = storage.path(path)
  if checkpoint.is_export(p):
    if step is not None:
      raise UserError(f"{path} is an export (one set of parameters): step={step!r} applies to a training workdir")
    return load_model(path)
  workdir = path
  if p.name.isdigit() and p.parent.name == "checkpoints":
    if step is not None and str(step) != p.name:
      raise UserError(f"{path} is checkpoint {p.name}: step={step!r} names another")
    workdir, step = p.parent.parent, int(p.name)
  elif p.name == "checkpoints":
    workdir = p.parent
  if not (storage.path(workdir) / "config.json").is_file() or not checkpoint.checkpoint_dir(workdir).is_dir():
    raise UserError(f"{path}: expected a training workdir (config.json and checkpoints/) or an export (params/, "
                    f"from jaxmodels export, compress or import-hf)")
  if step == "best":
    step = checkpoint.best_step(checkpoint.checkpoint_dir(workdir))
  return load_run_model(workdir, step, log)


def load_trained_params(path, step: int | str | None = None, log=print) -> dict:
  """The parameters of `load_trained_model(path, step)` as a pure nested dict (an export's read directly)."""
  if checkpoint.is_export(path) and step is None:
    return load_params(path)
  return split_model(load_trained_model(path, step, log))[1]
