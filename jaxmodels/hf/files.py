"""Hugging Face model directories on disk or gs://: config.json, (sharded) safetensors, tokenizer files.

Every path goes through `jaxmodels.runtime.storage`; safetensors reads and writes local files only, so a gs://
file is staged through a temporary local copy (`local_file`). Sharded checkpoints follow transformers'
layout: `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` ({"metadata": {"total_size"},
"weight_map": {tensor: shard}}); one shard is written as `model.safetensors` alone.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from jaxmodels.data import tokenizers
from jaxmodels.data.chat import directory_template
from jaxmodels.data.sft import CHAT_FILE
from jaxmodels.data.tokenizers import VOCAB_FILE
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CARRIED_FILES", "copy_files", "EXPORT_DTYPES", "INDEX_FILE", "local_file", "parse_size", "read_config",
           "read_tensors", "sampling_files", "shards", "write_tensors"]

INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's {"weight_map": {tensor: shard file}}
# Files of a Hugging Face directory that import-hf keeps (in OUT/hf/) and export-hf writes back beside the weights:
# the tokenizer (tokenizers' tokenizer.json, sentencepiece's tokenizer.model, GPT-2's vocab.json + merges.txt),
# its settings and chat template, and the generation defaults.
CARRIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # export-hf --dtype
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def read_config(directory) -> dict:
  """config.json of a Hugging Face directory; UserError if missing or not JSON."""
  path = storage.path(directory) / "config.json"
  if not path.is_file():
    raise UserError(f"{path} not found: expected a Hugging Face model directory (config.json + *.safetensors)")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not JSON ({e}): expected a Hugging Face config.json") from None


def sampling_files(directory) -> dict[str, str]:
  """What a run keeps for `jaxmodels sample`, from a Hugging Face directory's tokenizer files: VOCAB_FILE, the spec
  of its tokenizer (jaxmodels.data.tokenizers; `tokenizer.json`, else a SentencePiece `tokenizer.model`, where the
  `text` extra's library for it is installed), and CHAT_FILE, its chat template with the special tokens
  (jaxmodels.data.chat). Either is left out where the directory has no such file (or a tokenizer file its
  library does not read)."""
  p = storage.path(directory)
  out = {}
  for name, module in (("tokenizer.json", "tokenizers"), ("tokenizer.model", "sentencepiece")):
    if (p / name).is_file() and extras.installed(module):
      try:
        out[VOCAB_FILE] = tokenizers.from_file(str(p / name)).to_json()
      except UserError:  # a file its library cannot read: the weights still import; sample says vocab.json is missing
        pass
      break
  if (template := directory_template(p)) is not None:
    out[CHAT_FILE] = template.to_json()
  return out


@contextlib.contextmanager
def local_file(path, write: bool = False):
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


def copy_files(source, target, names) -> list[str]:
  """Copies those of the files `names` that directory `source` holds into directory `target`; their names."""
  copied = []
  for name in names:
    if (storage.path(source) / name).is_file():
      _copy(storage.path(source) / name, storage.path(target) / name)
      copied.append(name)
  return copied


def shards(directory) -> list:
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


def read_tensors(directory) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors files, as float32 NumPy arrays (bfloat16 and float16 too)."""
  safe_open = extras.require("safetensors", "import-hf").safe_open
  tensors = {}
  for path in shards(directory):
    # flax: bfloat16 tensors load too (NumPy has no bfloat16)
    with local_file(path) as local, safe_open(local, framework="flax") as f:
      for name in f.keys():
        tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  return tensors


def parse_size(text: str) -> int:
  """Bytes of a size written as transformers' max_shard_size ("5GB", "500MB", "2GiB", "1000000");
  UserError otherwise."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
  if not m or float(m.group(1)) <= 0:
    raise UserError(f"--max-shard-size {text}: expected a positive size such as 5GB, 500MB, 2GiB or a byte count")
  return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def write_tensors(directory, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """Writes `tensors` into `directory` (existing; local or gs://) as safetensors shards of at most
  `max_shard_bytes` each (a tensor larger than that gets a shard of its own), in name order, with the index when
  there is more than one shard; returns the files written."""
  save_file = extras.require("safetensors.numpy", "export-hf").save_file
  groups, size = [[]], 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  n = len(groups)
  names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  d = storage.path(directory)
  for file, group in zip(names, groups):
    with local_file(d / file, write=True) as local:
      save_file({k: tensors[k] for k in group}, local, metadata={"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {k: file for file, group in zip(names, groups) for k in group}}
    (d / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    names.append(INDEX_FILE)
  return names
