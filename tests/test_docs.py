"""The docs hold: every shell command in README.md, in the pages of docs/ and in each experiment's docstring runs,
as written, and ends well; every module path and file they name exists; the site builds with `mkdocs build --strict`;
the README stays a front door (at most 300 lines).

A stale example fails CI. Commands that would train, compile or time for long are shortened, as README.md and
docs/index.md say: training commands get `--config.train.steps=10` appended (`make train` as ARGS); `bench compile`
runs `--repeat 1`, the first two values of its first `--sweep` and the first of any other; `bench step` and the
benchmark scripts (`python benchmarks/...`) run `--steps 5` (the scripts also `--repeats 1`). Each page's commands
run in order in one fresh directory (so `sample` finds the run that a command before it trained), with
`experiments/` and `benchmarks/` linked in and an empty `docs/` (a command may write there, as from the repository
root), JAX left to pick its platform as on a user's machine, and no line of their output may read as a failure
(`E0000`, `ERROR`, a traceback or a source trace). Not run: `make test` (the suite that runs this test), the `tpu/`
scripts (they need a Google Cloud project; tests/test_tpu_scripts.py runs each against a fake gcloud), and an
ahead-of-time `--topology` compile where libtpu is not installed. Blocks marked `console` or `text` are output, not
commands. A file a page includes (`--8<--`, e.g. a section of tpu/README.md in docs/tpu.md) has its commands run
with the page's. Not run a second time: a page whose commands only repeat another's (`REPEATS`), and an experiment
whose docstring commands a page runs the equivalents of, in order (training on the same config file; another
command on the same workdir: `run_by_docs`).
"""

import ast
import glob
import importlib
import importlib.util
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT

TRAIN_STEPS = "--config.train.steps=10"
BENCH_STEPS = "5"
FAILURE_LINES = re.compile(r"E0000|ERROR|Traceback|Source Location Trace")
README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))]
MAX_README_LINES = 300


def not_run(words: list[str]) -> str | None:
  """Why a documented command is not run here, or None to run it."""
  if words == ["make", "test"]:
    return "the test suite itself"
  if words[0].startswith("tpu/"):
    return "a Cloud TPU script: tests/test_tpu_scripts.py runs it against a fake gcloud"
  if "--topology" in words and importlib.util.find_spec("libtpu") is None:
    return "an ahead-of-time TPU compile needs libtpu (pip install 'jaxmodels[tpu]')"
  return None


def included(text: str) -> str:
  """`text` with each snippet line (`--8<-- "path"` or `--8<-- "path:section"`, paths from the repository root)
  replaced by what it includes, as pymdownx.snippets does when the site is built: the whole file, or the lines
  between its `[start:section]` and `[end:section]` markers."""
  def expand(match):
    path, _, section = match.group(1).partition(":")
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      body = f.read()
    if section:
      found = re.search(rf"^[^\n]*--8<-- \[start:{section}\][^\n]*\n(.*?)^[^\n]*--8<-- \[end:{section}\]", body,
                        flags=re.MULTILINE | re.DOTALL)
      assert found, f"{path} has no section {section}"
      body = found.group(1)
    return body
  return re.sub(r'^--8<-- "([^"]+)"$', expand, text, flags=re.MULTILINE)


def page_commands(path: str) -> list[str]:
  """Commands of the ```sh blocks: continuation lines joined, comments dropped, python blocks as `python -c`."""
  with open(path, encoding="utf-8") as f:
    text = included(f.read())
  commands = []
  for lang, body in re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, flags=re.DOTALL | re.MULTILINE):
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


def with_flag(words: list[str], flag: str, value: str) -> list[str]:
  """`words` with `flag`'s value set to `value`: replaced where given, appended where not."""
  if flag in words:
    i = words.index(flag) + 1
    return [*words[:i], value, *words[i + 1:]]
  return [*words, flag, value]


