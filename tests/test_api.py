"""The public API is visible: every module says what it exports, and the root package reaches every subpackage."""

import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import jaxmodels
from conftest import ROOT

SUBPACKAGES = ("bench", "cli", "compress", "config", "data", "hf", "models", "optim", "parallel", "runs", "runtime",
               "tasks", "tools", "train")


def _modules() -> list[str]:
  return sorted(m.name for m in pkgutil.walk_packages(jaxmodels.__path__, "jaxmodels.") if m.name != "jaxmodels.__main__")


def _defined(module_name: str) -> set[str]:
  """Top-level functions, classes and assigned names the module's source defines itself."""
  path = importlib.util.find_spec(module_name).origin
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
        names.update(n.id for n in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", []))
                     if isinstance(n, ast.Name))
  return names


def test_every_module_defines_all_and_each_name_exists():
  missing, absent = [], []
  for name in _modules():
    module = importlib.import_module(name)
    if not hasattr(module, "__all__"):
      missing.append(name)
      continue
    absent += [f"{name}.{n}" for n in module.__all__ if not hasattr(module, n)]
  assert missing == [] and absent == []


def test_all_lists_every_public_name_a_module_defines():
  # A new public function or class is exported, or named with a leading underscore: the choice is made, not drifted.
  unlisted = []
  for name in _modules():
    if name.endswith("__init__") or importlib.util.find_spec(name).submodule_search_locations:
      continue  # packages re-export their modules' names
    public = {n for n in _defined(name) if not n.startswith("_")}
    unlisted += [f"{name}.{n}" for n in sorted(public - set(importlib.import_module(name).__all__))]
  assert unlisted == []


def test_the_root_package_reaches_every_subpackage_lazily():
  code = ("import sys, jaxmodels; assert 'jaxmodels.train' not in sys.modules; "
          "print(sorted(set(jaxmodels.__all__))); print(jaxmodels.models.TransformerLM.__name__, "
          "jaxmodels.count_params.__name__, jaxmodels.Trainer.__name__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  exported = ast.literal_eval(out.splitlines()[0])
  assert set(SUBPACKAGES) <= set(exported)
  assert out.splitlines()[1] == "TransformerLM count_params Trainer"


def test_the_api_reference_has_a_page_per_subpackage():
  pages = set(os.listdir(os.path.join(ROOT, "docs", "api")))
  with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
    nav = f.read()
  for sub in SUBPACKAGES:
    if sub == "cli":
      continue  # the commands' docstrings are their usage text, documented on the topic pages
    assert f"{sub}.md" in pages and f"api/{sub}.md" in nav, sub
