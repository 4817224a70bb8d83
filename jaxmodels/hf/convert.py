"""Hugging Face interop: checkpoints of the architectures in `jaxmodels.hf.architectures` (Mixtral's experts:
`jaxmodels.hf.moe`) to jaxmodels parameters and back.

    jaxmodels import-hf DIR --out exported/gpt2      # DIR: config.json + *.safetensors (sharded: with the index)
    jaxmodels export-hf --model exported/gpt2 --out hf/gpt2 [--dtype bfloat16] [--max-shard-size 5GB]

Every directory may be local or gs:// (read and written through jaxmodels.runtime.storage).

`import-hf` writes what `jaxmodels export` writes (`params/`, `config.json`,
`model.json`), so `jaxmodels.load_model(OUT)` returns a `TransformerLM`, and keeps
the original config.json, generation_config.json and tokenizer files in `OUT/hf/`
(and, for `jaxmodels sample`, the tokenizer's spec and chat template: jaxmodels.hf.files.sampling_files).
`export-hf` takes such a directory (or a training workdir) and writes
`config.json` (with the bos/eos/pad token ids of `hf/config.json`, where there
is one) + safetensors that `transformers` loads, and copies `hf/`'s other files.
Nothing is downloaded and `torch` is not needed: tensors are read and written
with `safetensors` as NumPy arrays.

Name map (per layer i; jaxmodels kernels are (in, out)):

| jaxmodels                        | GPT-2 (`transformer.` prefix)        | Llama layout (`model.` prefix)        |
|----------------------------------|--------------------------------------|---------------------------------------|
| embed.embedding                  | wte.weight                           | embed_tokens.weight                   |
| pos_embed.embedding              | wpe.weight                           | (rotary: none)                        |
| attn_norm.scale / .bias          | h.i.ln_1.weight / .bias              | layers.i.input_layernorm.weight (1)   |
| attn.query/key/value.kernel      | h.i.attn.c_attn.weight, split in 3   | layers.i.self_attn.{q,k,v}_proj.weight^T(2)|
| attn.query_norm/key_norm.scale   |                                      | layers.i.self_attn.{q,k}_norm.weight  |
| attn.out.kernel                  | h.i.attn.c_proj.weight               | layers.i.self_attn.o_proj.weight^T    |
| mlp_norm.scale / .bias           | h.i.ln_2.weight / .bias              | layers.i.post_attention_layernorm.weight(1)|
| mlp.up / mlp.down .kernel        | h.i.mlp.c_fc / c_proj .weight        | layers.i.mlp.up_proj / down_proj .weight^T |
| mlp.gate.kernel                  | (gelu: none)                         | layers.i.mlp.gate_proj.weight^T       |
| stack.final_norm                 | ln_f                                 | norm                                  |
| head.kernel (untied only)        | (tied to wte)                        | lm_head.weight^T (no prefix)          |

(1) With norm_position=post (OLMo 2) the norms follow the branches: attn_norm is post_attention_layernorm and
mlp_norm post_feedforward_layernorm; with norm_position=sandwich (Gemma 2) attn_norm, post_attn_norm, mlp_norm,
post_mlp_norm are input_, post_attention_, pre_feedforward_, post_feedforward_layernorm. Gemma's norms scale by
1 + w: its weights w are stored as 1 + w (`Architecture.norm_offset`). (2) With qkv_bias (Qwen2) the q, k, v
projections' biases too.

GPT-2's Conv1D weights are already (in, out); its fused QKV is split along the
output axis, biases likewise. `nn.Linear` weights are (out, in): transposed.
"""

import dataclasses
import json

import ml_dtypes
import numpy as np
from flax import nnx

from jaxmodels.hf.moe import mixtral_mlp_from_hf, mixtral_mlp_to_hf
from jaxmodels.config import default_config, to_json
from jaxmodels.hf.architectures import ARCHITECTURES, Architecture, architecture_of
from jaxmodels.hf.files import (
  CARRIED_FILES,
  EXPORT_DTYPES,
  copy_files,
  parse_size,
  read_config,
  read_tensors,
  sampling_files,
  write_tensors,
)
from jaxmodels.models import lora
from jaxmodels.models.transformer import (
  TransformerConfig,
  TransformerLM,
  scan_to_unrolled,
  unrolled_to_scan,
)
from jaxmodels.runs.export import load_trained_model, refuse_existing, save_params, writing_out
from jaxmodels.runs.state import split_model
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["export_hf", "hf_config", "HF_DIR", "import_hf", "layer_names", "params_from_hf", "params_to_hf",
           "TOKEN_IDS", "transformer_config"]

