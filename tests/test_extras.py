"""The light core: `pip install jaxmodels` trains the default experiment without any optional library, and each
feature that needs one fails with one line naming the `pip install` that brings it, before writing anything.

The optional libraries are blocked in a subprocess by a `sys.meta_path` finder (as if not installed), since this
suite's environment has every extra.
"""

import json
import os
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
from conftest import ROOT

from jaxmodels.compress import quantization
from jaxmodels.data.arrays import digits
from jaxmodels.models import presets
from jaxmodels.runtime import extras
from jaxmodels.runtime.errors import UserError

# Every optional module, and the test-only libraries that the core must not pull in either.
BLOCKED = (*extras.EXTRAS, "sklearn", "transformers", "torch")
BLOCKER = textwrap.dedent(f"""
  import importlib.abc, sys
  BLOCKED = {BLOCKED!r}

  class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in BLOCKED:
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_extras.py)", name=name)
      return None

  sys.meta_path.insert(0, Blocker())
  """)
CORE = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "etils", "numpy", "tqdm", "absl-py",
        "grain"}


def _blocked_python(code: str, tmp_path, timeout: int = 300) -> dict:
  """Runs `code` after the blocker in a fresh interpreter (cwd `tmp_path`); returns the JSON it prints last."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a laptop has
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAXMODELS_MALLOC="system")
  r = subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=timeout, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def _loaded_optional() -> str:
  return "sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)"


def test_core_imports_builds_gpt2_and_trains_the_default_experiment_without_optional_libraries(tmp_path):
  experiment = os.path.join(ROOT, "experiments", "digits_cnn.py")
  out = _blocked_python(f"""
    import contextlib, io, json, os, sys
    import jax
    from flax import nnx
    import jaxmodels.models
    from jaxmodels.models import presets
    gpt2 = nnx.eval_shape(lambda: presets.build("gpt2", rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(gpt2, nnx.Param)))
    from jaxmodels.cli import entry
    sys.argv = ["jaxmodels", "train", "--config", {experiment!r}, "--workdir", "run", "--config.train.steps=5"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      try:
        entry()
      except SystemExit as e:
        code = e.code
    print(json.dumps({{"code": code, "params": params, "stdout": stdout.getvalue(), "files": sorted(os.listdir("run")),
                      "optional": {_loaded_optional()}}}))
    """, tmp_path)
  assert out["optional"] == []
  assert out["params"] == presets.PRESETS["gpt2"].params
  assert out["code"] == 0, out["stdout"]
  assert "final: step 5 test" in out["stdout"]
  assert "metrics.jsonl" in out["files"] and "checkpoints" in out["files"]
  assert "tb" not in out["files"]  # TensorBoard scalars need tensorboardX: skipped, silently


def test_each_feature_without_its_extra_is_one_line_naming_the_pip_install_and_writes_nothing(tmp_path):
  exp = lambda name: os.path.join(ROOT, "experiments", f"{name}.py")
  for name, text in (("tok.json", "{}"), ("tok.model", "x"), ("tok.tiktoken", "x")):
    (tmp_path / name).write_text(text)
  (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
  (tmp_path / "images" / "a").mkdir(parents=True)
  (tmp_path / "images" / "b").mkdir()
  train = ["train", "--config", exp("digits_mlp"), "--workdir", "run"]
  cases = [  # (command line, the feature and the extra its one line names)
      (["train", "--config", exp("digits_mlp"), "--workdir", "gs://bucket/run"], "gs://bucket/run", "gcsfs", "gcs"),
      (train + ["--config.data.source=npz", "--config.data.path=gs://bucket/d.npz"], "gs://bucket/d.npz", "gcsfs",
       "gcs"),
      (train + ["--config.train.wandb_project=p"], "train.wandb_project='p'", "wandb", "tracking"),
      (train + ["--config.train.quantization.bits=8"], "train.quantization.bits=8", "qwix", "quant"),
      (train + ["--config.data.source=images", "--config.data.path=images"], "data.source=images", "PIL", "images"),
      (["prepare", "corpus.txt", "--out", "corpus", "--train-tokenizer", "bpe", "--vocab-size", "300"],
       "--train-tokenizer bpe", "tokenizers", "text"),
      (["prepare", "corpus.txt", "--out", "corpus", "--tokenizer", "tok.json"], "a Hugging Face tokenizer.json",
       "tokenizers", "text"),
      (["prepare", "corpus.txt", "--out", "corpus", "--tokenizer", "tok.model"], "a SentencePiece .model",
       "sentencepiece", "text"),
      (["prepare", "corpus.txt", "--out", "corpus", "--tokenizer", "tok.tiktoken"], "a tiktoken BPE file",
       "tiktoken", "text"),
      (["compress", "--workdir", "run", "--method", "ptq", "--out", "small"], quantization.FEATURE, "qwix", "quant"),
      (["export-hf", "--model", "run", "--out", "hf"], "export-hf", "safetensors", "hf"),
      (["plot", "run", "--out", "curves.png"], "jaxmodels plot", "matplotlib", "plot"),
      (["bench", "compile", "--config", exp("digits_mlp"), "--plot", "compile.png"], "--plot", "matplotlib", "plot"),
  ]
  out = _blocked_python(f"""
    import contextlib, io, json, os, sys
    from jaxmodels.cli import main

    def files():
      return sorted(os.path.join(d, f) for d, _, names in os.walk(".") for f in names)

    results = []
    for args in {[c[0] for c in cases]!r}:
      before, stderr = files(), io.StringIO()
      with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["jaxmodels", *args])
      results.append({{"code": code, "stderr": stderr.getvalue(), "new": sorted(set(files()) - set(before))}})
    print(json.dumps({{"results": results, "optional": {_loaded_optional()}}}))
    """, tmp_path)
  assert out["optional"] == []
  for (args, feature, module, extra), r in zip(cases, out["results"]):
    line = f"jaxmodels: error: {feature} needs {module}: pip install 'jaxmodels[{extra}]'"
    assert (r["code"], r["stderr"].splitlines(), r["new"]) == (2, [line], []), args
  assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "images", "tok.json", "tok.model", "tok.tiktoken"]


def _name(requirement: str) -> str:
  """A requirement's project name: 'etils[epath]>=1.7' -> 'etils'."""
  for stop in "[<>=!~; ":
    requirement = requirement.split(stop)[0]
  return requirement


def test_core_dependencies_are_the_light_list_and_every_optional_module_has_its_extra():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert {_name(r) for r in project["dependencies"]} == CORE
  extra_deps = project["optional-dependencies"]
  assert set(extras.EXTRAS.values()) <= set(extra_deps)
  (everything,) = extra_deps["all"]
  assert everything.startswith("jaxmodels[") and set(everything[10:-1].split(",")) == set(extras.EXTRAS.values())
  assert "jaxmodels[all,docs]" in extra_deps["dev"]
  assert {"tpu", "cuda", "docs"} <= set(extra_deps)


def test_bundled_digits_equal_sklearns_load_digits():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  expected = load_digits()
  images, target = digits()
  for got, want in ((images, expected.images), (target, expected.target)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("module", sorted(extras.EXTRAS))
def test_require_names_the_extra(module, monkeypatch):
  monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import raises ModuleNotFoundError
  line = rf"^feature needs {module}: pip install 'jaxmodels\[{extras.EXTRAS[module]}\]'$"
  with pytest.raises(UserError, match=line):
    extras.require(module, "feature")
  assert not extras.installed(module)
