"""The package's architecture holds: the layers contract, no import cycle, no function-local import of our own.

The layers are written in pyproject.toml (`[tool.importlinter]`) and checked by import-linter; the cycle check below
also covers imports between modules of one layer, which the layers contract does not see.
"""

import ast
import os
import subprocess
import sys

import grimp
from conftest import ROOT

PACKAGE = os.path.join(ROOT, "jaxmodels")
# The one place a jaxmodels import may sit inside a function: the root package's `load_model`/`load_params`, which
# import the runs layer only when called, so that `import jaxmodels.models` does not load checkpoints and exports.
LOCAL_IMPORTS_ALLOWED = {"jaxmodels/__init__.py"}


def test_the_layers_contract_is_kept():
  lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "1 kept, 0 broken" in result.stdout


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
  modules = sorted(graph.modules)
  edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
  index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
  for root in modules:
    if root in index:
      continue
    work = [(root, 0)]
    while work:
      node, i = work.pop()
      if i == 0:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
      for j in range(i, len(edges[node])):
        nxt = edges[node][j]
        if nxt not in index:
          work.append((node, j + 1))
          work.append((nxt, 0))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        if low[node] == index[node]:
          component = []
          while True:
            m = stack.pop()
            on_stack.discard(m)
            component.append(m)
            if m == node:
              break
          if len(component) > 1:
            found.append(sorted(component))
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[node])
  return found


def test_no_import_cycle_anywhere_in_the_package():
  # grimp reads every import statement, those inside functions included.
  graph = grimp.build_graph("jaxmodels", cache_dir=None)
  assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
  class Graph:
    modules = {"a", "b", "c", "d"}
    imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    def find_modules_directly_imported_by(self, m):
      return self.imports[m]

  assert _cycles(Graph()) == [["a", "b", "c"]]


def test_no_function_local_import_of_jaxmodels():
  found = []
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      rel = os.path.relpath(path, ROOT)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      top = {id(node) for node in tree.body}
      for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxmodels")
            or isinstance(node, ast.Import) and any(a.name.startswith("jaxmodels") for a in node.names)):
          if id(node) not in top and rel not in LOCAL_IMPORTS_ALLOWED:
            found.append(f"{rel}:{node.lineno}")
  assert found == []
