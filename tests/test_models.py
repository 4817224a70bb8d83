import jax
import jax.numpy as jnp
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels.models import (
  CNN,
  MLP,
  CNNConfig,
  EncoderDecoder,
  EncoderDecoderConfig,
  RecurrentLM,
  TransformerClassifier,
  TransformerConfig,
  TransformerLM,
  ViT,
  ViTConfig,
  build_model,
  count_params,
)
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


LM = dict(d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16, scan_layers=False)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_lm_refuses_a_sequence_longer_than_max_len(positions):
  # Learned positions gave 40 rows of NaN logits, rotary ones a finite wrong answer, without a word.
  model = TransformerLM(11, TransformerConfig(positions=positions, **LM), rngs=nnx.Rngs(0))
  assert model(jnp.zeros((2, 16), jnp.int32)).shape == (2, 16, 11)
  with pytest.raises(ValueError, match="a sequence of 40 tokens exceeds max_len=16"):
    model(jnp.zeros((2, 40), jnp.int32))
  with pytest.raises(ValueError, match="a sequence of 40 tokens exceeds max_len=16"):  # shapes: refused inside jit
    nnx.jit(lambda m, t: m(t))(model, jnp.zeros((2, 40), jnp.int32))
  with pytest.raises(ValueError, match="a cache of 40 tokens exceeds max_len=16"):
    model.init_cache(1, 40)
  big = {"k": jnp.zeros((1, 1, 40, 2, 8)), "v": jnp.zeros((1, 1, 40, 2, 8)), "segment_ids": jnp.zeros((1, 40), int)}
  with pytest.raises(ValueError, match="a cache of 40 tokens exceeds max_len=16"):
    model.decode(jnp.zeros((1, 1), jnp.int32), big, 0)


def test_decoding_refuses_a_write_past_the_cache():
  model = TransformerLM(11, TransformerConfig(**LM), rngs=nnx.Rngs(0))
  cache = model.init_cache(1, 8)
  model.decode(jnp.zeros((1, 4), jnp.int32), cache, 4)  # slots 4..7: the last that fit
  with pytest.raises(ValueError, match="cache index 6 with 4 token.s. is past the cache's 8 slots"):
    model.decode(jnp.zeros((1, 4), jnp.int32), cache, 6)  # dynamic_update_slice would have clamped it to slot 4
  with pytest.raises(ValueError, match="cache index -1"):
    model.decode(jnp.zeros((1, 1), jnp.int32), cache, -1)
  with pytest.raises(ValueError, match="9 tokens do not fit a cache of 8 slots"):  # shapes: refused inside jit too
    jax.jit(lambda t, c, i: model.decode(t, c, i))(jnp.zeros((1, 9), jnp.int32), cache, 0)
  with pytest.raises(ValueError, match="position 16 is outside .0, 16."):
    model.decode(jnp.zeros((1, 1), jnp.int32), cache, 0, positions_BT=jnp.full((1, 1), 16))


def test_known_token_ids_outside_the_vocabulary_are_refused():
  lm = TransformerLM(11, TransformerConfig(positions="learned", **LM), rngs=nnx.Rngs(0))
  lstm = RecurrentLM(11, hidden_size=8, num_layers=1, rngs=nnx.Rngs(0))
  s2s = EncoderDecoder(11, EncoderDecoderConfig(**LM), rngs=nnx.Rngs(0))
  for call in (lambda t: lm(t), lambda t: lm.decode(t, lm.init_cache(1, 4), 0), lambda t: lstm(t),
               lambda t: s2s(t, jnp.zeros((1, 2), jnp.int32)), lambda t: s2s(jnp.zeros((1, 2), jnp.int32), t)):
    with pytest.raises(ValueError, match=r"token id 11 is outside \[0, 11\) \(1 of 2 out of range\)"):
      call(jnp.array([[3, 11]]))  # a row of NaN logits (an out-of-range gather fills NaN) until now
    with pytest.raises(ValueError, match=r"token id -1 is outside \[0, 11\)"):
      call(jnp.array([[-1, 3]]))  # wrapped around to the last row until now
  # Inside jit the ids are traced: no check, so no host sync in a compiled step.
  assert jnp.isnan(jax.jit(lambda t: lm(t))(jnp.array([[3, 11]]))).any()


def test_encoder_decoder_refuses_decoding_past_max_len():
  model = EncoderDecoder(11, EncoderDecoderConfig(**LM), rngs=nnx.Rngs(0))
  source = jnp.ones((1, 4), jnp.int32)
  assert model.generate(source, 16, 1).shape == (1, 16)
  with pytest.raises(ValueError, match="a cache of 17 tokens exceeds max_len=16"):  # positions 16.. do not exist
    model.generate(source, 17, 1)
  cache = model.init_cache(source, 4)
  with pytest.raises(ValueError, match="cache index 4 with 1 token.s. is past the cache's 4 slots"):
    model.decode(jnp.ones((1, 1), jnp.int32), cache, 4)
  with pytest.raises(ValueError, match="a sequence of 17 tokens exceeds max_len=16"):
    model(jnp.ones((1, 17), jnp.int32), jnp.ones((1, 2), jnp.int32))


def test_encoders_refuse_inputs_beyond_their_position_tables():
  classifier = TransformerClassifier((8, 4), 3, TransformerConfig(positions="learned", pooling="cls", **LM),
                                     rngs=nnx.Rngs(0))
  assert classifier(jnp.ones((2, 15, 4))).shape == (2, 3)  # 15 steps + the class token fill the 16 positions
  with pytest.raises(ValueError, match="a sequence of 17 tokens exceeds max_len=16"):
    classifier(jnp.ones((2, 16, 4)))
  vit = ViT((8, 8, 1), 3, ViTConfig(patch_size=4, d_model=16, num_heads=2, num_layers=1, d_ff=32),
            rngs=nnx.Rngs(0))
  assert vit(jnp.ones((2, 8, 8, 1))).shape == (2, 3)
  for shape in ((16, 16, 1), (10, 10, 1), (4, 8, 1)):  # more patches than positions (NaN), a remainder, fewer
    with pytest.raises(ValueError, match=r"images of shape \(\d+, \d+, 1\): this ViT was built for \(8, 8, 1\)"):
      vit(jnp.ones((2, *shape)))


def test_count_params_of_a_module_an_abstract_module_and_a_state():
  model = MLP((4,), 3, hidden_sizes=(8,), rngs=nnx.Rngs(0))
  expected = 4 * 8 + 8 + 8 * 3 + 3
  assert count_params(model) == expected
  assert count_params(nnx.eval_shape(lambda: MLP((4,), 3, hidden_sizes=(8,), rngs=nnx.Rngs(0)))) == expected
  assert count_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == expected
  bn = CNN((4, 4, 1), 2, features=(2,), kernel_sizes=(3,), strides=(1,), norm="batch", head_sizes=(),
           rngs=nnx.Rngs(0))
  assert count_params(bn) < count_params(nnx.state(bn))  # batch statistics are not parameters
