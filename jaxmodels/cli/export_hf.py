"""`jaxmodels export-hf`: an export or run as a Hugging Face directory."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.hf.convert import export_hf
from jaxmodels.hf.files import EXPORT_DTYPES

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels export-hf --model PATH --out DIR [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]

Writes the Transformer language model at PATH (an export, an import-hf output or
a training workdir) as a Hugging Face directory DIR (config.json + safetensors;
PATH and DIR local or gs://) of the architecture whose layout the model has
(gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, olmo2: see `jaxmodels import-hf --help`).
An import-hf output's tokenizer files, generation_config.json and bos/eos/pad
token ids are written too.

  --dtype: the tensors' type (default float32).
  --max-shard-size: the largest safetensors file (5GB, 500MB, 2GiB, or bytes; default 5GB);
      more than one is written as model-0000i-of-0000n.safetensors with model.safetensors.index.json.
"""
  a = parse_args(prog, args, [("--model", dict(required=True)), ("--out", dict(required=True)),
                              ("--dtype", dict(default="float32", choices=EXPORT_DTYPES)),
                              ("--max-shard-size", dict(default="5GB"))])
  print(f"exported {a.model} to {export_hf(a.model, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size)}")
  return 0
