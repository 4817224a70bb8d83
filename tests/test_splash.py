"""Splash attention (`model.attention_impl=splash`, JAX's Pallas TPU kernel) without a TPU: the kernel in
Pallas's interpret mode matches the XLA attention on the CPU, a train step compiles ahead of time for a v5e
topology with the kernel in its program, and training on the CPU is a one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment, topology_devices

from jaxmodels.bench import timing as bench
from jaxmodels.models.transformer import attention, splash_attention
from jaxmodels.runtime.errors import UserError


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
def test_splash_in_interpret_mode_equals_xla_attention(is_causal):
  rng = np.random.default_rng(0)
  B, T, N, K, H = 2, 128, 4, 2, 32  # grouped-query: 2 query heads per key/value head
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
  got = splash_attention(q, k, v, is_causal=is_causal, interpret=True)
  expected = attention(q, k, v, "xla", is_causal=is_causal)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  with pytest.raises(ValueError, match="splash attention needs sequence lengths that are multiples of 128, got 64"):
    splash_attention(q[:, :64], k[:, :64], v[:, :64], is_causal=is_causal, interpret=True)


def test_train_step_compiles_ahead_of_time_for_a_v5e_with_the_splash_kernel(tmp_path):
  topology_devices()
  c = experiment("text_transformer")
  c.model.update(dict(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, d_ff=256, attention_impl="splash"))
  c.data.seq_len = 128  # the kernel's blocks: up to 512, dividing the sequence
  c.train.batch_size = 8
  c.parallel.strategy = "dp"  # the kernel runs per device through shard_map (Mosaic calls are not partitioned)
  record = bench.compile_point(c, repeat=1, topology="v5e:2x2", dump_dir=str(tmp_path))
  assert record["device_count"] == 4 and "TPU" in record["device_kind"]
  program = (tmp_path / "point.post.hlo.txt").read_text()
  assert 'custom_call_target="tpu_custom_call"' in program and "splash_mqa_fwd" in program
  assert "splash_mqa_dkv" in program  # and the backward kernel
  c.data.seq_len = 64  # not a multiple of the TPU's 128 lanes: refused before anything compiles
  with pytest.raises(UserError, match="splash needs data.seq_len a multiple of 128 .the TPU.s lanes., got 64"):
    bench.compile_point(c, repeat=1, topology="v5e:2x2")


def test_splash_on_the_cpu_is_a_one_line_error():
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel
  c = experiment("text_transformer")
  c.model.attention_impl = "splash"
  with pytest.raises(UserError, match="model.attention_impl=splash is JAX's Pallas TPU kernel, but the devices are "
                                      "cpu") as e:
    build_experiment(c)
  assert "\n" not in str(e.value)
  q = jnp.zeros((1, 128, 2, 32))
  with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):  # the module alone: Pallas's
    jax.jit(lambda q: attention(q, q, q, "splash", is_causal=True))(q)
