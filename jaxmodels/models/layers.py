"""Small helpers shared by the model families: activations, parameter axis names, typed-config checks.

Each family's config is a frozen dataclass (`TransformerConfig`, `CNNConfig`, ...)
whose `__post_init__` checks its fields with `require`/`choice`, raising
`ValueError` that names the field: modules know nothing of the CLI, whose
`build_model` turns the message into a `UserError` naming `model.<field>`.
"""

import dataclasses

import jax


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
