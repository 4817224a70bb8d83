"""Small helpers shared by the model families."""

import jax

from jaxmodels.errors import UserError


def activation(name: str):
  """A `jax.nn` activation by name (relu, gelu, silu, tanh, ...)."""
  fn = getattr(jax.nn, name, None)
  if fn is None or not callable(fn):
    raise UserError(f"model.activation={name!r} is not a jax.nn activation")
  return fn


def axes(*names):
  """Parameter metadata naming each dimension's logical axis (embed, mlp, heads, vocab, conv_out, ...).

  `jaxmodels.parallel` maps the names to mesh axes through `parallel.rules`;
  parameters without names fall back to `parallel.fallback_rules`.
  """
  return {"out_sharding": names, "eager_sharding": False}
