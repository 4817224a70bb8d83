"""`jaxmodels import-hf`: a Hugging Face model directory as an export."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.hf.convert import import_hf

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels import-hf DIR --out PATH

Reads a Hugging Face directory (config.json + *.safetensors, or shards with their
model.safetensors.index.json; local or gs://, nothing is downloaded from the Hub)
and writes its weights to PATH (local or gs://) in the format `jaxmodels export`
writes: jaxmodels.load_model(PATH) returns the model. The original config.json,
generation_config.json and tokenizer files are kept in PATH/hf/.

Architectures (config.json's model_type): gpt2; llama (Llama 2 and 3.x, rope
scaling default, linear, llama3, yarn); mistral (sliding window); qwen2 (Qwen2,
Qwen2.5: q/k/v biases); qwen3 (q/k RMSNorm); gemma (Gemma 1); gemma2 (Gemma 2:
soft-capping, local/global layers); olmo2 (post-norms, q/k RMSNorm).
"""
  a = parse_args(prog, args, [("dir", {}), ("--out", dict(required=True))])
  print(f"imported {a.dir} to {import_hf(a.dir, a.out)}")
  return 0
