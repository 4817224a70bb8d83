"""Which parameters train, and how fast: freezing by pattern, LoRA's adapters-only training, per-pattern
learning-rate multipliers (`train.freeze`, `train.lora.*`, `train.lr_multipliers`).

The pattern language is that of `parallel.fallback_rules` and `train.quantization.exclude`: a Python regex,
searched (`re.search`) in each parameter's path, its names joined by '/' as `path_name` writes them
(`stack/blocks/attn/query/kernel`, `embed/embedding`, `layers/0/bias`).

A trainable filter is a predicate on those paths, `trainable(path) -> bool` (`trainable_filter` builds one; None:
everything trains). Two pieces use it, and both must get the same one (the CLI and `Trainer` see to that):
- the optimizer (`freeze`): frozen leaves go through `optax.set_to_zero` inside `optax.partition`, so they take no
  update and hold NO optimizer state (optax's MaskedNode in place of their moments);
- the train step (`split_trainable`, `merge_trainable`): it differentiates only the trainable leaves, so no
  gradient of a frozen weight is ever computed (its zero gradient is a constant the optimizer never reads).
"""

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxmodels.runtime.errors import UserError

__all__ = ["ADAPTERS", "check_patterns", "describe", "freeze", "from_config", "is_adapter", "lr_multipliers",
           "matches", "merge_trainable", "path_name", "split_trainable", "trainable_filter", "trainable_mask"]

ADAPTERS = ("lora_a", "lora_b")  # the leaf names of LoRA's adapter matrices (jaxmodels.models.lora)


def path_name(path) -> str:
  """A pytree path's names joined by '/' (`stack/blocks/attn/query/kernel`): what the patterns are searched in."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def matches(patterns) -> Callable[[str], bool]:
  """A predicate: whether any of the regexes `patterns` (a string or a sequence of them) occurs in a path."""
  compiled = [re.compile(p) for p in ((patterns,) if isinstance(patterns, str) else patterns)]
  return lambda name: any(p.search(name) for p in compiled)


def is_adapter(name: str) -> bool:
  """Whether the path `name` is a LoRA adapter matrix's (its last name one of `ADAPTERS`)."""
  return name.rsplit("/", 1)[-1] in ADAPTERS


def trainable_filter(freeze=(), adapters_only: bool = False) -> Callable[[str], bool] | None:
  """The trainable filter of a run: a path trains unless a `freeze` regex occurs in it, and (`adapters_only`,
  a LoRA run) unless it is not a LoRA adapter (`ADAPTERS`). None when everything trains."""
  if not freeze and not adapters_only:
    return None
  frozen = matches(freeze)
  return lambda name: not frozen(name) and (not adapters_only or is_adapter(name))


def from_config(t) -> Callable[[str], bool] | None:
  """The trainable filter of the `train.*` config group `t`: `train.freeze`, and adapters only for a LoRA run
  (`train.lora.rank` > 0)."""
  return trainable_filter(tuple(t.freeze), adapters_only=t.lora.rank > 0)


def trainable_mask(params, trainable: Callable[[str], bool] | None):
  """True for the leaves of `params` (a pytree: pure dict, nnx.State) that train under the filter `trainable`.
  A lone leaf (no path: what `optax.tree_map_params` passes for the whole tree) trains."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: trainable is None or not path or bool(trainable(path_name(path))), params)


def split_trainable(params: dict, trainable: Callable[[str], bool] | None) -> tuple[dict, dict | None]:
  """(trainable, frozen): the pure nested dict `params` split into two nested dicts by the filter `trainable`,
  each holding only its own leaves. `merge_trainable` joins them back. `trainable` None: (params, None)."""
  if trainable is None:
    return params, None
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
  train = {k: v for k, v in flat.items() if v is not traverse_util.empty_node and trainable("/".join(map(str, k)))}
  return (traverse_util.unflatten_dict(train),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in train}))


def merge_trainable(trainable: dict, frozen: dict | None) -> dict:
  """The nested dict holding the leaves of both (`split_trainable`'s inverse); `trainable` if `frozen` is None."""
  if frozen is None:
    return trainable
  flat = lambda tree: traverse_util.flatten_dict(tree, keep_empty_nodes=True)
  return traverse_util.unflatten_dict({**flat(frozen), **flat(trainable)})


def freeze(tx: optax.GradientTransformation, trainable: Callable[[str], bool] | None) -> optax.GradientTransformation:
  """`tx` on the trainable leaves only (`optax.partition`): the others take zero updates (`optax.set_to_zero`)
  and hold no optimizer state. `trainable` None: `tx` itself."""
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, trainable))
  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def lr_multipliers(pairs) -> optax.GradientTransformation:
  """Per-pattern learning-rate multipliers: each update times the multiplier of the first (regex, multiplier)
  pair whose regex occurs in its path (1 where none does). Chained after the optimizer, it scales the whole
  step (adamw's decoupled weight decay included, which optax also multiplies by the learning rate). Stateless."""
  pairs = [(matches(pattern), float(m)) for pattern, m in pairs]

  def scale(path, u):
    name = path_name(path)
    m = next((m for match, m in pairs if match(name)), 1.0)
    return u if m == 1.0 else (u * jnp.asarray(m, u.dtype))

  return optax.stateless(lambda updates, _params: jax.tree_util.tree_map_with_path(scale, updates))


def check_patterns(params, t) -> None:
  """UserError naming `train.freeze` or `train.lr_multipliers` (the config group `t`) and a pattern of it that
  occurs in no path of `params` (arrays or ShapeDtypeStructs): a misspelt pattern would otherwise freeze or scale
  nothing, silently. The message lists the paths there are."""
  names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for key, patterns in (("train.freeze", tuple(t.freeze)), ("train.lr_multipliers", [p for p, _ in t.lr_multipliers])):
    for pattern in patterns:
      if not any(re.search(pattern, name) for name in names):
        more = f" and {len(names) - 24} more" if len(names) > 24 else ""
        raise UserError(f"{key}: the pattern {pattern!r} occurs in no parameter's path; the paths: "
                        f"{', '.join(names[:24])}{more}")


def describe(params, opt_state, trainable: Callable[[str], bool]) -> str:
  """One line: how many of `params`' scalars train under `trainable`, and the optimizer state's size in bytes
  (`params`, `opt_state`: arrays or ShapeDtypeStructs)."""
  size = lambda x: math.prod(x.shape)
  total = sum(size(x) for x in jax.tree.leaves(params))
  trained = sum(size(x) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(trainable_mask(params, trainable)))
                if t)
  state_bytes = sum(size(x) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
  return (f"{trained:,} of {total:,} parameters train ({100 * trained / total:.2g}%; train.freeze, train.lora); "
          f"optimizer state {state_bytes:,} bytes")
