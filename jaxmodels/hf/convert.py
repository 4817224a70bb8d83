"""Hugging Face interop: GPT-2, Llama-family and Mixtral (`jaxmodels.hf.moe`) checkpoints to jaxmodels
parameters and back.

    jaxmodels import-hf DIR --out exported/gpt2      # DIR: config.json + *.safetensors
    jaxmodels export-hf --model exported/gpt2 --out hf/gpt2

Every directory may be local or gs:// (read and written through jaxmodels.runtime.storage).

`import-hf` writes what `jaxmodels export` writes (`params/`, `config.json`,
`model.json`), so `jaxmodels.load_model(OUT)` returns a `TransformerLM`.
`export-hf` takes such a directory (or a training workdir) and writes
`config.json` + `model.safetensors` that `transformers` loads. Nothing is
downloaded and `torch` is not needed: tensors are read and written with
`safetensors` as NumPy arrays.

Name map (per layer i; jaxmodels kernels are (in, out)):

| jaxmodels                        | GPT-2 (`transformer.` prefix)        | Llama (`model.` prefix)               |
|----------------------------------|--------------------------------------|---------------------------------------|
| embed.embedding                  | wte.weight                           | embed_tokens.weight                   |
| pos_embed.embedding              | wpe.weight                           | (rotary: none)                        |
| attn_norm.scale / .bias          | h.i.ln_1.weight / .bias              | layers.i.input_layernorm.weight       |
| attn.query/key/value.kernel      | h.i.attn.c_attn.weight, split in 3   | layers.i.self_attn.{q,k,v}_proj.weight^T |
| attn.out.kernel                  | h.i.attn.c_proj.weight               | layers.i.self_attn.o_proj.weight^T    |
| mlp_norm.scale / .bias           | h.i.ln_2.weight / .bias              | layers.i.post_attention_layernorm.weight |
| mlp.up / mlp.down .kernel        | h.i.mlp.c_fc / c_proj .weight        | layers.i.mlp.up_proj / down_proj .weight^T |
| mlp.gate.kernel                  | (gelu: none)                         | layers.i.mlp.gate_proj.weight^T       |
| stack.final_norm                 | ln_f                                 | norm                                  |
| head.kernel (untied only)        | (tied to wte)                        | lm_head.weight^T (no prefix)          |

GPT-2's Conv1D weights are already (in, out); its fused QKV is split along the
output axis, biases likewise. Llama's `nn.Linear` weights are (out, in): transposed.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from flax import nnx

from jaxmodels.hf.moe import MIXTRAL, mixtral_config, mixtral_hf_config, mixtral_mlp_from_hf, mixtral_mlp_to_hf
from jaxmodels.config import default_config, to_json
from jaxmodels.models.transformer import (
  TransformerConfig,
  TransformerLM,
  scan_to_unrolled,
  unrolled_to_scan,
)
from jaxmodels.runs.export import load_trained_model, refuse_existing, save_params
from jaxmodels.runs.state import split_model
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["export_hf", "hf_config", "hf_kind", "HF_MODEL_TYPES", "import_hf", "INDEX_FILE", "params_from_hf",
           "params_to_hf", "transformer_config"]

HF_MODEL_TYPES = ("gpt2", "llama", MIXTRAL)  # the Hugging Face architectures (config.json's model_type) that convert


def _read_config(directory: str) -> dict:
  path = storage.path(directory) / "config.json"
  if not path.is_file():
    raise UserError(f"{path} not found: expected a Hugging Face model directory (config.json + *.safetensors)")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not JSON ({e}): expected a Hugging Face config.json") from None


@contextlib.contextmanager
def _local_file(path, write: bool = False):
  """A local filename for the file `path` (local or gs://), since safetensors reads and writes local files only:
  `path` itself on a local disk, else a temporary file copied from `path` first (`write` false) or to it after."""
  path = storage.path(path)
  if not storage.is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="jaxmodels-hf-") as tmp:
    local = storage.path(tmp) / path.name
    if not write:
      _copy(path, local)
    yield os.fspath(local)
    if write:
      _copy(local, path)


def _copy(source, target) -> None:
  """Streams the file `source` to `target` (epath paths, each local or gs://)."""
  with source.open("rb") as src, target.open("wb") as dst:
    shutil.copyfileobj(src, dst, 64 << 20)


def _refuse(hf: dict, key: str, allowed, default=None) -> None:
  if hf.get(key, default) not in allowed:
    raise UserError(f"config.json: {key}={hf.get(key, default)!r} is not supported (expected one of "
                    f"{', '.join(map(repr, allowed))})")


def transformer_config(hf: dict) -> tuple[TransformerConfig, int]:
  """(TransformerConfig, vocabulary size) for a Hugging Face GPT-2 or Llama config.json; UserError otherwise."""
  kind = hf.get("model_type")
  if kind == "gpt2":
    _refuse(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _refuse(hf, "tie_word_embeddings", (True,), True)
    d = hf["n_embd"]
    config = TransformerConfig(d_model=d, num_heads=hf["n_head"], num_layers=hf["n_layer"],
                               d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"], norm="layer",
                               norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", positions="learned",
                               use_bias=True, tie_embeddings=True)
  elif kind in ("llama", MIXTRAL):
    _refuse(hf, "hidden_act", ("silu",), "silu")
    _refuse(hf, "attention_bias", (False,), False)
    _refuse(hf, "mlp_bias", (False,), False)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _refuse(rope, "rope_type", ("default",), "default")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
      raise UserError(f"config.json: head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads")
    config = TransformerConfig(d_model=hf["hidden_size"], num_heads=heads,
                               num_kv_heads=hf.get("num_key_value_heads") or heads,
                               num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
                               max_len=hf["max_position_embeddings"], norm="rms", norm_eps=hf["rms_norm_eps"],
                               mlp="swiglu", positions="rotary",
                               rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                               use_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    config = mixtral_config(hf, config) if kind == MIXTRAL else config
  else:
    raise UserError(f"config.json: model_type={kind!r} is not supported (expected one of "
                    f"{', '.join(HF_MODEL_TYPES)})")
  return config, hf["vocab_size"]


INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's {"weight_map": {tensor: shard file}}


def _shards(directory: str) -> list:
  """The safetensors files of `directory`: those its index names (each checked to exist), else every one there.

  UserError naming a shard the index lists that is missing, an index that is not JSON, or no file at all.
  """
  d = storage.path(directory)
  index = d / INDEX_FILE
  if not index.is_file():
    files = sorted(d.glob("*.safetensors"), key=os.fspath)
    if not files:
      raise UserError(f"{directory} holds no *.safetensors file")
    return files
  try:
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e}): expected JSON with a "
                    f"weight_map") from None
  files = [d / name for name in sorted(set(weight_map.values()))]
  for path in files:
    if not path.is_file():
      tensors = sum(shard == path.name for shard in weight_map.values())
      raise UserError(f"{path} is missing: {index} lists it as the shard of {tensors} tensors; copy the whole "
                      f"checkpoint")
  return files


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  safe_open = extras.require("safetensors", "import-hf").safe_open
  tensors = {}
  for path in _shards(directory):
    # flax: bfloat16 tensors load too (NumPy has no bfloat16)
    with _local_file(path) as local, safe_open(local, framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  return tensors


def _layers_from_hf(kind: str, t: dict, config: TransformerConfig) -> dict:
  """The unrolled jaxmodels parameter dict from Hugging Face tensors (consumed from `t`)."""
  take = lambda name: t.pop(name)
  layers = {}
  for i in range(config.num_layers):
    if kind == "gpt2":
      p = f"transformer.h.{i}."
      q, k, v = np.split(take(p + "attn.c_attn.weight"), 3, axis=1)
      qb, kb, vb = np.split(take(p + "attn.c_attn.bias"), 3)
      layers[i] = {
          "attn_norm": {"scale": take(p + "ln_1.weight"), "bias": take(p + "ln_1.bias")},
          "attn": {"query": {"kernel": q, "bias": qb}, "key": {"kernel": k, "bias": kb},
                   "value": {"kernel": v, "bias": vb},
                   "out": {"kernel": take(p + "attn.c_proj.weight"), "bias": take(p + "attn.c_proj.bias")}},
          "mlp_norm": {"scale": take(p + "ln_2.weight"), "bias": take(p + "ln_2.bias")},
          "mlp": {"up": {"kernel": take(p + "mlp.c_fc.weight"), "bias": take(p + "mlp.c_fc.bias")},
                  "down": {"kernel": take(p + "mlp.c_proj.weight"), "bias": take(p + "mlp.c_proj.bias")}}}
    else:
      p = f"model.layers.{i}."
      linear = lambda name: {"kernel": take(p + name + ".weight").T}  # pylint: disable=cell-var-from-loop
      layers[i] = {
          "attn_norm": {"scale": take(p + "input_layernorm.weight")},
          "attn": {"query": linear("self_attn.q_proj"), "key": linear("self_attn.k_proj"),
                   "value": linear("self_attn.v_proj"), "out": linear("self_attn.o_proj")},
          "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight")},
          "mlp": (mixtral_mlp_from_hf(take, p, config.num_experts) if kind == MIXTRAL else
                  {"gate": linear("mlp.gate_proj"), "up": linear("mlp.up_proj"), "down": linear("mlp.down_proj")})}
  return layers


