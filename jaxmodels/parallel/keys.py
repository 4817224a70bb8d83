"""Random keys for the pmap strategy that draw what the jit strategies draw.

Under jit a dropout mask is drawn for the global batch, (B, ...), and each device computes its rows of it (JAX's
partitionable threefry: `jax_threefry_partitionable`, on by default), so `single`, `dp`, `fsdp` and `tp` draw the
same masks. Under pmap each device sees only its own rows, (B/n, ...); a key folded with the device index draws
masks of the same statistics but not the same values, so the same run under pmap took different steps from the
first (a LoRA run from a base: first loss 2.189 under pmap, 2.213 under dp and single, digits_mlp with dropout 0.1).

`rows_key(key, axis_name)` wraps a threefry key in a PRNG implementation (`jax.extend.random.define_prng_impl`)
whose draws of shape (b, ...) are rows [i b, (i + 1) b) of the threefry draw of shape (n b, ...) for the device of
index i of n on `axis_name`: device i's rows of the global batch (pmap's devices hold contiguous rows, process-major),
so a mask is bit-identical to the jit strategies'. Splits and fold-ins are threefry's. A draw of shape () is the
global one. A draw whose leading axis is not the batch's (none in our models) is still uniformly random, as before.
Each device computes the whole (n b, ...) draw's bits and keeps its slice: n times the random-number work of its
own rows (JAX has no public way to start threefry's counters at an offset).
"""

import functools

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random

__all__ = ["rows_key"]

_THREEFRY = jex_random.threefry_prng_impl


@functools.cache
def _rows_impl(devices: int):
  """The PRNG implementation for `devices` devices; key data: (threefry key (2,), device index), uint32."""
  tail = lambda key, base: jnp.concatenate([base, jnp.broadcast_to(key[2:], (*base.shape[:-1], 1))], axis=-1)

  def seed(s):
    return jnp.concatenate([_THREEFRY.seed(s), jnp.zeros((1,), jnp.uint32)])

  def split(key, shape):
    return tail(key, _THREEFRY.split(key[:2], shape))

  def fold_in(key, data):
    return tail(key, _THREEFRY.fold_in(key[:2], data))

  def random_bits(key, bit_width, shape):
    if not shape:
      return _THREEFRY.random_bits(key[:2], bit_width, shape)
    bits = _THREEFRY.random_bits(key[:2], bit_width, (devices * shape[0], *shape[1:]))
    return jax.lax.dynamic_slice_in_dim(bits, key[2] * shape[0], shape[0])

  return jex_random.define_prng_impl(key_shape=(3,), seed=seed, split=split, random_bits=random_bits,
                                     fold_in=fold_in, name=f"threefry2x32 rows of {devices} devices",
                                     tag=f"fry_rows{devices}")


def rows_key(key: jax.Array, axis_name: str) -> jax.Array:
  """`key` (a threefry key: raw uint32 (2,) or typed) as a typed key whose draws are this device's rows of the
  draws `key` makes for the global batch; call inside `jax.pmap` over `axis_name` (the device index and count are
  its axis index and size). Rows are those of a batch split contiguously in axis-index order."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  index = jax.lax.axis_index(axis_name).astype(jnp.uint32)
  return jax.random.wrap_key_data(jnp.concatenate([data, index[None]]),
                                  impl=_rows_impl(jax.lax.axis_size(axis_name)))
