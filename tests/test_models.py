import jax
import jax.numpy as jnp
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels.models import CNN, MLP, CNNConfig, build_model
from jaxmodels.runtime.errors import UserError


def param_dtypes(model):
  return {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (20, 3), (16,)])
def test_mlp_shapes_any_input_rank(input_shape):
  model = MLP(input_shape, 5, hidden_sizes=(32, 16), rngs=nnx.Rngs(0))
  y = model(jnp.ones((4, *input_shape)))
  assert y.shape == (4, 5)
  assert model.hidden[0].kernel.shape == (jnp.prod(jnp.array(input_shape)).item(), 32)


def test_cnn_2d_image_and_1d_signal():
  image = CNN((8, 8, 1), 10, CNNConfig(features=(8, 16), kernel_sizes=(3, 3), strides=(1, 1)), rngs=nnx.Rngs(0))
  assert image.convs[0].kernel.shape == (3, 3, 1, 8)  # 2-D kernels for images
  assert image(jnp.ones((2, 8, 8, 1))).shape == (2, 10)
  signal = CNN((50, 2), 3, features=(4, 8, 8), kernel_sizes=(5, 3, 3), strides=(2, 1, 1), norm="layer", pool="avg",
               rngs=nnx.Rngs(0))
  assert signal.convs[0].kernel.shape == (5, 2, 4)  # 1-D kernels for signals
  assert signal(jnp.ones((2, 50, 2))).shape == (2, 3)


def test_cnn_pooling_stops_when_spatial_size_is_one():
  model = CNN((4, 4, 1), 2, features=(4, 4, 4), kernel_sizes=(3, 3, 3), strides=(1, 1, 1), pool="max",
              head_sizes=(), rngs=nnx.Rngs(0))
  assert model.pool_after == [True, True, False]  # 4 -> 2 -> 1, then nothing left to pool
  assert model.out.kernel.shape == (4, 2)


def test_bfloat16_compute_keeps_float32_params():
  for model in (MLP((8, 8, 1), 10, hidden_sizes=(16,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                CNN((8, 8, 1), 10, features=(8,), kernel_sizes=(3,), strides=(1,), dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(0))):
    assert param_dtypes(model) == {jnp.dtype(jnp.float32)}
    assert model(jnp.ones((2, 8, 8, 1))).dtype == jnp.bfloat16


def test_param_dtype_is_honoured():
  model = MLP((4,), 2, hidden_sizes=(8,), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert param_dtypes(model) == {jnp.dtype(jnp.bfloat16)}


def test_dropout_active_only_in_training():
  model = MLP((16,), 4, hidden_sizes=(64,), dropout=0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((8, 16))
  assert jnp.array_equal(model(x), model(x))
  a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  assert not jnp.allclose(a, b)


def test_batchnorm_statistics_update_only_in_training():
  model = CNN((4, 4, 1), 2, features=(2,), kernel_sizes=(3,), strides=(1,), norm="batch", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 1)) + 3.0
  model(x)
  assert jnp.all(model.norms[0].mean[...] == 0)
  model(x, train=True)
  assert not jnp.all(model.norms[0].mean[...] == 0)


def test_build_model_from_config_and_errors():
  config = experiment("digits_mlp")
  model = build_model(config.model, (8, 8, 1), 10, nnx.Rngs(0))
  assert isinstance(model, MLP)
  assert [l.kernel.shape[1] for l in model.hidden] == list(config.model.hidden_sizes)
  c = experiment("digits_cnn")
  c.model.strides = (1,)
  with pytest.raises(UserError, match="model.features, model.kernel_sizes and model.strides: need one entry"):
    build_model(c.model, (8, 8, 1), 10, nnx.Rngs(0))