def params_from_hf(kind: str, tensors: dict, config: TransformerConfig) -> dict:
  """jaxmodels parameters (in `config.scan_layers`' layout) from Hugging Face tensors; UserError on leftovers."""
  t = dict(tensors)
  if kind == "gpt2":
    t = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in t.items()}
    t.pop("lm_head.weight", None)  # tied: the same tensor as wte
    for name in [k for k in t if k.endswith((".attn.bias", ".attn.masked_bias"))]:  # causal-mask buffers
      t.pop(name)
    params = {"embed": {"embedding": t.pop("transformer.wte.weight")},
              "pos_embed": {"embedding": t.pop("transformer.wpe.weight")}}
    final = {"scale": t.pop("transformer.ln_f.weight"), "bias": t.pop("transformer.ln_f.bias")}
  else:
    params = {"embed": {"embedding": t.pop("model.embed_tokens.weight")}}
    final = {"scale": t.pop("model.norm.weight")}
    head = t.pop("lm_head.weight", None)
    if not config.tie_embeddings:
      if head is None:
        raise UserError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
      params["head"] = {"kernel": head.T}
  params["stack"] = {"blocks": _layers_from_hf(kind, t, config), "final_norm": final}
  if t:
    raise UserError(f"tensors without a jaxmodels parameter: {', '.join(sorted(t)[:5])}")
  return unrolled_to_scan(params) if config.scan_layers else params


