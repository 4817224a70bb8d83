"""Hugging Face interop: small random models of every supported architecture built by `transformers` from a
config (nothing is downloaded), imported, compared logit by logit, and exported back to identical tensors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import jaxmodels
from jaxmodels.hf.convert import export_hf, import_hf
from jaxmodels.runtime.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 67


def gpt2():
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0))


def llama():  # grouped-query attention (4 query heads, 2 key/value heads), untied head, a non-default rope_theta
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
      tie_word_embeddings=False))


def mixtral():  # Llama's attention with 4 SwiGLU experts, top-2, in every layer
  return transformers.MixtralForCausalLM(transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2))


def saved(make, directory):
  torch.manual_seed(0)
  model = make().eval()
  with torch.no_grad():  # norms away from their ones/zeros init, so that a mixed-up norm parameter shows
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def tensors(directory):
  return safetensors_numpy.load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("make, scan_layers", [(gpt2, True), (llama, False), (llama, True), (mixtral, True)],
                         ids=["gpt2-scanned", "llama-unrolled", "llama-scanned", "mixtral-scanned"])
def test_import_matches_transformers_logits_and_export_round_trips(tmp_path, make, scan_layers):
  reference = saved(make, tmp_path / "hf")
  import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), scan_layers=scan_layers)
  model = jaxmodels.load_model(str(tmp_path / "imported"))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(tokens))
  assert np.abs(got - expected).max() < 1e-4

  export_hf(str(tmp_path / "imported"), str(tmp_path / "back"))
  original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  again = type(reference).from_pretrained(tmp_path / "back").eval()  # transformers reads our config.json
  with torch.no_grad():
    np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), expected)


def test_unsupported_models_are_one_line_errors(tmp_path):
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(UserError, match="model_type='bert' is not supported"):
    import_hf(str(tmp_path / "bert"), str(tmp_path / "out"))
  (tmp_path / "scaled").mkdir()
  (tmp_path / "scaled" / "config.json").write_text(json.dumps(
      {**llama().config.to_dict(), "rope_scaling": {"rope_type": "longrope", "factor": 8.0}, "rope_parameters": None}))
  with pytest.raises(UserError, match="rope_type='longrope' is not supported"):
    import_hf(str(tmp_path / "scaled"), str(tmp_path / "out"))
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(UserError, match="config.json has no 'n_embd': not a complete gpt2 config"):
    import_hf(str(tmp_path / "partial"), str(tmp_path / "out"))
  (tmp_path / "partial" / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json is not JSON"):
    import_hf(str(tmp_path / "partial"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_cli_import_hf_then_export_hf(tmp_path):
  saved(gpt2, tmp_path / "hf")
  run = lambda *a: subprocess.run([sys.executable, "-m", "jaxmodels", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300, check=False)
  r = run("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x"))
  assert r.returncode == 0, r.stderr
  r = run("export-hf", "--model", str(tmp_path / "x"), "--out", str(tmp_path / "y"))
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "y" / "config.json").read_text())["model_type"] == "gpt2"
  r = run("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x"))
  assert r.returncode == 2 and r.stderr.strip() == f"jaxmodels: error: --out {tmp_path / 'x'} already exists"


@pytest.mark.slow
def test_import_hf_and_export_hf_read_and_write_gs(tmp_path, gcs_env):
  """Both commands take gs:// directories (a local GCS emulator): a GPT-2 copied to the bucket, imported from it to
  it and exported from it to it has the original tensors. Old export-hf wrote a local directory named `gs:`."""
  saved(gpt2, tmp_path / "hf")
  (tmp_path / "back").mkdir()

  def python(code):
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=gcs_env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout

  copy = ("from etils import epath\n"
          "for f in epath.Path({frm!r}).iterdir():\n  (epath.Path({to!r}) / f.name).write_bytes(f.read_bytes())")
  python(copy.format(frm=str(tmp_path / "hf"), to="gs://bkt/hf/source"))
  for args in (("import-hf", "gs://bkt/hf/source", "--out", "gs://bkt/hf/imported"),
               ("export-hf", "--model", "gs://bkt/hf/imported", "--out", "gs://bkt/hf/exported")):
    r = subprocess.run([sys.executable, "-m", "jaxmodels", *args], cwd=ROOT, env=gcs_env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
  refused = python(copy.format(frm="gs://bkt/hf/exported", to=str(tmp_path / "back")) + "\n"
                   "from jaxmodels.hf.convert import export_hf\n"
                   "try:\n  export_hf('gs://bkt/hf/imported', 'gs://bkt/hf/exported')\n"
                   "except Exception as e:\n  print(e)")
  assert refused.strip() == "--out gs://bkt/hf/exported already exists"
  original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "gpt2"
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_restore_from_an_import_loads_its_parameters_and_refuses_misfits(tmp_path):
  """--config.checkpoint.restore_from=DIR of `import-hf` (or `export`): the run starts from its parameters."""
  from jaxmodels.config import default_config
  from jaxmodels.data import load_dataset
  from jaxmodels.runs.checkpoint import Checkpoints
  from jaxmodels.train.experiment import build_experiment
  from jaxmodels.train.loop import _restore

  c = default_config()
  c.data.update(source="text", seq_len=16)
  vocab = load_dataset("text", seq_len=16).num_outputs  # the embedded corpus's characters: the model's outputs
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "hf")
  import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), scan_layers=False)  # restores into scanned
  imported = json.loads((tmp_path / "imported" / "config.json").read_text())["model"]
  c.model.update({k: tuple(v) if isinstance(v, list) else v for k, v in imported.items()}, scan_layers=True)
  c.checkpoint.restore_from = str(tmp_path / "imported")
  (tmp_path / "run").mkdir()

  def restore(config):
    reader = Checkpoints(str(tmp_path / "run"))
    try:
      return _restore(build_experiment(config), reader, log=lambda _line: None)
    finally:
      reader.close()

  state, start, _, _ = restore(c)
  assert start == 0
  expected = jaxmodels.load_params(str(tmp_path / "imported"))  # unrolled, as imported
  got = jaxmodels.models.transformer.scan_to_unrolled(state.params)
  np.testing.assert_array_equal(got["stack"]["blocks"][1]["attn"]["query"]["kernel"],
                                expected["stack"]["blocks"][1]["attn"]["query"]["kernel"])
  np.testing.assert_array_equal(got["embed"]["embedding"], expected["embed"]["embedding"])

  bad = c.copy_and_resolve_references()
  bad.model.d_ff = 64
  with pytest.raises(UserError, match=r"parameters do not fit .*shaped differently.*model keys that differ: "
                                      r"model.d_ff \(saved 128, now 64\)"):
    restore(bad)
  bad = c.copy_and_resolve_references()
  bad.model.update(family="lstm", scan_layers=True, num_layers=2)
  for key in ("d_model", "num_heads", "d_ff", "max_len", "norm", "norm_eps", "mlp", "positions", "use_bias"):
    bad.model[key] = default_config().model[key]
  with pytest.raises(UserError, match="holds a model.family=transformer model, but this run builds model.fam"):
    restore(bad)
  bad = c.copy_and_resolve_references()
  bad.checkpoint.restore_mode = "full"
  with pytest.raises(UserError, match="is an export .parameters only.: use checkpoint.restore_mode=params"):
    restore(bad)


def test_a_sharded_checkpoint_with_a_missing_shard_or_tensor_is_a_one_line_error(tmp_path):
  """Old code never read model.safetensors.index.json and ended in a KeyError traceback."""
  reference = gpt2()
  reference.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
  shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  import_hf(str(tmp_path / "hf"), str(tmp_path / "whole"))  # every shard there: imports
  (tmp_path / "hf" / shards[1]).unlink()
  with pytest.raises(UserError, match=rf"{tmp_path / 'hf' / shards[1]} is missing: .*index.json lists it as the "
                                      rf"shard of \d+ tensors"):
    import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
  (tmp_path / "hf" / "model.safetensors.index.json").unlink()  # no index: a tensor is missing
  with pytest.raises(UserError, match=r"has no tensor 'transformer\..*': its \*.safetensors files do not hold"):
    import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def tiny(config_class, model_class, **fields):
  """A `transformers` model of 2 layers, d_model 32, 4 query and 2 key/value heads, from a config."""
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
  return lambda: getattr(transformers, model_class)(getattr(transformers, config_class)(**{**base, **fields}))


def rope(kind, **fields):
  return {"rope_parameters": {"rope_type": kind, "rope_theta": 5000.0, **fields}}


ARCHITECTURES = {  # every architecture's variant fields, at sizes where they matter in 16 tokens
    "llama3-rope": tiny("LlamaConfig", "LlamaForCausalLM", **rope(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
    "yarn-rope": tiny("LlamaConfig", "LlamaForCausalLM", num_attention_heads=2, num_key_value_heads=1, **rope(
        "yarn", factor=4.0, original_max_position_embeddings=16)),
    "linear-rope": tiny("LlamaConfig", "LlamaForCausalLM", **rope("linear", factor=2.0)),
    "mistral": tiny("MistralConfig", "MistralForCausalLM", sliding_window=5),
    "qwen2": tiny("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": tiny("Qwen3Config", "Qwen3ForCausalLM", head_dim=16),  # 4 heads of 16 in d_model 32
    "olmo2": tiny("Olmo2Config", "Olmo2ForCausalLM"),
    "gemma": tiny("GemmaConfig", "GemmaForCausalLM", head_dim=16, tie_word_embeddings=True),
    "gemma2": tiny("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, tie_word_embeddings=True, sliding_window=5,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_matches_transformers_and_round_trips(tmp_path, name):
  """Old code refused each (`rope_type='llama3' is not supported`, `model_type='mistral' is not supported`)."""
  reference = saved(ARCHITECTURES[name], tmp_path / "hf")
  import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"), scan_layers=name != "qwen3")
  model = jaxmodels.load_model(str(tmp_path / "imported"))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  assert np.abs(np.asarray(model(tokens)) - expected).max() < 1e-4
  export_hf(str(tmp_path / "imported"), str(tmp_path / "back"))
  original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
  assert sorted(back) == sorted(original)
  atol = 1e-6 if name.startswith("gemma") else 0  # Gemma's norm scales w are stored as 1 + w: one float32 rounding
  for key, value in original.items():
    np.testing.assert_allclose(back[key], value, rtol=0, atol=atol, err_msg=key)
  again = type(reference).from_pretrained(tmp_path / "back").eval()
  assert reference.config.to_dict()["rope_parameters"].items() <= again.config.to_dict()["rope_parameters"].items()
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.tensor(tokens)).logits.numpy(), expected, rtol=0, atol=100 * atol)


def test_sliding_window_is_a_mask_for_every_attention_path():
  """A token past the window changes nothing; einsum, xla and KV-cache decoding agree (our own models too)."""
  import jax.numpy as jnp
  from flax import nnx

  from jaxmodels.models.transformer import TransformerLM
  make = lambda impl: TransformerLM(VOCAB, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_layers=2,
                                    max_len=16, sliding_window=3, attention_impl=impl, rngs=nnx.Rngs(0))
  model = make("einsum")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)))
  logits = np.asarray(model(tokens))
  changed = np.asarray(model(tokens.at[:, 0].set((tokens[:, 0] + 1) % VOCAB)))
  np.testing.assert_array_equal(changed[:, 5:], logits[:, 5:])  # 2 layers of window 3 reach 4 tokens back
  assert np.abs(changed[:, 4] - logits[:, 4]).max() > 1e-4
  np.testing.assert_allclose(np.asarray(make("xla")(tokens)), logits, atol=1e-5)
  cache = model.init_cache(2, 16)
  step_logits, cache = model.decode(tokens[:, :10], cache, 0)
  rest = [step_logits]
  for t in range(10, 12):  # one token at a time: its window in the cache
    step_logits, cache = model.decode(tokens[:, t:t + 1], cache, t)
    rest.append(step_logits)
  np.testing.assert_allclose(np.concatenate(rest, axis=1), logits, atol=1e-5)


def test_export_hf_dtype_shards_token_ids_and_tokenizer_files(tmp_path):
  """Old export-hf wrote float32 in one file and dropped the token ids, generation config and tokenizer files."""
  reference = saved(ARCHITECTURES["qwen2"], tmp_path / "hf")
  reference.generation_config.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, "bos_token_id": 1, "eos_token_id": 2,
                                                           "pad_token_id": 3}))
  import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
  export_hf(str(tmp_path / "imported"), str(tmp_path / "back"), dtype="bfloat16", max_shard_size="8KB")
  back = tmp_path / "back"
  index = json.loads((back / "model.safetensors.index.json").read_text())
  shards = sorted({*index["weight_map"].values()})
  assert len(shards) > 2 and all((back / f).is_file() for f in shards)
  config = json.loads((back / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"], config["head_dim"]) == (1, 2, 3, 8)
  assert (back / "tokenizer.json").read_text() == '{"version": "1.0"}' and (back / "generation_config.json").is_file()
  again = transformers.Qwen2ForCausalLM.from_pretrained(back)
  assert again.dtype == torch.bfloat16
  for key, value in reference.state_dict().items():
    np.testing.assert_array_equal(again.state_dict()[key].float().numpy(), value.bfloat16().float().numpy())
  with pytest.raises(UserError, match="--max-shard-size 5XB: expected a positive size"):
    export_hf(str(tmp_path / "imported"), str(tmp_path / "other"), max_shard_size="5XB")
  with pytest.raises(UserError, match="--dtype int8: expected one of float32, bfloat16, float16"):
    export_hf(str(tmp_path / "imported"), str(tmp_path / "other"), dtype="int8")


def test_new_presets_have_the_published_parameter_counts():
  """Published counts (Hugging Face model cards' safetensors totals); llama3.2-1b now carries its rope scaling."""
  from jaxmodels.models import presets
  from jaxmodels.models.transformer import transformer_param_count
  published = {"llama3.1-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096,
               "qwen2.5-0.5b": 494_032_768, "gemma2-2b": 2_614_341_888}
  for name, count in published.items():
    p = presets.get(name)
    assert p.params == count == transformer_param_count(p.config, p.reference["num_outputs"])
  assert (presets.get("llama3.2-1b").config.rope_scaling, presets.get("llama3.2-1b").config.rope_factor) == (
      "llama3", 32.0)