def shortened(words: list[str]) -> list[str]:
  """The documented shortening: fewer steps for training and timing, one repeat and fewer sweep values for bench
  compile."""
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
  if words[:2] == ["jaxmodels", "bench"] and "step" in words:
    return with_flag(words, "--steps", BENCH_STEPS)
  if words[0] == "python" and words[1].startswith("benchmarks/"):
    return with_flag(with_flag(words, "--steps", BENCH_STEPS), "--repeats", "1")
  trains = ((words[0] == "python" and re.fullmatch(r"experiments/[^/]+\.py", words[1]))  # not experiments/hf/'s tools
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
  raise AssertionError(f"no rule to run {shlex.join(words)!r}: add one to tests/test_docs.py")


def child_cpu_s() -> float:
  """CPU seconds used by the commands run so far: their cost, whatever else loads the machine (`pytest -s` prints
  each command's)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_all(commands: list[str], workdir) -> None:
  for name in ("experiments", "benchmarks"):
    os.symlink(os.path.join(ROOT, name), workdir / name)
  (workdir / "docs").mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = ROOT
  venv = sys.prefix
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    for command in commands:
      words = shlex.split(command)
      if reason := not_run(words):
        print(f"not run ({reason}): {command}")
        continue
      words = shortened(words)
      start, cpu = time.perf_counter(), child_cpu_s()
      r = subprocess.run(argv(words, venv), env=env, capture_output=True, text=True, timeout=600, check=False)
      print(f"{time.perf_counter() - start:6.1f} s, {child_cpu_s() - cpu:6.1f} s of CPU  {command[:120]}")
      output = r.stdout + r.stderr
      assert r.returncode == 0, f"{command}\nexited {r.returncode}:\n{output[-3000:]}"
      bad = [line for line in output.splitlines() if FAILURE_LINES.search(line)]
      assert not bad, f"{command}\nprinted lines that read as failures:\n" + "\n".join(bad[:10])
  finally:
    os.chdir(cwd)


def name(path: str) -> str:
  return os.path.relpath(path, ROOT)


def test_extraction_finds_the_commands():
  commands = page_commands(README)
  assert "make train" in commands and any(c.startswith("python -c") for c in commands)
  assert any(c.startswith("jaxmodels bench compile") and "--sweep" in c for c in commands)
  docs = [c for p in PAGES for c in page_commands(p)]
  assert any(c.startswith("jaxmodels sample") for c in docs)
  assert any(c.startswith("tpu/create.sh") for c in page_commands(os.path.join(ROOT, "docs", "tpu.md")))  # included
  assert docstring_commands(os.path.join(ROOT, "experiments", "text_lstm.py"))[1].startswith("jaxmodels sample")
  assert shortened(["python", "experiments/x.py"])[-1] == TRAIN_STEPS
  assert shortened(["python", "experiments/hf/x.py"]) == ["python", "experiments/hf/x.py"]
  assert shortened(shlex.split("jaxmodels bench compile --sweep a.b=1,2,4 --sweep c=x,y --repeat 3")) == shlex.split(
      "jaxmodels bench compile --sweep a.b=1,2 --sweep c=x --repeat 1")
  assert shortened(shlex.split("jaxmodels bench step --config x.py --steps 50 --loop")) == shlex.split(
      "jaxmodels bench step --config x.py --steps 5 --loop")
  assert shortened(shlex.split("python benchmarks/x.py")) == shlex.split("python benchmarks/x.py --steps 5 --repeats 1")


def test_readme_is_a_front_door():
  with open(README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move the detail into docs/"
  for page in PAGES[1:]:
    if os.path.dirname(page) == os.path.join(ROOT, "docs") and not page.endswith("index.md"):
      assert f"(docs/{os.path.basename(page)})" in "\n".join(lines), f"README.md does not link {name(page)}"


# Pages whose commands only repeat another page's, in the same order: that page's test runs them.
REPEATS = {"docs/benchmarking.md": "README.md"}
RUN = [p for p in PAGES if page_commands(p) and name(p) not in REPEATS]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN, ids=name)
def test_page_commands_run_as_written(page, tmp_path):
  run_all(page_commands(page), tmp_path)


def test_pages_with_commands():
  """The pages whose commands run; the others hold none (a page added with commands is run without a change here),
  or only repeat another's."""
  assert [name(p) for p in RUN] == [
      "README.md", "docs/benchmarks.md", "docs/checkpoints.md", "docs/compression.md", "docs/data-in-a-bucket.md",
      "docs/data.md", "docs/experiments.md", "docs/finetuning.md", "docs/library.md", "docs/models.md", "docs/tpu.md"]
  for page, other in REPEATS.items():
    commands, others = page_commands(os.path.join(ROOT, page)), iter(page_commands(os.path.join(ROOT, other)))
    assert commands and all(c in others for c in commands), f"{page} runs what {other} does not"


def equivalence(command: str) -> tuple:
  """What a command does, for matching a docstring's commands with a page's: training (as a script or with
  `jaxmodels train`) is its config file, whatever the workdir and overrides; another command is its name and
  workdir, whatever its other flags."""
  words = shlex.split(command)
  if words[0] == "python" and words[1].startswith("experiments/"):
    return ("train", words[1])
  name_ = words[1]
  flag = "--config" if name_ == "train" else "--workdir"
  return (name_, words[words.index(flag) + 1] if flag in words else None)


def run_by_docs(path: str) -> bool:
  """Whether one page runs an equivalent of every docstring command of `path`, in the same order: that page's test
  then runs what the docstring's would."""
  wanted = [equivalence(c) for c in docstring_commands(path)]
  for page in RUN:
    ran = [equivalence(c) for c in page_commands(page)
           if c.split()[0] in ("python", "jaxmodels") and not c.startswith("python -c") and not_run(shlex.split(c))
           is None]
    found = [i for w in wanted for i in [next((i for i, r in enumerate(ran) if r == w), None)] if i is not None]
    if len(found) == len(wanted) and found == sorted(found):
      return True
  return False


EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not run_by_docs(p)], ids=os.path.basename)
def test_experiment_docstring_commands_run_as_written(path, tmp_path):
  commands = docstring_commands(path)
  assert commands, f"{path}: the docstring gives no command"
  run_all(commands, tmp_path)


