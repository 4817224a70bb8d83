"""The configuration as research code and experiment files meet it: a locked `default_config()`, and errors in an
experiment file reported in one line naming the file and line."""

import pytest

from jaxmodels import cli
from jaxmodels.config import default_config, load_experiment, text_lm_config
from jaxmodels.runtime.errors import UserError


@pytest.mark.parametrize("make", [default_config, text_lm_config])
def test_default_config_is_locked_against_misspelled_keys(make):
  c = make()
  with pytest.raises(AttributeError, match='Did you mean "learning_rate"'):
    c.train.learnig_rate = 1.0
  c.train.learning_rate = 0.5  # a key it has
  with c.unlocked():  # code that adds keys of its own says so
    c.train.my_key = 1
  assert c.train.learning_rate == 0.5 and c.train.my_key == 1 and c.is_locked


def write(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text("from jaxmodels.config import default_config\n\n\ndef get_config():\n  c = default_config()\n"
                  + body + "  return c\n")
  return str(path)


@pytest.mark.parametrize("body, message", [
    ("  c.train.steps = 5\n  c.train.stepz = 10\n",
     r"exp.py:7 \(c.train.stepz = 10\): 'stepz' is not a key of the config \(default_config\(\) has every key\)\. "
     r'Did you mean "steps" instead of "stepz"\?$'),
    ("  c.train.steps = (\n", r"exp.py:6: SyntaxError: '\(' was never closed$"),
    ("  c.train.steps = 1 / 0\n", r"exp.py:6: ZeroDivisionError: division by zero$"),
    ("  c.train.steps = 'ten'\n", r"exp.py:6: TypeError: Could not override field 'steps'"),
    ("  import no_such_package\n", r"exp.py:6: ModuleNotFoundError: No module named 'no_such_package'$"),
])
def test_errors_in_an_experiment_file_are_one_line_naming_file_and_line(tmp_path, capsys, body, message):
  path = write(tmp_path, body)
  with pytest.raises(UserError, match=message) as e:
    load_experiment(path)
  assert str(e.value).startswith(path) and "\n" not in str(e.value)
  workdir = tmp_path / "run"
  assert cli.main(["jaxmodels", "train", "--config", path, f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"jaxmodels: error: {path}:"), err
  assert not workdir.exists()


def test_get_config_returning_no_config_is_one_line(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config():\n  return 5\n")
  with pytest.raises(UserError, match=r"exp.py: get_config\(\) returned int: expected the ConfigDict"):
    load_experiment(str(path))
