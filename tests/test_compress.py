"""Quantization (qwix) and `jaxmodels compress`: PTQ of a trained run keeps its accuracy and shrinks its weights,
the compressed export loads, evaluates and samples; one-shot pruning exports exact zeros; quantization-aware training
trains and resumes; bad input is one line."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import experiment, read_metrics
from jaxmodels import cli
from jaxmodels import quantization


@pytest.fixture(scope="module")
def cnn_int8(digits_cnn_run, tmp_path_factory):
  """The session's trained digits_cnn run compressed by `jaxmodels compress --method ptq --bits 8`."""
  workdir = digits_cnn_run[0]
  out = str(tmp_path_factory.mktemp("compress") / "cnn-int8")
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, "--method", "ptq", "--bits", "8", "--out", out]) == 0
  return workdir, out


def test_ptq_int8_keeps_accuracy_and_shrinks_the_weights_on_disk(cnn_int8):
  _, out = cnn_int8
  with open(os.path.join(out, "compression.json"), encoding="utf-8") as f:
    report = json.load(f)
  before, after = report["before"], report["after"]
  assert after["accuracy"] >= before["accuracy"] - 0.01
  assert before["array_bytes"] >= 3 * after["array_bytes"]  # the parameter arrays as stored
  assert before["bytes"] >= 2.5 * after["bytes"]  # every file of the export, Orbax's metadata included
  assert after["parameters"] == before["parameters"] and after["inference_ms"] > 0
  import jaxmodels  # pylint: disable=import-outside-toplevel
  params = jaxmodels.load_params(out)
  # Every conv and dense kernel is stored as int8 values with one float32 scale per output channel.
  for kernel in [c["kernel"] for c in params["convs"].values()] + [params["out"]["kernel"]]:
    q = kernel["array"]
    assert q["qvalue"].dtype == jnp.int8 and q["scale"].dtype == jnp.float32
    assert q["scale"].shape == (1,) * (q["qvalue"].ndim - 1) + q["qvalue"].shape[-1:]


def test_the_compressed_export_loads_and_evaluates(cnn_int8, capsys):
  _, out = cnn_int8
  with open(os.path.join(out, "compression.json"), encoding="utf-8") as f:
    after = json.load(f)["after"]
  import jaxmodels  # pylint: disable=import-outside-toplevel
  model = jaxmodels.load_model(out)
  assert isinstance(nnx.state(model, nnx.Param)["out"]["kernel"]["array"]["qvalue"].get_value(), jax.Array)
  assert cli.main(["jaxmodels", "eval", "--workdir", out]) == 0
  assert f"accuracy={after['accuracy']:.4f}" in capsys.readouterr().out


def test_prune_exports_exact_zeros_that_load_and_evaluate(digits_cnn_run, tmp_path, capsys):
  """`compress --method prune --sparsity 0.9` (scope layer, the default): each kernel of the export is exactly 90%
  zeros, its largest weights kept as they were; biases and BatchNorm are untouched; the export evaluates."""
  workdir, out = digits_cnn_run[0], str(tmp_path / "cnn-90")
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, "--method", "prune", "--sparsity", "0.9",
                   "--out", out]) == 0
  with open(os.path.join(out, "compression.json"), encoding="utf-8") as f:
    report = json.load(f)
  import jaxmodels  # pylint: disable=import-outside-toplevel
  from jaxmodels.export import load_run_model  # pylint: disable=import-outside-toplevel
  before = nnx.to_pure_dict(nnx.state(load_run_model(workdir), nnx.Param))
  after = dict(jax.tree_util.tree_flatten_with_path(jaxmodels.load_params(out))[0])
  pruned = 0
  for path, b in jax.tree_util.tree_flatten_with_path(before)[0]:
    a, b = np.asarray(after[path]), np.asarray(b)
    if path[-1].key == "kernel":
      zeros = int(np.floor(np.float32(0.9) * b.size))
      assert np.sum(a == 0) == zeros and np.array_equal(a[a != 0], b[a != 0])
      assert np.abs(b[a == 0]).max() <= np.abs(a[a != 0]).min()  # the smallest went
      pruned += zeros
    else:
      assert np.array_equal(a, b), jax.tree_util.keystr(path)
  assert report["options"] == {"sparsity": 0.9, "pattern": "unstructured", "scope": "layer"}
  assert report["after"]["nonzero_parameters"] == report["before"]["nonzero_parameters"] - pruned
  assert report["after"]["bytes"] < report["before"]["bytes"]
  capsys.readouterr()
  assert cli.main(["jaxmodels", "eval", "--workdir", out]) == 0
  assert f"accuracy={report['after']['accuracy']:.4f}" in capsys.readouterr().out


