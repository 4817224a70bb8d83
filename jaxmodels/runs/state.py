"""The train state as pure pytrees, and the one helper that splits an NNX module into them.

The NNX model is split once into a static graph definition and pure nested
dicts of arrays (parameters, other model state such as BatchNorm statistics).
Compiled steps take and return these pytrees; `nnx.merge` rebuilds a module.
"""

import flax
import jax
import optax
from flax import nnx

from jaxmodels.optim import precision

__all__ = ["split_model", "TrainState"]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # nnx.Param variables as a pure nested dict of arrays
  model_state: dict  # every other variable (BatchNorm statistics, ...), likewise
  opt_state: optax.OptState
  ema_params: dict | None = None  # float32 moving average of params (train.ema_decay > 0; jaxmodels.optim.precision)
  loss_scale: precision.LossScale | None = None  # dynamic loss scale (model.dtype=float16), else None


def split_model(model: nnx.Module):
  """(graphdef, params, model_state), the states as pure nested dicts of arrays.

  Pure dicts, not `nnx.State`: jit flattens them in C++, where State and Variable
  nodes cost a Python call each on every step (2-3x the dispatch time of a
  small model). `nnx.merge` accepts them back.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