def test_docstring_commands_the_docs_run():
  """The experiments whose docstring commands are not run on their own: a page runs their equivalents."""
  assert [os.path.basename(p) for p in EXPERIMENTS if run_by_docs(p)] == ["digits_cnn.py", "digits_mixer.py",
                                                                        "digits_mlp.py", "finetune_lora.py",
                                                                        "text_transformer.py"]
  assert equivalence("python experiments/a.py --workdir x") == equivalence("jaxmodels train --config experiments/a.py")
  assert equivalence("jaxmodels sample --workdir runs/a --length 2") != equivalence("jaxmodels sample --workdir runs/b")


def expected_sentence(path: str) -> str:
  """The docstring's `Expected: ...` sentence(s), whitespace collapsed."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  match = re.search(r"Expected: (.*?)(?:\n\n|$)", doc, flags=re.DOTALL)
  assert match, f"{path}: the docstring states no `Expected:` result"
  return " ".join(match.group(1).split())


def test_docs_expected_results_are_the_docstrings():
  """The experiment table of docs/experiments.md repeats each docstring's measured result word for word: one
  source."""
  with open(os.path.join(ROOT, "docs", "experiments.md"), encoding="utf-8") as f:
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `experiments/(\w+)\.py`[^|]*\|[^|]*\|(.*)\|$",
                                                                 f.read(), flags=re.MULTILINE)}
  for path in EXPERIMENTS:
    name_ = os.path.splitext(os.path.basename(path))[0]
    assert name_ in rows, f"docs/experiments.md's experiment table has no row for {name_}"
    assert rows[name_] == expected_sentence(path), f"docs/experiments.md's expected result for {name_} differs"


def resolves(dotted: str) -> bool:
  """Whether `jaxmodels.a.b.c` names a module or an attribute of one."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for part in parts[i:]:
        obj = getattr(obj, part)
    except AttributeError:
      return False
    return True
  return False


# Repository paths the pages name (`jaxmodels/runtime/host.py`, `tests/test_bench.py::test_x`); placeholders such
# as `experiments/X.py` and globs are not paths.
REPO_PATH = re.compile(r"(?<![\w/.-])((?:jaxmodels|tests|benchmarks|experiments|tpu)/[\w/.-]*\.(?:py|sh|md))"
                       r"(?:::(\w+))?")


def test_named_modules_and_files_exist():
  """Every `jaxmodels.x.y` a page names resolves, and every repository file it names exists (with the test it
  names): the docs state only what is there."""
  missing = []
  for page in PAGES:
    with open(page, encoding="utf-8") as f:
      text = included(f.read())
    for dotted in sorted(set(re.findall(r"\bjaxmodels(?:\.[A-Za-z_]\w*)+", text))):
      if not dotted.endswith(".md") and not resolves(dotted):  # a link to api/jaxmodels.md is no module
        missing.append(f"{name(page)}: {dotted}")
    for path, test in sorted(set(REPO_PATH.findall(text))):
      if re.search(r"/[A-Z]\.py$", path):
        continue
      if not os.path.exists(os.path.join(ROOT, path)):
        missing.append(f"{name(page)}: {path}")
      elif test:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
          if not re.search(rf"^def {test}\(", f.read(), flags=re.MULTILINE):
            missing.append(f"{name(page)}: {path}::{test}")
  assert not missing, "the docs name what does not exist:\n" + "\n".join(missing)


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
  """`mkdocs build --strict`: no broken link or anchor, no page left out of the nav, every API page's docstrings
  render (mkdocstrings)."""
  mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
  if mkdocs is None or importlib.util.find_spec("mkdocstrings") is None:
    pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
  env = {**os.environ, "PYTHONPATH": ROOT, "NO_MKDOCS_2_WARNING": "1"}
  r = subprocess.run([mkdocs, "build", "--strict", "--config-file", os.path.join(ROOT, "mkdocs.yml"),
                      "--site-dir", str(tmp_path / "site")], env=env, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert (tmp_path / "site" / "api" / "models" / "index.html").exists()
