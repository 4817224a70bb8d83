"""`jaxmodels export-hf`: an export or run as a Hugging Face directory."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.hf.convert import export_hf

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels export-hf --model PATH --out DIR

Writes the Transformer language model at PATH (an export, an import-hf output or
a training workdir) as a Hugging Face directory DIR (config.json + model.safetensors;
PATH and DIR local or gs://) of the GPT-2 or Llama family, whichever layout the model has.
"""
  a = parse_args(prog, args, [("--model", dict(required=True)), ("--out", dict(required=True))])
  print(f"exported {a.model} to {export_hf(a.model, a.out)}")
  return 0
