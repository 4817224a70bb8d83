"""Typed module configs, presets at published parameter counts, grouped-query attention, ResNet and ViT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment
from flax import nnx

from jaxmodels.config import default_config, to_json, validate
from jaxmodels.models import (
  FAMILIES,
  ResNet,
  ResNetConfig,
  TransformerConfig,
  TransformerLM,
  ViT,
  ViTConfig,
  build_model,
  count_active_params,
  count_params,
  family_config,
  presets,
)
from jaxmodels.models.transformer import attention, transformer_param_count
from jaxmodels.runs.checkpoint import config_differences
from jaxmodels.runtime.errors import UserError


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_parameter_counts_equal_the_published_ones(name):
  model = nnx.eval_shape(lambda: presets.build(name, rngs=nnx.Rngs(0)))  # shapes only: nothing allocated
  p = presets.get(name)
  assert count_params(model) == p.params
  if p.family == "transformer":
    assert transformer_param_count(p.config, p.reference["num_outputs"]) == p.params
  active = p.active_params or p.params  # mixtures of experts: the parameters one token uses
  assert count_active_params(model) == active
  if p.family == "transformer":
    assert transformer_param_count(p.config, p.reference["num_outputs"], active=True) == active


def test_published_figures_are_the_ones_in_the_issue():
  published = {"gpt2": 124_439_808, "resnet18": 11_689_512, "resnet50": 25_557_032, "vit-s16": 22_050_664,
               "vit-b16": 86_567_656}
  assert {name: presets.get(name).params for name in published} == published


def test_every_config_field_is_a_model_key_with_the_same_default():
  # build_model passes every model.* key that is a field: a dataclass default that differed from the CLI's
  # would make `TransformerLM(V, rngs=...)` and `--config.model.family=transformer` different models.
  cli = default_config().model
  for family in FAMILIES.values():
    for field in dataclasses.fields(family.config):
      assert field.name in cli, (family.config.__name__, field.name)
      default = cli[field.name]
      assert field.default == (tuple(default) if isinstance(default, list) else default), field.name


@pytest.mark.parametrize("make, message", [
    (lambda: TransformerConfig(num_heads=3), "d_model=128 is not divisible by num_heads=3"),
    (lambda: TransformerConfig(num_kv_heads=3), "num_kv_heads=3: expected unset or a positive divisor"),
    (lambda: TransformerConfig(norm="batch"), "norm='batch': expected one of layer, rms"),
    (lambda: TransformerConfig(dropout=1.0), r"dropout=1.0: expected a number in \[0, 1\)"),
    (lambda: TransformerConfig(scan_layers=1), "scan_layers=1: expected True or False"),
    (lambda: ResNetConfig(block="wide"), "block='wide': expected one of basic, bottleneck"),
    (lambda: ViTConfig(patch_size=0), "patch_size=0: expected a positive integer"),
    (lambda: ViT((30, 30, 3), 10, rngs=nnx.Rngs(0)), "patch_size=4 does not divide the 30x30 images"),
    (lambda: presets.config("gpt2", d_ff=-1), "d_ff=-1"),
    (lambda: presets.get("gpt5"), "preset='gpt5': expected one of gpt2"),
])
def test_typed_configs_raise_value_error_naming_the_field(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_modules_take_a_config_or_keyword_fields_and_refuse_another_family():
  a = TransformerLM(11, TransformerConfig(d_model=16, num_heads=2, d_ff=32), rngs=nnx.Rngs(0))
  b = TransformerLM(11, d_model=16, num_heads=2, d_ff=32, rngs=nnx.Rngs(0))
  assert a.config == b.config and count_params(a) == count_params(b)
  with pytest.raises(TypeError, match="expected a TransformerConfig, got ResNetConfig"):
    TransformerLM(11, ResNetConfig(), rngs=nnx.Rngs(0))


def test_preset_expands_into_keys_at_their_defaults_and_yields_to_keys_set():
  c = default_config()
  c.data.source = "text"
  c.model.preset = "gpt2"
  c.model.d_model, c.model.num_heads = 64, 8  # set (not the defaults 128, 4): they win over the preset
  validate(c)
  m = c.model
  assert (m.family, m.d_model, m.num_layers, m.mlp, m.positions, m.use_bias, m.norm_eps) == (
      "transformer", 64, 12, "gelu", "learned", True, 1e-5)
  family, config = family_config(m)
  assert family == "transformer" and config == presets.config("gpt2", d_model=64, num_heads=8)
  validate(c)  # idempotent: a second validation (build_experiment after the CLI) changes nothing
  assert c.model.d_model == 64 and c.model.num_layers == 12


def test_build_model_names_cli_keys_in_errors():
  c = default_config()
  c.model.family, c.model.patch_size = "vit", 3
  with pytest.raises(UserError, match="model.patch_size=3 does not divide the 8x8 images"):
    build_model(c.model, (8, 8, 1), 10, nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_grouped_query_attention_equals_repeated_key_value_heads(impl):
  q = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))  # N = 6 query heads
  k, v = jax.random.normal(jax.random.key(1), (2, 2, 5, 2, 8))  # K = 2 key/value heads: groups of 3
  mask_BNTS = jax.random.bernoulli(jax.random.key(2), 0.6, (2, 1, 5, 5)) | jnp.eye(5, dtype=bool)
  repeat = lambda a: jnp.repeat(a, 3, axis=2)  # query head n reads key/value head n // 3
  for kw in (dict(is_causal=True), dict(mask_BNTS=mask_BNTS)):
    np.testing.assert_allclose(attention(q, k, v, impl, **kw), attention(q, repeat(k), repeat(v), "einsum", **kw),
                               rtol=1e-5, atol=1e-6)


def test_grouped_query_decoding_caches_kv_heads_and_matches_the_full_forward():
  model = TransformerLM(17, presets.config("llama-tiny", d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
                                           num_layers=2, rope_theta=500000.0), rngs=nnx.Rngs(0))
  assert model.stack.blocks.attn.key.kernel.shape == (2, 32, 16)  # (layers, D, K x H)
  t = jax.random.randint(jax.random.key(0), (2, 9), 0, 17)
  cache = model.init_cache(2, 9)
  assert cache["k"].shape == (2, 2, 9, 2, 8)  # (L, B, S, K, H)
  logits, cache = model.decode(t[:, :5], cache, 0)
  steps = [logits]
  for i in range(5, 9):
    logits, cache = model.decode(t[:, i:i + 1], cache, i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), model(t), rtol=1e-4, atol=1e-5)


def test_resnet_small_stem_keeps_resolution_and_batchnorm_trains():
  model = ResNet((32, 32, 3), 10, ResNetConfig(stage_sizes=(1, 1), width=8, stem="small"), rngs=nnx.Rngs(0))
  assert model.blocks[1].shortcut is not None and model.blocks[0].shortcut is None  # projection where it halves
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  assert model(x).shape == (4, 10)
  model(x, train=True)
  assert not jnp.all(model.stem.norm.mean[...] == 0)
  bottleneck = ResNet((32, 32, 3), 10, stage_sizes=(1,), block="bottleneck", width=4, rngs=nnx.Rngs(0))
  assert bottleneck.blocks[0].c_out == 16 and bottleneck(x).shape == (4, 10)  # 7x7/2 + pool: 32 -> 8


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_patches_and_pooling(pooling):
  model = ViT((32, 32, 3), 10, ViTConfig(patch_size=8, d_model=32, num_heads=2, d_ff=64, pooling=pooling),
              rngs=nnx.Rngs(0))
  assert model.pos_embed.embedding.shape == (16 + (pooling == "cls"), 32)  # 4 x 4 patches (+ class token)
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  y = model(x)
  assert y.shape == (3, 10)
  # A patch's pixels reach the output: change one patch, the logits move.
  assert not np.allclose(model(x.at[:, :8, :8].set(0.0)), y)


@pytest.mark.slow
@pytest.mark.parametrize("name, steps, accuracy", [("digits_resnet", 200, 0.97), ("digits_vit", 300, 0.95)])
def test_image_families_learn_the_digits(tmp_path, name, steps, accuracy):
  from jaxmodels.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  c = experiment(name)
  c.train.update(dict(steps=steps, eval_every=steps))  # measured: resnet 0.994, vit 0.969 (chance 0.1)
  assert train_and_evaluate(c, str(tmp_path))["accuracy"] > accuracy


def test_resnet_flops_count_every_convolution_at_its_resolution():
  from jaxmodels.models.flops import _resnet_macs  # pylint: disable=import-outside-toplevel
  published = {"resnet18": 1.82e9, "resnet50": 4.09e9}  # multiply-accumulates per 224x224 image (He et al.)
  for name, macs in published.items():
    model = nnx.eval_shape(lambda name=name: presets.build(name, rngs=nnx.Rngs(0)))
    assert _resnet_macs(model, (224, 224, 3)) == pytest.approx(macs, rel=0.01)


def test_runs_saved_before_the_new_model_keys_still_resume():
  c = default_config()
  saved = json.loads(to_json(c))
  for key in ("preset", "num_kv_heads", "rope_theta", "norm_eps", "use_bias", "stage_sizes", "block", "width",
              "stem", "patch_size"):
    del saved["model"][key]  # a config.json written before these keys existed
  assert not config_differences(saved, c.to_dict())
  c.model.rope_theta = 500000.0
  assert config_differences(saved, c.to_dict()) == ["model.rope_theta (saved 10000.0, now 500000.0)"]