HF_DIR = "hf"  # import-hf's OUT/hf/: the original config.json and CARRIED_FILES, which export-hf writes back
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json fields export-hf carries over
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def transformer_config(hf: dict) -> tuple[TransformerConfig, int]:
  """(TransformerConfig, vocabulary size) for a Hugging Face config.json; UserError for an unsupported one."""
  kind = hf.get("model_type")
  if kind not in ARCHITECTURES:
    raise UserError(f"config.json: model_type={kind!r} is not supported (expected one of "
                    f"{', '.join(ARCHITECTURES)})")
  return ARCHITECTURES[kind].to_config(hf), hf["vocab_size"]


def layer_names(config: TransformerConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """A Llama-layout layer's tensors: (name after `model.layers.i.`, our parameter path, transposed). A mixture of
  experts' MLP is not among them (jaxmodels.hf.moe maps it)."""
  names = [(f"self_attn.{hf}_proj.weight", ("attn", ours, "kernel"), True)
           for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))]
  if not config.num_experts:
    names += [(f"mlp.{hf}_proj.weight", ("mlp", hf, "kernel"), True) for hf in ("gate", "up", "down")]
  norms = {"pre": (("input", "attn_norm"), ("post_attention", "mlp_norm")),
           "post": (("post_attention", "attn_norm"), ("post_feedforward", "mlp_norm")),
           "sandwich": (("input", "attn_norm"), ("post_attention", "post_attn_norm"), ("pre_feedforward", "mlp_norm"),
                        ("post_feedforward", "post_mlp_norm"))}[config.norm_position]
  names += [(f"{hf}_layernorm.weight", (ours, "scale"), False) for hf, ours in norms]
  if config.qkv_bias:
    names += [(f"self_attn.{hf}_proj.bias", ("attn", ours, "bias"), False)
              for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))]
  if config.qk_norm != "none":
    names += [(f"self_attn.{hf}_norm.weight", ("attn", ours, "scale"), False)
              for hf, ours in (("q", "query_norm"), ("k", "key_norm"))]
  return names


def _put(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _gpt2_layer(t: dict, i: int) -> dict:
  take = lambda name: t.pop(f"transformer.h.{i}.{name}")
  q, k, v = np.split(take("attn.c_attn.weight"), 3, axis=1)
  qb, kb, vb = np.split(take("attn.c_attn.bias"), 3)
  return {"attn_norm": {"scale": take("ln_1.weight"), "bias": take("ln_1.bias")},
          "attn": {"query": {"kernel": q, "bias": qb}, "key": {"kernel": k, "bias": kb},
                   "value": {"kernel": v, "bias": vb},
                   "out": {"kernel": take("attn.c_proj.weight"), "bias": take("attn.c_proj.bias")}},
          "mlp_norm": {"scale": take("ln_2.weight"), "bias": take("ln_2.bias")},
          "mlp": {"up": {"kernel": take("mlp.c_fc.weight"), "bias": take("mlp.c_fc.bias")},
                  "down": {"kernel": take("mlp.c_proj.weight"), "bias": take("mlp.c_proj.bias")}}}


def params_from_hf(kind: str, tensors: dict, config: TransformerConfig) -> dict:
  """jaxmodels parameters (in `config.scan_layers`' layout) from Hugging Face tensors of architecture `kind`;
  KeyError for a missing tensor, UserError on leftovers."""
  t = dict(tensors)
  blocks = {}
  if ARCHITECTURES[kind].layout == "gpt2":
    t = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in t.items()}
    t.pop("lm_head.weight", None)  # tied: the same tensor as wte
    for name in [k for k in t if k.endswith((".attn.bias", ".attn.masked_bias"))]:  # causal-mask buffers
      t.pop(name)
    params = {"embed": {"embedding": t.pop("transformer.wte.weight")},
              "pos_embed": {"embedding": t.pop("transformer.wpe.weight")}}
    final = {"scale": t.pop("transformer.ln_f.weight"), "bias": t.pop("transformer.ln_f.bias")}
    blocks = {i: _gpt2_layer(t, i) for i in range(config.num_layers)}
  else:
    offset = ARCHITECTURES[kind].norm_offset
    params = {"embed": {"embedding": t.pop("model.embed_tokens.weight")}}
    final = {"scale": t.pop("model.norm.weight") + offset}
    head = t.pop("lm_head.weight", None)
    if not config.tie_embeddings:
      if head is None:
        raise UserError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
      params["head"] = {"kernel": head.T}
    for i in range(config.num_layers):
      for name, path, transpose in layer_names(config):
        value = t.pop(f"model.layers.{i}.{name}")
        _put(blocks.setdefault(i, {}), path, value.T if transpose else value + offset * (path[-1] == "scale"))
      if config.num_experts:
        blocks[i]["mlp"] = mixtral_mlp_from_hf(t.pop, f"model.layers.{i}.", config.num_experts)
  params["stack"] = {"blocks": blocks, "final_norm": final}
  if t:
    raise UserError(f"tensors without a jaxmodels parameter: {', '.join(sorted(t)[:5])}")
  return unrolled_to_scan(params) if config.scan_layers else params


