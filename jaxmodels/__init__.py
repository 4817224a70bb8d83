"""jaxmodels: a JAX/Flax NNX research framework.

Subpackages, each importing only those below it (the layers contract in pyproject.toml, checked by import-linter):

    cli                     the `jaxmodels` command, one module per command
    bench | tools           compile/step benchmarks and `plan`; evaluate, compress, sample and plot a run
    train | hf              the training loop and its pieces; Hugging Face interop
    runs                    the train state, checkpoints, exports (`jaxmodels.load_model`)
    config                  every key with its default, validation, experiment files and overrides
    compress                quantization through qwix
    data | models           datasets and loaders; the NNX model families and presets
    optim | parallel | tasks   the optimizer factory; meshes and sharding; losses and metrics
    runtime                 errors, host settings, storage (local or gs://), compilation cache, device memory
"""

import importlib as _importlib

from jaxmodels.runtime import host as _host

_host.cpu_only_platform()  # no accelerator: keep libtpu (the dev extra) from starting a TPU runtime and its noise

__version__ = "0.1.0"

# `import jaxmodels` stays light (no checkpoints, no Orbax, no data loaders): each subpackage, and the few names
# research code reaches for first, load on first use (PEP 562's module __getattr__).
SUBPACKAGES = ("bench", "cli", "compress", "config", "data", "hf", "models", "optim", "parallel", "runs", "runtime",
               "tasks", "tools", "train")
_NAMES = {"Trainer": "jaxmodels.train", "count_params": "jaxmodels.models", "compile_stats": "jaxmodels.bench",
          "make_optimizer": "jaxmodels.optim", "make_mesh": "jaxmodels.parallel", "load_dataset": "jaxmodels.data",
          "default_config": "jaxmodels.config", "apply_lora": "jaxmodels.models", "sample": "jaxmodels.tools.sample"}
__all__ = [*SUBPACKAGES, *_NAMES, "load_model", "load_params"]


def __getattr__(name: str):
  if name in SUBPACKAGES:
    return _importlib.import_module(f"jaxmodels.{name}")
  if name in _NAMES:
    return getattr(_importlib.import_module(_NAMES[name]), name)
  raise AttributeError(f"module 'jaxmodels' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


def load_params(path: str, step: int | str | None = None) -> dict:
  """The trained parameters at `path` as a pure nested dict: see `load_model` for what `path` and `step` take."""
  from jaxmodels.runs.export import load_trained_params as load  # pylint: disable=import-outside-toplevel
  return load(path, step)


def load_model(path: str, step: int | str | None = None):
  """The trained module at `path` (local or gs://), rebuilt with its parameters.

  `path` is an export (`jaxmodels export`, `compress`, `import-hf`) or a training workdir (or its `checkpoints/`
  or `checkpoints/<step>`). A workdir gives its newest intact checkpoint (a damaged newer one is reported and
  passed over), `step=N` checkpoint N, `step="best"` the one `checkpoint.keep_best` kept. Raises
  `jaxmodels.runtime.errors.UserError` (one line) for a path that is neither or a step the run did not keep.
  """
  from jaxmodels.runs.export import load_trained_model as load  # pylint: disable=import-outside-toplevel
  return load(path, step)
