"""Hugging Face interop: `import_hf` and `export_hf` convert checkpoints to jaxmodels exports and back
(architectures: `jaxmodels.hf.architectures.ARCHITECTURES`)."""

from jaxmodels.hf.architectures import ARCHITECTURES
from jaxmodels.hf.convert import export_hf, import_hf

__all__ = ["ARCHITECTURES", "export_hf", "import_hf"]
