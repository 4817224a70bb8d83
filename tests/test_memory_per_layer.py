"""bfloat16 compute without whole bfloat16 copies of float32 weights (jaxmodels.runtime.fence, issue 35).

On a TPU, XLA's bfloat16 propagation turned each scanned layer's per-layer cast to the compute dtype into one
conversion of the whole stack ahead of the layer loop (and the chunked cross-entropy's per-chunk cast of the
head into one of the whole table), a copy that lived through the backward pass: 0.45 GB per chip for Llama 3.2
1B on a v5e 2x2 slice (docs/benchmarks.md). The CPU compiler does not do this, so the compiled-program test
compiles ahead of time for a v5e 2x2 topology (libtpu; skipped where it cannot load, as tests/test_bench.py's
topology tests) and reads the optimized HLO: no bfloat16 buffer has the per-chip shape of a float32 argument.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from conftest import experiment, topology_devices

from jaxmodels.bench import timing as bench
from jaxmodels.runtime.fence import fenced


def narrowed_copies(hlo: str) -> list[str]:
  """Per-device shapes (2-D or more) of the program's float32 arguments that a bfloat16 buffer also has."""
  arguments = re.search(r"^ENTRY [^(]*\((.*?)\) ->", hlo, re.M).group(1)
  stacked = {s for s in re.findall(r"f32\[([\d,]+)\]", arguments) if "," in s}
  return sorted(stacked & set(re.findall(r"bf16\[([\d,]+)\]", hlo)))


def test_bfloat16_step_holds_no_whole_bfloat16_copy_of_the_layers_or_the_head(tmp_path):
  topology_devices()
  # 3 scanned layers, FSDP over 4 chips: weights (3, 32, 128) ... per chip, the tied table (256, 32), the
  # chunked cross-entropy on (64 chunks of 64 of the 256 byte symbols); activations (2, 64, 128) per chip, a
  # shape no argument has.
  c = experiment("text_transformer")
  c.data.update(dict(seq_len=64, tokenizer="byte"))
  c.model.update(dict(num_layers=3, num_heads=4, d_model=128, d_ff=512, max_len=64, dtype="bfloat16",
                      remat="full"))
  c.train.update(dict(batch_size=8, eval_batch_size=8, logits_chunk=64))
  c.parallel.update(dict(strategy="fsdp", mesh=""))
  bench.compile_point(c, repeat=1, topology="v5e:2x2", dump_dir=str(tmp_path), label="step")
  hlo = (tmp_path / "step.post.hlo.txt").read_text()
  assert {"3,32,512", "3,512,32", "256,32"} <= set(re.findall(r"f32\[([\d,]+)\]", hlo))  # what is looked for
  assert narrowed_copies(hlo) == []


def test_fenced_is_the_identity_bit_for_bit_with_the_identity_derivative():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))
  tree = {"w": w, "h": w[0].astype(jnp.bfloat16), "n": jnp.arange(3), "key": jax.random.key(1)}
  out = jax.jit(fenced)(tree)
  for name in ("w", "h", "n"):
    assert out[name].dtype == tree[name].dtype
    np.testing.assert_array_equal(np.asarray(out[name], np.float32), np.asarray(tree[name], np.float32))
  assert jax.random.key_data(out["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()

  def loss(w, h):
    z = fenced({"w": w, "h": h})
    return jnp.sum(z["w"] ** 2) + jnp.sum(z["h"].astype(jnp.float32) * 3.0)

  dw, dh = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, tree["h"])
  np.testing.assert_array_equal(dw, 2 * w)
  np.testing.assert_array_equal(np.asarray(dh, np.float32), np.full(dh.shape, 3.0))
