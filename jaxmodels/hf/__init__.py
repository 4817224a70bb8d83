"""Hugging Face interop: `import_hf` and `export_hf` convert checkpoints to jaxmodels exports and back."""

from jaxmodels.hf.convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
