"""Small helpers shared by the model families: activations, parameter axis names, typed-config checks, and the
checks of inputs a model cannot compute (`check_length`, `check_indices`, `check_slots`).

Each family's config is a frozen dataclass (`TransformerConfig`, `CNNConfig`, ...)
whose `__post_init__` checks its fields with `require`/`choice`, raising
`ValueError` that names the field: modules know nothing of the CLI, whose
`build_model` turns the message into a `UserError` naming `model.<field>`.
"""

import dataclasses

import jax
import numpy as np

__all__ = ["activation", "axes", "check_indices", "check_length", "check_slots", "choice", "known", "POSITIVE",
           "POSITIVE_REAL", "RATE", "require", "resolve", "SIZES", "tuples"]


def activation(name: str):
  """A `jax.nn` activation by name (relu, gelu, silu, tanh, ...); ValueError if there is none."""
  fn = getattr(jax.nn, name, None)
  if fn is None or not callable(fn):
    raise ValueError(f"activation={name!r} is not a jax.nn activation")
  return fn


def axes(*names):
  """Parameter metadata naming each dimension's logical axis (embed, mlp, heads, vocab, conv_out, ...).

  `jaxmodels.parallel` maps the names to mesh axes through `parallel.rules`;
  parameters without names fall back to `parallel.fallback_rules`.
  """
  return {"out_sharding": names, "eager_sharding": False}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# (test, what the error says was expected) for the kinds of value a field takes.
POSITIVE = (lambda v: _is_int(v) and v > 0, "a positive integer")
RATE = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)")
POSITIVE_REAL = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                 "a finite number > 0")
SIZES = (lambda v: isinstance(v, tuple) and all(POSITIVE[0](n) for n in v), "a tuple of positive integers")


def require(config, name: str, kind: tuple) -> None:
  """ValueError `name=value: expected ...` unless `config.name` passes `kind`'s test."""
  value = getattr(config, name)
  test, expected = kind
  if not test(value):
    raise ValueError(f"{name}={value!r}: expected {expected}")


def choice(config, name: str, allowed) -> None:
  """ValueError unless `config.name` is one of `allowed`."""
  allowed = tuple(allowed)
  require(config, name, (lambda v: v in allowed, f"one of {', '.join(map(str, allowed))}"))


def tuples(config, *names) -> None:
  """Stores list-valued fields as tuples (a frozen config stays hashable)."""
  for name in names:
    if isinstance(getattr(config, name), list):
      object.__setattr__(config, name, tuple(getattr(config, name)))


def resolve(config_cls, config, overrides: dict):
  """`config` (default: `config_cls()`) with `overrides` replaced: what modules do with their arguments."""
  config = config_cls() if config is None else config
  if not isinstance(config, config_cls):
    raise TypeError(f"expected a {config_cls.__name__}, got {type(config).__name__}")
  return dataclasses.replace(config, **overrides) if overrides else config


# What a model cannot compute is refused with a ValueError naming the sizes. Shapes are always known when a model
# is called, so lengths are checked everywhere. Values (token ids, a cache index, positions) are checked only where
# they are known while tracing (`known`): in an eager call. Inside jax.jit, scan or grad they are traced, and a
# check would need a device-to-host transfer per step (or checkify's rewrite of the program), so compiled code
# relies on its callers (the data loaders check token ids; the sampler checks prompt + length against max_len).


def known(x):
  """`x` as a NumPy array when its value is known while tracing (a Python number, a NumPy array, a jax.Array
  outside a transformation), else None (a tracer, or an array spread over several hosts)."""
  if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return None
  return np.asarray(x)


def check_length(length: int, max_len: int, what: str = "a sequence") -> None:
  """ValueError `{what} of {length} tokens exceeds max_len={max_len}` for a length the model has no position for."""
  if length > max_len:
    raise ValueError(f"{what} of {length} tokens exceeds max_len={max_len}: the model has no position beyond "
                     f"{max_len - 1}")


def check_indices(values, size: int, what: str) -> None:
  """ValueError naming the first value outside [0, size) (token ids: size = vocabulary; positions: max_len), where
  the values are `known`; traced values are not checked."""
  v = known(values)
  if v is not None and v.size:
    bad = v[(v < 0) | (v >= size)]
    if bad.size:
      raise ValueError(f"{what} {int(bad.flat[0])} is outside [0, {size}) ({bad.size} of {v.size} out of range)")


def check_slots(index, length: int, slots: int) -> None:
  """ValueError unless `length` tokens written at cache slot `index` fit a cache of `slots` slots: `length` is
  always checked, `index` where it is `known` (a traced index would be clamped by `dynamic_update_slice`)."""
  if length > slots:
    raise ValueError(f"{length} tokens do not fit a cache of {slots} slots")
  i = known(index)
  if i is not None and not 0 <= int(i) <= slots - length:
    raise ValueError(f"cache index {int(i)} with {length} token(s) is past the cache's {slots} slots (the last "
                     f"write may start at {slots - length})")
