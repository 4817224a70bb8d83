"""Your own module as `model.family=package.module:ClassName`: trained, resumed, evaluated, exported, compressed and
loaded through the command line; refused in one line before anything is written when it breaks the protocol."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import pytest
from conftest import ROOT, read_metrics
from flax import nnx

from jaxmodels import cli
from jaxmodels.config import apply_overrides, default_config, load_experiment, set_family, validate
from jaxmodels.models import build_model, flops
from jaxmodels.runtime.errors import UserError

MIXER = '''
import dataclasses

import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class MixerConfig:
  patch: int = 2
  hidden: int = 16
  depth: int = 2
  token_mlp: int = 8
  channel_mlp: int = 32
  dropout: float = 0.0  # a key of the built-in families too, at its default
  heads: int | None = None  # unused: a None default of an optional int
  mixing: str = "mean"  # a string key

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f"depth={self.depth}: expected a positive integer")


class Block(nnx.Module):
  def __init__(self, tokens, c, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1, self.norm2 = nnx.LayerNorm(c.hidden, **kw), nnx.LayerNorm(c.hidden, **kw)
    self.token1, self.token2 = nnx.Linear(tokens, c.token_mlp, **kw), nnx.Linear(c.token_mlp, tokens, **kw)
    self.channel1, self.channel2 = nnx.Linear(c.hidden, c.channel_mlp, **kw), nnx.Linear(c.channel_mlp, c.hidden, **kw)

  def __call__(self, x_BPD):
    y_BDP = self.norm1(x_BPD).swapaxes(1, 2)
    x_BPD = x_BPD + self.token2(nnx.gelu(self.token1(y_BDP))).swapaxes(1, 2)
    return x_BPD + self.channel2(nnx.gelu(self.channel1(self.norm2(x_BPD))))


class Mixer(nnx.Module):
  Config = MixerConfig
  tasks = ("classify",)

  def __init__(self, input_shape, num_outputs, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    h, w, channels = input_shape
    p, kw = config.patch, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Conv(channels, config.hidden, (p, p), strides=(p, p), padding="VALID", **kw)
    self.blocks = nnx.List([Block((h // p) * (w // p), config, **kw) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.hidden, **kw)
    self.head = nnx.Linear(config.hidden, num_outputs, **kw)
    self.dropout = nnx.Dropout(config.dropout)

  def __call__(self, x, *, train=False, rngs=None):
    x_BPD = self.embed(x)
    x_BPD = x_BPD.reshape(x_BPD.shape[0], -1, x_BPD.shape[-1])
    for block in self.blocks:
      x_BPD = block(x_BPD)
    return self.head(self.dropout(self.norm(x_BPD).mean(1), deterministic=not train, rngs=rngs))


@dataclasses.dataclass(frozen=True)
class PooledConfig(MixerConfig):
  pool: str = "mean"  # also the CNN's key model.pool, whose default is max


class Pooled(Mixer):
  Config = PooledConfig


class NoConfig(nnx.Module):
  def __init__(self, input_shape, num_outputs, config, *, dtype, param_dtype, rngs):
    pass
'''

EXPERIMENT = '''
from jaxmodels.config import default_config, set_family


def get_config():
  c = default_config()
  set_family(c, "mixer_module:Mixer")
  c.model.hidden = 24
  c.train.steps = 4
  c.train.batch_size = 32
  c.train.log_every = 2
  c.train.eval_every = 100
  c.checkpoint.every = 2
  return c
'''


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
  """tmp_path holding mixer_module.py and exp.py, importable in this process and in subprocesses."""
  (tmp_path / "mixer_module.py").write_text(MIXER)
  (tmp_path / "exp.py").write_text(EXPERIMENT)
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def run(args, cwd, **kw):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(cwd)])}
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False, **kw)


def test_custom_module_trains_resumes_evaluates_exports_compresses_and_loads(module_dir):
  workdir, train = module_dir / "run", [sys.executable, "-m", "jaxmodels", "train", "--config", "exp.py"]
  r = run([*train, f"--workdir={workdir}", "--config.model.depth=1"], module_dir)
  assert r.returncode == 0, r.stderr
  assert "defines no flops_per_example(input_shape): MFU counts 6 x parameters x examples" in r.stdout
  saved = json.loads((workdir / "config.json").read_text())["model"]
  assert (saved["family"], saved["depth"], saved["hidden"], saved["patch"]) == ("mixer_module:Mixer", 1, 24, 2)
  r = run([*train, f"--workdir={workdir}", "--config.model.depth=1", "--config.train.steps=6"], module_dir)
  assert r.returncode == 0, r.stderr
  assert "resumed" in r.stdout.lower() or "training steps 4..6" in r.stdout
  assert [m["step"] for m in read_metrics(workdir) if m["split"] == "train"][-1] == 6
  # A fresh process reads the saved config back: eval, export, compress, then load_model of both outputs.
  script = textwrap.dedent(f"""
      import jax.numpy as jnp
      import jaxmodels
      from jaxmodels import cli
      for args in (["eval", "--workdir", {str(workdir)!r}], ["export", "--workdir", {str(workdir)!r}, "--out", "exp"],
                   ["compress", "--workdir", {str(workdir)!r}, "--method", "prune", "--sparsity", "0.5", "--out",
                    "pruned"]):
        assert cli.main(["jaxmodels", *args]) == 0, args
      for path in ("exp", "pruned"):
        model = jaxmodels.load_model(path)
        print(path, type(model).__name__, len(model.blocks), model(jnp.ones((2, 8, 8, 1))).shape)
      """)
  r = run([sys.executable, "-c", script], module_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "exp Mixer 1 (2, 10)" in r.stdout and "pruned Mixer 1 (2, 10)" in r.stdout
  assert any(name.startswith("eval_6") for name in os.listdir(workdir))


@pytest.mark.parametrize("family, message", [
    ("no_such_module:Mixer", "model.family='no_such_module:Mixer': cannot import no_such_module "
                             "(ModuleNotFoundError: No module named 'no_such_module')"),
    ("mixer_module:Missing", "model.family='mixer_module:Missing': mixer_module has no attribute Missing"),
    ("mixer_module:NoConfig", "model.family='mixer_module:NoConfig': mixer_module:NoConfig has no Config class "
                              "attribute that is a frozen dataclass"),
    ("mixer_module:Pooled", "model.family=mixer_module:Pooled: its Config field pool='mean' is also the key "
                            "model.pool of the built-in families, whose default is 'max'"),
    ("mixer_module:MixerConfig", "model.family='mixer_module:MixerConfig': mixer_module:MixerConfig is not an "
                                 "nnx.Module class"),
])
def test_a_family_that_breaks_the_protocol_is_one_line_and_writes_nothing(module_dir, capsys, family, message):
  workdir = module_dir / "run"
  code = cli.main(["jaxmodels", "train", "--config", str(module_dir / "exp.py"), f"--workdir={workdir}",
                   f"--config.model.family={family}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
  assert not workdir.exists()


def test_module_keys_are_typed_overridable_validated_and_only_for_that_family(module_dir):
  c = load_experiment(str(module_dir / "exp.py"), ["--config.model.heads=none", "--config.model.mixing=none"])
  assert (c.model.hidden, c.model.depth, c.model.heads, c.model.mixing) == (24, 2, None, "none")
  c = apply_overrides(c, ["--config.model.heads=3"])
  assert c.model.heads == 3 and c.is_locked
  validate(c)
  model = build_model(c.model, (8, 8, 1), 10, rngs=nnx.Rngs(0))
  assert type(model).__name__ == "Mixer" and len(model.blocks) == 2
  with pytest.raises(UserError, match=r"^model.depth=0: expected a positive integer$"):
    validate(apply_overrides(c, ["--config.model.depth=0"]))
  with pytest.raises(UserError, match="model.d_model=64 does not apply to model.family=mixer_module:Mixer"):
    validate(apply_overrides(c, ["--config.model.d_model=64"]))
  with pytest.raises(UserError, match='model.hiden is not a key of the config.*Did you mean "hidden"'):
    apply_overrides(c, ["--config.model.hiden=3"])
  # The family set on the command line brings its keys, which later overrides set.
  d = apply_overrides(default_config(), ["--config.model.hidden=8", "--config.model.family=mixer_module:Mixer"])
  assert (d.model.family, d.model.hidden, d.model.patch) == ("mixer_module:Mixer", 8, 2)
  with pytest.raises(UserError, match=r"model.family=.mixer_module:Mixer. is not a language model.*"
                                      r"its .tasks. attribute \(tasks = \('lm',\)"):
    set_family(e := default_config(), "mixer_module:Mixer")
    e.data.source = "text"
    validate(e)


def test_mfu_counts_flops_per_example_where_the_module_defines_it(module_dir):
  c = load_experiment(os.path.join(ROOT, "experiments", "digits_mixer.py"))
  dataset = types.SimpleNamespace(task="classify", input_shape=(8, 8, 1), num_outputs=10)
  model = nnx.eval_shape(lambda: build_model(c.model, (8, 8, 1), 10, rngs=nnx.Rngs(0)))
  notices = []
  per_step = flops.model_flops_per_step(c, dataset, model, notices)
  assert per_step == c.train.batch_size * model.flops_per_example((8, 8, 1)) and not notices
  c = apply_overrides(c, ["--config.model.family=mixer_module:Mixer"])  # the same blocks, no flops_per_example
  model = nnx.eval_shape(lambda: build_model(c.model, (8, 8, 1), 10, rngs=nnx.Rngs(0)))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.model_flops_per_step(c, dataset, model, notices) == 6.0 * params * c.train.batch_size
  assert notices == ["model.family=mixer_module:Mixer defines no flops_per_example(input_shape): MFU counts 6 x "
                     "parameters x examples per step"]
