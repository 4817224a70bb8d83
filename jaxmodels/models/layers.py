"""Small helpers shared by the model families."""

import jax

from jaxmodels.errors import UserError


def activation(name: str):
  """A `jax.nn` activation by name (relu, gelu, silu, tanh, ...)."""
  fn = getattr(jax.nn, name, None)
  if fn is None or not callable(fn):
    raise UserError(f"model.activation={name!r} is not a jax.nn activation")
  return fn