def params_to_hf(kind: str, params: dict, config: TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensors from jaxmodels parameters (either layer layout): the inverse of `params_from_hf`."""
  params = _to_numpy(params)
  if config.scan_layers and not isinstance(next(iter(params["stack"]["blocks"])), int):
    params = scan_to_unrolled(params)
  out = {}
  gpt2, offset = ARCHITECTURES[kind].layout == "gpt2", ARCHITECTURES[kind].norm_offset
  for i, b in params["stack"]["blocks"].items():
    if gpt2:
      a, m = b["attn"], b["mlp"]
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
      out.update({f"model.layers.{i}.{name}": _get(b, path).T if transpose else
                  _get(b, path) - offset * (path[-1] == "scale") for name, path, transpose in layer_names(config)})
      if config.num_experts:
        out.update(mixtral_mlp_to_hf(b["mlp"], f"model.layers.{i}."))
  final = params["stack"]["final_norm"]
  if gpt2:
    out.update({"transformer.wte.weight": params["embed"]["embedding"],
                "transformer.wpe.weight": params["pos_embed"]["embedding"],
                "transformer.ln_f.weight": final["scale"], "transformer.ln_f.bias": final["bias"]})
  else:
    out.update({"model.embed_tokens.weight": params["embed"]["embedding"],
                "model.norm.weight": final["scale"] - offset})
    if "head" in params:
      out["lm_head.weight"] = params["head"]["kernel"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_numpy(tree):
  """Nested dicts of NumPy arrays (from jax arrays)."""
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def hf_config(config: TransformerConfig, vocab_size: int) -> dict:
  """A Hugging Face config.json for `config` (its `architecture_of`); UserError if no architecture fits."""
  return architecture_of(config).from_config(config, vocab_size)


def import_hf(directory: str, out: str, scan_layers: bool = True) -> str:
  """Writes a Hugging Face model directory's weights to `out` in `jaxmodels export`'s format, and its config.json,
  generation config and tokenizer files to `out/hf/`; returns `out`. UserError for an unsupported or incomplete
  directory (naming the field, tensor or shard)."""
  refuse_existing(out)
  extras.check("safetensors", "import-hf")
  hf = read_config(directory)
  try:
    config, vocab_size = transformer_config(hf)
  except KeyError as e:  # a field every config.json of that model_type has
    raise UserError(f"{directory}/config.json has no {e.args[0]!r}: not a complete {hf.get('model_type')} "
                    f"config") from None
  except ValueError as e:  # a value TransformerConfig refuses
    raise UserError(f"{directory}/config.json: {e}") from None
  config = dataclasses.replace(config, scan_layers=scan_layers)
  try:
    params = params_from_hf(hf["model_type"], read_tensors(directory), config)
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
  with writing_out(out):
    save_params(out, params, {})
    spec = {"input_shape": [c.data.seq_len], "num_outputs": vocab_size, "task": "lm"}
    storage.write_files(out, {"config.json": to_json(c), "model.json": json.dumps(spec)})
    kept = storage.path(out) / HF_DIR
    kept.mkdir()
    (kept / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
    copy_files(directory, kept, CARRIED_FILES)
    storage.write_files(out, sampling_files(kept))  # the tokenizer and chat template, for `jaxmodels sample`
  return out


def _check_shapes(expected: dict, got: dict, path: str = "") -> None:
  if set(expected) != set(got):
    raise UserError(f"parameters {path or '/'}: expected {sorted(map(str, expected))}, got {sorted(map(str, got))}")
  for k, v in expected.items():
    if isinstance(v, dict):
      _check_shapes(v, got[k], f"{path}/{k}")
    elif tuple(v.shape) != tuple(got[k].shape):
      raise UserError(f"parameter {path}/{k}: expected shape {tuple(v.shape)}, got {tuple(got[k].shape)}")


def _kept_dir(model_path: str, log):
  """The `hf/` directory import-hf kept for `model_path`: its own, else that of the import its run started from
  (`checkpoint.restore_from` of its config.json: a fine-tuning run or its export), followed back through runs that
  started from runs (a second fine-tuning). Runs save it absolute; a run saved before that holds it as written,
  relative to a directory unknown here: where that path is not found, `log` says the export goes without its
  tokenizer files and token ids."""
  p, seen = storage.path(model_path), set()
  while not (p / HF_DIR).is_dir() and str(p) not in seen:  # seen: a restore_from cycle ends the search
    seen.add(str(p))
    saved = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    restore_from = saved.get("checkpoint", {}).get("restore_from")
    if not restore_from:
      break
    if not storage.path(restore_from).exists():
      log(f"note: {p / 'config.json'} names checkpoint.restore_from={restore_from!r}, which is not found from "
          f"here (a relative path: run export-hf from the directory that run started in): no tokenizer files or "
          f"token ids of its import are written")
    p = storage.path(restore_from)
  return p / HF_DIR


def _kept_config(kept, architecture: Architecture) -> dict:
  """The token ids of the original config.json that import-hf kept in `kept` (its `_kept_dir`), only if it is of
  the same architecture."""
  path = kept / "config.json"
  if not path.is_file():
    return {}
  original = json.loads(path.read_text(encoding="utf-8"))
  if original.get("model_type") != architecture.model_type:
    return {}
  return {k: original[k] for k in TOKEN_IDS if original.get(k) is not None}


def export_hf(model_path: str, out: str, dtype: str = "float32", max_shard_size: str = "5GB", log=print) -> str:
  """Writes a jaxmodels export (or import, or training workdir) as a Hugging Face directory; returns `out`.

  Tensors are cast to `dtype` (EXPORT_DTYPES) and split into shards of at most `max_shard_size` (transformers'
  notation: 5GB, 500MB, 2GiB) with a model.safetensors.index.json when there are several. An import-hf output's
  `hf/` files (generation config, tokenizer) are copied and its bos/eos/pad token ids written to config.json; so are
  those of the import a fine-tuning run started from (its `checkpoint.restore_from`), for the run and its exports;
  `log` gets a note where that import is not found.
  UserError for another kind of model, a layout no architecture fits, or a bad dtype or size.
  """
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"--dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
  max_bytes = parse_size(max_shard_size)
  extras.check("safetensors", "export-hf")
  refuse_existing(out)
  model = lora.merge_lora(load_trained_model(model_path))  # a LoRA run's adapters merged into its kernels
  if not isinstance(model, TransformerLM):
    raise UserError(f"{model_path} holds a {type(model).__name__}: only Transformer language models export")
  architecture = architecture_of(model.config)
  _, params, _ = split_model(model)
  tensors = {k: v.astype(_DTYPES[dtype]) for k, v in params_to_hf(architecture.model_type, params,
                                                                   model.config).items()}
  path = storage.path(out)
  kept = _kept_dir(model_path, log)
  with writing_out(out):
    path.mkdir(parents=True)
    write_tensors(path, tensors, max_bytes)
    hf = {**architecture.from_config(model.config, model.embed.num_embeddings),
          **_kept_config(kept, architecture), "dtype": dtype}
    (path / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
    copy_files(kept, path, CARRIED_FILES)
  return out
