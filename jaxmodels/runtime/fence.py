"""`fenced(tree)`: floating arrays that XLA cannot narrow ahead of their uses, so that a cast to the compute dtype
happens where the code puts it, one layer or one chunk at a time.

XLA's TPU compiler runs bfloat16 propagation (its `bfloat16-propagation` pass): a float32 value whose only uses
are conversions to bfloat16 is made bfloat16 itself, the conversion moving to where the value is made. For a
loop that slices a float32 stack and casts each slice (a scanned layer stack's `kernel.astype(bfloat16)` inside
`nnx.Linear`, the chunked cross-entropy's per-chunk cast of the head), the value is the whole loop-invariant
stack: XLA converts all of it before the loop and keeps the bfloat16 copy through the backward loop. For Llama
3.2 1B under FSDP on a v5e 2x2 slice that copy of the 16 layers was about 0.45 GB per chip, and that of the
embedding table (the tied head) 0.13 GB; fencing them took the step's temporaries from 3.80 to 3.39 GB per chip
(docs/benchmarks.md, issue 35; tests/test_memory_per_layer.py checks that no such copy is left).

`fenced` passes each floating array through a bitcast to the unsigned integer of its width and back, with an
optimization barrier between them: the pass cannot narrow an integer, nor see through the barrier. Values and
dtypes are unchanged bit for bit and no data moves (a bitcast reinterprets bytes); the derivative is the
identity (a custom JVP). Hand-written: neither JAX nor XLA offers a per-value switch for the pass, and
`jax.lax.optimization_barrier` alone does not stop it (the pass narrows through it; libtpu 0.0.42.1).
"""

import jax
import jax.numpy as jnp

__all__ = ["fenced"]


def _to_bits(x):
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


@jax.custom_jvp
def fenced(tree):
  """`tree` (any pytree) with each floating leaf passed through the bitcast and barrier above: equal to `tree`
  bit for bit, same dtypes; other leaves (integers, keys) as they are. Differentiable (identity derivative)."""
  leaves, treedef = jax.tree.flatten(tree)
  floating = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]
  bits = jax.lax.optimization_barrier([_to_bits(x) if f else x for x, f in zip(leaves, floating)])
  return jax.tree.unflatten(treedef, [jax.lax.bitcast_convert_type(b, x.dtype) if f else b
                                      for b, x, f in zip(bits, leaves, floating)])


@fenced.defjvp
def _fenced_jvp(primals, tangents):
  return fenced(primals[0]), tangents[0]
