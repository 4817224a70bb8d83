"""jaxmodels: a JAX/Flax NNX research framework.

Model families live in `jaxmodels.models`, the optimizer factory in
`jaxmodels.optim`, the training loop in `jaxmodels.train`, and every config key
with its default in `jaxmodels.config`.
"""

from jaxmodels.runtime import host as _host

_host.cpu_only_platform()  # no accelerator: keep libtpu (the dev extra) from starting a TPU runtime and its noise

__version__ = "0.1.0"


def load_params(path: str) -> dict:
  """Parameters written by `jaxmodels export`, as a pure nested dict."""
  from jaxmodels.runs.export import load_params as load  # pylint: disable=import-outside-toplevel
  return load(path)


def load_model(path: str):
  """The module written by `jaxmodels export`, rebuilt with its trained parameters."""
  from jaxmodels.runs.export import load_model as load  # pylint: disable=import-outside-toplevel
  return load(path)
