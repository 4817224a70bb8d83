"""Every shell command in README.md and in each experiment's docstring runs, as written, and ends well.

A stale example fails CI. Commands that would train or compile for long are
shortened by the overrides that README.md documents ("Every command in this
README ... runs in the test suite"): training commands get
`--config.train.steps=10` appended (`make train` as ARGS); `bench compile` runs
`--repeat 1`, the first two values of its first `--sweep` and the first of any
other. Commands run in order, each file's in one fresh directory (so `sample` finds the run that
a command before it trained), with `experiments/` linked in, JAX left to pick
its platform as on a user's machine, and no line of their output may read as a
failure (`E0000`, `ERROR`, a traceback or a source trace).
An experiment whose docstring commands README.md runs the equivalents of, in
order (training on the same config file; another command on the same workdir),
is not run a second time (`run_by_readme`).
"""

import ast
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

TRAIN_STEPS = "--config.train.steps=10"
FAILURE_LINES = re.compile(r"E0000|ERROR|Traceback|Source Location Trace")
# The one command not run: it is the suite that runs this test.
NOT_RUN = {"make test": "the test suite itself"}


def readme_commands(path: str) -> list[str]:
  """Commands of the ```sh blocks: continuation lines joined, comments dropped, python blocks as `python -c`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  commands = []
  for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
    if lang == "sh":
      for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
          commands.append(shlex.join(words))
    elif lang == "python":
      commands.append(shlex.join(["python", "-c", body]))
  return commands


def docstring_commands(path: str) -> list[str]:
  """The indented `python ...` / `jaxmodels ...` lines of a module docstring."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return [line.strip() for line in doc.splitlines() if re.match(r"\s{4}(python|jaxmodels) ", line)]


def shortened(words: list[str]) -> list[str]:
  """The documented shortening: fewer steps for training, one repeat and fewer sweep values for bench compile."""
  if words[:2] == ["jaxmodels", "bench"] and "compile" in words:
    out, sweeps = [], 0
    for i, w in enumerate(words):
      if i and words[i - 1] == "--repeat":
        w = "1"
      elif i and words[i - 1] == "--sweep":
        key, _, values = w.partition("=")
        w = f"{key}={','.join(values.split(',')[:2 if not sweeps else 1])}"
        sweeps += 1
      out.append(w)
    return out
  trains = ((words[0] == "python" and words[1].startswith("experiments/"))
            or (words[0] == "jaxmodels" and "train" in words[1:]))
  return [*words, TRAIN_STEPS] if trains else words


def argv(words: list[str], venv: str) -> list[str]:
  """The argv that runs `words` against this checkout: python and jaxmodels from this interpreter."""
  if words[0] == "python":
    return [sys.executable, *words[1:]]
  if words[0] == "jaxmodels":
    return [sys.executable, "-m", "jaxmodels", *words[1:]]
  if words[:2] == ["make", "train"]:  # the installed venv, its install step taken as done; steps shortened
    return ["make", "-C", ROOT, "-o", os.path.join(venv, ".jaxmodels-installed"), f"VENV={venv}",
            f"WORKDIR={os.path.abspath('runs/digits_cnn')}", f"ARGS={TRAIN_STEPS}", *words[1:]]
  raise AssertionError(f"no rule to run {shlex.join(words)!r}: add one to tests/test_readme.py")


def run_all(commands: list[str], workdir) -> None:
  os.symlink(os.path.join(ROOT, "experiments"), workdir / "experiments")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT
  venv = sys.prefix
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    for command in commands:
      if command in NOT_RUN:
        continue
      words = shortened(shlex.split(command))
      r = subprocess.run(argv(words, venv), env=env, capture_output=True, text=True, timeout=600, check=False)
      output = r.stdout + r.stderr
      assert r.returncode == 0, f"{command}\nexited {r.returncode}:\n{output[-3000:]}"
      bad = [line for line in output.splitlines() if FAILURE_LINES.search(line)]
      assert not bad, f"{command}\nprinted lines that read as failures:\n" + "\n".join(bad[:10])
  finally:
    os.chdir(cwd)


def test_extraction_finds_the_commands():
  commands = readme_commands(os.path.join(ROOT, "README.md"))
  assert "make train" in commands and any(c.startswith("jaxmodels sample") for c in commands)
  assert any(c.startswith("jaxmodels bench compile") and "--sweep" in c for c in commands)
  assert any(c.startswith("python -c") for c in commands)
  assert docstring_commands(os.path.join(ROOT, "experiments", "text_lstm.py"))[1].startswith("jaxmodels sample")
  assert shortened(["python", "experiments/x.py"])[-1] == TRAIN_STEPS
  assert shortened(shlex.split("jaxmodels bench compile --sweep a.b=1,2,4 --sweep c=x,y --repeat 3")) == shlex.split(
      "jaxmodels bench compile --sweep a.b=1,2 --sweep c=x --repeat 1")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
  run_all(readme_commands(os.path.join(ROOT, "README.md")), tmp_path)


def equivalence(command: str) -> tuple:
  """What a command does, for matching a docstring's commands with the README's: training (as a script or with
  `jaxmodels train`) is its config file, whatever the workdir and overrides; another command is its name and
  workdir, whatever its other flags."""
  words = shlex.split(command)
  if words[0] == "python" and words[1].startswith("experiments/"):
    return ("train", words[1])
  name = words[1]
  flag = "--config" if name == "train" else "--workdir"
  return (name, words[words.index(flag) + 1] if flag in words else None)


def run_by_readme(path: str) -> bool:
  """Whether README.md runs an equivalent of every docstring command of `path`, in the same order: the
  README's test then runs what the docstring's would."""
  readme = [equivalence(c) for c in readme_commands(os.path.join(ROOT, "README.md")) if c not in NOT_RUN
            and not c.startswith("python -c")]
  wanted = [equivalence(c) for c in docstring_commands(path)]
  found = [i for w in wanted for i in [next((i for i, r in enumerate(readme) if r == w), None)] if i is not None]
  return len(found) == len(wanted) and found == sorted(found)


EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not run_by_readme(p)], ids=os.path.basename)
def test_experiment_docstring_commands_run_as_written(path, tmp_path):
  commands = docstring_commands(path)
  assert commands, f"{path}: the docstring gives no command"
  run_all(commands, tmp_path)


def test_docstring_commands_the_readme_runs():
  """The experiments whose docstring commands are not run on their own: README.md runs their equivalents."""
  assert [os.path.basename(p) for p in EXPERIMENTS if run_by_readme(p)] == ["digits_cnn.py", "digits_mlp.py",
                                                                          "text_transformer.py"]
  assert equivalence("python experiments/a.py --workdir x") == equivalence("jaxmodels train --config experiments/a.py")
  assert equivalence("jaxmodels sample --workdir runs/a --length 2") != equivalence("jaxmodels sample --workdir runs/b")


def expected_sentence(path: str) -> str:
  """The docstring's `Expected: ...` sentence(s), whitespace collapsed."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  match = re.search(r"Expected: (.*?)(?:\n\n|$)", doc, flags=re.S)
  assert match, f"{path}: the docstring states no `Expected:` result"
  return " ".join(match.group(1).split())


def test_readme_expected_results_are_the_docstrings():
  """The README's experiment table repeats each docstring's measured result word for word: one source."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `experiments/(\w+)\.py`[^|]*\|[^|]*\|(.*)\|$",
                                                                 f.read(), flags=re.M)}
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]
    assert name in rows, f"README's experiment table has no row for {name}"
    assert rows[name] == expected_sentence(path), f"README's expected result for {name} differs from its docstring"
