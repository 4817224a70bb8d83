"""Optional dependencies: which `pip install 'jaxmodels[EXTRA]'` brings each, and the one-line error without it.

`pip install jaxmodels` installs what the models, the optimizer factory,
sharding, checkpoints and the training loop need, and nothing else (the default
experiment's 8x8 digits ship with the package). Every other library is imported
through `require` where a feature first uses it, so each module of jaxmodels
imports without its extra, and a feature used without its extra raises
`UserError("<feature> needs <module>: pip install 'jaxmodels[<extra>]'")`,
which the CLI prints as one line (exit 2). Features that a config asks for are
checked with `check` when the config is validated, before a run writes anything.
"""

import importlib
import importlib.util
from types import ModuleType

from jaxmodels.runtime.errors import UserError

__all__ = ["check", "EXTRAS", "installed", "message", "require"]

# module (as imported) -> the extra of pyproject.toml that installs it
EXTRAS = {
  "gcsfs": "gcs",  # gs:// paths (runtime.storage: workdirs, data, exports)
  "tokenizers": "text",  # Hugging Face tokenizer.json files, BPE training (data.tokenizers, data.prepare)
  "sentencepiece": "text",  # SentencePiece .model files
  "tiktoken": "text",  # tiktoken BPE files
  "tiktoken_ext": "text",  # tiktoken's patterns (installed with it)
  "jinja2": "text",  # chat templates (jaxmodels.data.chat: data.source=sft, sample --chat)
  "PIL": "images",  # Pillow: data.source=images decodes and augments with it (data.images)
  "safetensors": "hf",  # import-hf, export-hf (hf.convert)
  "qwix": "quant",  # QAT (train.quantization.bits) and PTQ (compress --method ptq) (compress.quantization)
  "tensorboardX": "tracking",  # TensorBoard scalars under workdir/tb/ (train.metrics; skipped without it)
  "wandb": "tracking",  # train.wandb_project (train.metrics)
  "matplotlib": "plot",  # jaxmodels plot, bench --plot, plan --plot
}


def message(module: str, feature: str) -> str:
  """The one line telling that `feature` needs `module` and which `pip install` brings it."""
  return f"{feature} needs {module}: pip install 'jaxmodels[{EXTRAS[module]}]'"


def installed(module: str) -> bool:
  """Whether `module` can be imported, without importing it."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a finder that refuses the name; a module without a spec
    return False


def check(module: str, feature: str) -> None:
  """Raises the one-line UserError if `module` (a key of EXTRAS) is not installed; imports nothing."""
  if not installed(module):
    raise UserError(message(module, feature))


def require(module: str, feature: str) -> ModuleType:
  """`module` (a key of EXTRAS, or a submodule of one) imported, or the one-line UserError naming its extra."""
  top = module.split(".")[0]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != top:  # the module is there but one of its own dependencies is not
      raise
    raise UserError(message(top, feature)) from None