def params_to_hf(kind: str, params: dict, config: TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensors from jaxmodels parameters (either layer layout): the inverse of `params_from_hf`."""
  params = _to_numpy(params)
  if config.scan_layers and not isinstance(next(iter(params["stack"]["blocks"])), int):
    params = scan_to_unrolled(params)
  out = {}
  for i, b in params["stack"]["blocks"].items():
    a, m = b["attn"], b["mlp"]
    if kind == "gpt2":
      p = f"transformer.h.{i}."
      out.update({
          p + "ln_1.weight": b["attn_norm"]["scale"], p + "ln_1.bias": b["attn_norm"]["bias"],
          p + "attn.c_attn.weight": np.concatenate([a[n]["kernel"] for n in ("query", "key", "value")], axis=1),
          p + "attn.c_attn.bias": np.concatenate([a[n]["bias"] for n in ("query", "key", "value")]),
          p + "attn.c_proj.weight": a["out"]["kernel"], p + "attn.c_proj.bias": a["out"]["bias"],
          p + "ln_2.weight": b["mlp_norm"]["scale"], p + "ln_2.bias": b["mlp_norm"]["bias"],
          p + "mlp.c_fc.weight": m["up"]["kernel"], p + "mlp.c_fc.bias": m["up"]["bias"],
          p + "mlp.c_proj.weight": m["down"]["kernel"], p + "mlp.c_proj.bias": m["down"]["bias"]})
    else:
      p = f"model.layers.{i}."
      out.update({
          p + "input_layernorm.weight": b["attn_norm"]["scale"],
          p + "post_attention_layernorm.weight": b["mlp_norm"]["scale"],
          **{p + f"self_attn.{hf}.weight": a[ours]["kernel"].T
             for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "out"))},
          **(mixtral_mlp_to_hf(m, p) if kind == MIXTRAL else
             {p + f"mlp.{hf}.weight": m[ours]["kernel"].T
              for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))})})
  final = params["stack"]["final_norm"]
  if kind == "gpt2":
    out.update({"transformer.wte.weight": params["embed"]["embedding"],
                "transformer.wpe.weight": params["pos_embed"]["embedding"],
                "transformer.ln_f.weight": final["scale"], "transformer.ln_f.bias": final["bias"]})
  else:
    out.update({"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": final["scale"]})
    if "head" in params:
      out["lm_head.weight"] = params["head"]["kernel"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_numpy(tree):
  """Nested dicts of NumPy arrays (from jax arrays)."""
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def hf_kind(config: TransformerConfig) -> str:
  """gpt2, llama or mixtral: the Hugging Face family whose layout `config` has; UserError if none."""
  c = config
  if (c.norm, c.mlp, c.positions, c.use_bias, c.tie_embeddings, c.kv_heads) == (
      "layer", "gelu", "learned", True, True, c.num_heads):
    return "gpt2"
  if (c.norm, c.mlp, c.positions, c.use_bias) == ("rms", "swiglu", "rotary", False):
    if c.num_experts and (c.moe_every, c.num_shared_experts, c.router, c.capacity_factor) != (1, 0, "softmax", 0):
      raise UserError("this mixture of experts is not Mixtral's (model.moe_every=1, num_shared_experts=0, "
                      "router=softmax, capacity_factor=0)")
    return MIXTRAL if c.num_experts else "llama"
  raise UserError("this model has neither GPT-2's layout (model.norm=layer, mlp=gelu, positions=learned, "
                  "use_bias=true, tied) nor Llama's (norm=rms, mlp=swiglu, positions=rotary, use_bias=false)")


def hf_config(config: TransformerConfig, vocab_size: int) -> dict:
  """A Hugging Face config.json for `config` (GPT-2 or Llama layout)."""
  c = config
  if hf_kind(c) == "gpt2":
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
            "n_embd": c.d_model, "n_head": c.num_heads, "n_layer": c.num_layers, "n_inner": c.d_ff,
            "n_positions": c.max_len, "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
          "hidden_size": c.d_model, "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
          "num_hidden_layers": c.num_layers, "intermediate_size": c.d_ff, "max_position_embeddings": c.max_len,
          "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
          "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "attention_bias": False, "mlp_bias": False}
  return mixtral_hf_config(c, llama) if c.num_experts else llama


def import_hf(directory: str, out: str, scan_layers: bool = True) -> str:
  """Writes a Hugging Face model directory's weights to `out` in `jaxmodels export`'s format; returns `out`."""
  refuse_existing(out)
  extras.check("safetensors", "import-hf")
  hf = _read_config(directory)
  try:
    config, vocab_size = transformer_config(hf)
  except KeyError as e:  # a field every config.json of that model_type has
    raise UserError(f"{directory}/config.json has no {e.args[0]!r}: not a complete {hf.get('model_type')} "
                    f"config") from None
  config = dataclasses.replace(config, scan_layers=scan_layers)
  try:
    params = params_from_hf(hf["model_type"], _read_tensors(directory), config)
  except KeyError as e:  # a tensor every checkpoint of this config has
    raise UserError(f"{directory} has no tensor {e.args[0]!r}: its *.safetensors files do not hold the whole "
                    f"{hf['model_type']} model that config.json describes") from None
  abstract = nnx.eval_shape(lambda: TransformerLM(vocab_size, config, rngs=nnx.Rngs(0)))
  _, expected, _ = split_model(abstract)
  _check_shapes(expected, params)
  c = default_config()
  c.data.source = "text"
  c.data.seq_len = min(c.data.seq_len, config.max_len)
  c.model.family = "transformer"
  for name, value in dataclasses.asdict(config).items():
    c.model[name] = value
  save_params(out, params, {})
  spec = {"input_shape": [c.data.seq_len], "num_outputs": vocab_size, "task": "lm"}
  storage.write_files(out, {"config.json": to_json(c), "model.json": json.dumps(spec)})
  return out


def _check_shapes(expected: dict, got: dict, path: str = "") -> None:
  if set(expected) != set(got):
    raise UserError(f"parameters {path or '/'}: expected {sorted(map(str, expected))}, got {sorted(map(str, got))}")
  for k, v in expected.items():
    if isinstance(v, dict):
      _check_shapes(v, got[k], f"{path}/{k}")
    elif tuple(v.shape) != tuple(got[k].shape):
      raise UserError(f"parameter {path}/{k}: expected shape {tuple(v.shape)}, got {tuple(got[k].shape)}")


def export_hf(model_path: str, out: str) -> str:
  """Writes a jaxmodels export (or import, or training workdir) as a Hugging Face directory; returns `out`."""
  save_file = extras.require("safetensors.numpy", "export-hf").save_file
  refuse_existing(out)
  model = load_trained_model(model_path)
  if not isinstance(model, TransformerLM):
    raise UserError(f"{model_path} holds a {type(model).__name__}: only Transformer language models export")
  kind = hf_kind(model.config)
  _, params, _ = split_model(model)
  path = storage.path(out)
  path.mkdir(parents=True)
  with _local_file(path / "model.safetensors", write=True) as local:
    save_file(params_to_hf(kind, params, model.config), local, metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(hf_config(model.config, model.embed.num_embeddings), indent=2),
                                    encoding="utf-8")
  return out
