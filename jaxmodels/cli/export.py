"""`jaxmodels export`: a run's parameters for research code."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.runs.export import export

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels export --workdir DIR --out PATH [--keep-adapters]

Writes the parameters of DIR's newest checkpoint (no optimizer state) to PATH,
with the config and model shape needed to rebuild the module; research code
loads them with jaxmodels.load_model(PATH) or jaxmodels.load_params(PATH).
A LoRA run's adapters are merged into the weights unless --keep-adapters.
"""
  a = parse_args(prog, args, [("--workdir", dict(required=True)), ("--out", dict(required=True)),
                              ("--keep-adapters", dict(action="store_true"))])
  print(f"exported {a.workdir} to {export(a.workdir, a.out, merge_lora=not a.keep_adapters)}")
  return 0
