"""`jaxmodels import-hf`: a Hugging Face GPT-2 or Llama directory as an export."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.hf.convert import import_hf

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels import-hf DIR --out PATH

Reads a Hugging Face GPT-2 or Llama-family directory (config.json +
*.safetensors; local or gs://, nothing is downloaded from the Hub) and writes its
weights to PATH (local or gs://) in the format `jaxmodels export` writes:
jaxmodels.load_model(PATH) returns the model.
"""
  a = parse_args(prog, args, [("dir", {}), ("--out", dict(required=True))])
  print(f"imported {a.dir} to {import_hf(a.dir, a.out)}")
  return 0