def test_qat_language_model_trains_resumes_compresses_and_samples(tmp_path, capsys):
  """A tiny LSTM LM trained quantization-aware (int8) learns, resumes, and its PTQ export samples."""
  from jaxmodels.train import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config = experiment("text_lstm")
  config.model.update(num_layers=1, hidden_size=32)
  config.train.update(steps=20, log_every=10, eval_every=100, warmup_steps=2)
  config.data.eval_windows = 8
  config.checkpoint.every = 10
  config.train.quantization.bits = 8
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  losses = [r["loss"] for r in read_metrics(workdir) if r.get("split") == "train"]
  assert losses[-1] < losses[0] - 0.1  # 4.55 -> 4.30 nats in 20 steps
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))  # resume from step 10
  train_and_evaluate(config, workdir)
  resumed = [r["loss"] for r in read_metrics(workdir) if r.get("split") == "train"]
  assert resumed[-1] == pytest.approx(losses[-1], rel=1e-5)
  out = str(tmp_path / "int8")
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, "--method", "ptq", "--out", out]) == 0
  capsys.readouterr()
  assert cli.main(["jaxmodels", "sample", "--workdir", out, "--prompt", "def ", "--length", "8",
                   "--temperature", "0"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("def ") and len(printed.rstrip("\n")) >= 4 + 1


def test_qat_forward_computes_on_quantized_weights():
  """The QAT model's forward is the float model's with its weights rounded to int8: close, not equal."""
  from jaxmodels.models import MLP  # pylint: disable=import-outside-toplevel
  model = MLP((16,), 10, hidden_sizes=(32,), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
  qat = quantization.qat(model, 8, False, "embed", quantization.sample_input((16,), "classify"))
  y, y_qat = np.asarray(model(x)), np.asarray(qat(x))
  assert not np.array_equal(y, y_qat) and np.allclose(y, y_qat, atol=0.05)


@pytest.mark.parametrize("family", ["transformer", "vit"])
def test_qat_is_refused_where_qwix_fails(family):
  from jaxmodels.config import default_config, validate  # pylint: disable=import-outside-toplevel
  from jaxmodels.errors import UserError  # pylint: disable=import-outside-toplevel
  c = default_config()
  c.model.family, c.train.quantization.bits = family, 8
  if family == "transformer":
    c.data.source = "text"
  with pytest.raises(UserError, match=f"model.family={family}: qwix's quantized training fails"):
    validate(c)


@pytest.mark.parametrize("flags, message", [
    (["--method", "svd"], "argument --method: invalid choice: 'svd'"),
    (["--method", "prune"], "--method prune needs --sparsity S"),
    (["--method", "prune", "--sparsity", "1"], "--sparsity 1.0: expected a number in (0, 1)"),
    (["--method", "prune", "--pattern", "4:2"], "--pattern='4:2': expected unstructured or N:M with 0 < N < M"),
    (["--method", "prune", "--pattern", "2:4", "--sparsity", "0.9"], "--sparsity=0.9 with pattern 2:4: expected 0.5"),
    (["--method", "prune", "--pattern", "2:4", "--scope", "global"], "--scope=global ranks weights across tensors"),
    (["--method", "ptq", "--sparsity", "0.5"], "--sparsity is an option of --method prune, not of --method ptq"),
    (["--method", "prune", "--sparsity", "0.5", "--bits", "8"], "--bits is an option of --method ptq"),
    (["--method", "ptq", "--bits", "2"], "--bits 2: qwix quantizes to 4 or 8 bits"),
    (["--method", "ptq", "--bits", "4", "--activations"], "XLA's CPU backend cannot multiply int4 operands"),
    (["--method", "prune", "--sparsity", "0.5", "OUT_EXISTS"], "already exists and is not an empty directory"),
    (["--method", "ptq", "NO_CHECKPOINT"], "has no checkpoint"),
])
def test_bad_compress_input_is_one_line_and_writes_nothing(digits_cnn_run, tmp_path, capsys, flags, message):
  workdir, out, existed = digits_cnn_run[0], str(tmp_path / "out"), "OUT_EXISTS" in flags
  if existed:
    os.makedirs(out)
    open(os.path.join(out, "keep"), "w", encoding="utf-8").close()
  if "NO_CHECKPOINT" in flags:
    workdir = str(tmp_path / "untrained")
    os.makedirs(workdir)
    for name in ("config.json", "model.json"):
      shutil.copy(os.path.join(digits_cnn_run[0], name), workdir)
  flags = [f for f in flags if f not in ("OUT_EXISTS", "NO_CHECKPOINT")]
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, *flags, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxmodels: error: ") and message in err and err.count("\n") == 1
  assert os.listdir(out) == ["keep"] if existed else not os.path.exists(out)
