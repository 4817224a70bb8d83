"""Quantization (qwix) and `jaxmodels compress`: PTQ of a trained run keeps its accuracy and shrinks its weights,
the compressed export loads, evaluates and samples; one-shot pruning exports exact zeros; quantization-aware training
rounds every dense and conv weight of every family (traced on abstract models), and a tiny Transformer LM trains
under it, resumes, exports, evaluates and samples; bad input is one line."""

import collections
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import experiment, read_metrics
from flax import nnx

from jaxmodels import cli
from jaxmodels.compress import quantization
from jaxmodels.runtime.errors import UserError


@pytest.fixture(scope="module", params=[[], ["--activations"]], ids=["weights", "static-inputs"])
def cnn_int8(digits_cnn_run, tmp_path_factory, request):
  """The session's trained digits_cnn run compressed by `jaxmodels compress --method ptq --bits 8`, weights only
  or with every input quantized by a static scale calibrated on 8 training batches."""
  workdir = digits_cnn_run[0]
  out = str(tmp_path_factory.mktemp("compress") / "cnn-int8")
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, "--method", "ptq", "--bits", "8", *request.param,
                   "--out", out]) == 0
  return workdir, out


def test_ptq_int8_keeps_accuracy_and_shrinks_the_weights_on_disk(cnn_int8):
  _, out = cnn_int8
  with open(os.path.join(out, "compression.json"), encoding="utf-8") as f:
    report = json.load(f)
  before, after = report["before"], report["after"]
  static = report["options"]["activations"] == "static"
  assert after["accuracy"] >= before["accuracy"] - 0.01
  assert before["array_bytes"] >= 3 * after["array_bytes"]  # the parameter arrays as stored
  # Every file of the export, Orbax's metadata included: the static inputs' four scales add their own (2.6 kB more
  # in _METADATA, _sharding and array_metadatas here); one CI run stored 85,613 B against 212,928 B (2.49x).
  assert before["bytes"] >= (2.3 if static else 2.5) * after["bytes"]
  assert after["parameters"] == before["parameters"] and after["inference_ms"] > 0
  import jaxmodels  # pylint: disable=import-outside-toplevel
  params = jaxmodels.load_params(out)
  # Every conv and dense kernel is stored as int8 values with one float32 scale per output channel; with static
  # inputs each layer also holds its input's one scale.
  for layer in [*params["convs"].values(), *params["head"].values(), params["out"]]:
    q = layer["kernel"]["array"]
    assert q["qvalue"].dtype == jnp.int8 and q["scale"].dtype == jnp.float32
    assert q["scale"].shape == (1,) * (q["qvalue"].ndim - 1) + q["qvalue"].shape[-1:]
    inputs = [v["array"] for k, v in layer.items() if k.endswith("_lhs_scale")]
    assert [(a.shape, a.dtype) for a in inputs] == ([((1,) * q["qvalue"].ndim, jnp.float32)] if static else [])
    assert not static or float(inputs[0].reshape(())) > 0
  assert report["options"].get("calibration_batches") == (8 if static else None)


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
  from jaxmodels.runs.export import load_run_model  # pylint: disable=import-outside-toplevel
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


def op_shapes(jaxpr, name: str = "round") -> list[tuple]:
  """The first operand's shape of every `name` op in a jaxpr and the jaxprs inside it (a scan body once)."""
  from jax.extend.core import jaxprs_in_params  # pylint: disable=import-outside-toplevel
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn.invars[0].aval.shape)
    for sub in jaxprs_in_params(eqn.params):
      found += op_shapes(sub, name)
  return found


def linear_and_conv_kernels(model) -> tuple[list[tuple], int]:
  """(each nnx.Linear kernel's per-layer shape, the number of nnx.Conv modules) outside the embeddings."""
  modules = [m for _, m in nnx.iter_modules(model)]
  return ([m.kernel.shape[-2:] for m in modules if isinstance(m, nnx.Linear)],
          sum(isinstance(m, nnx.Conv) for m in modules))


def assert_every_weight_quantized(jaxpr, model, passes=1, activations=False):
  """Each Linear kernel is rounded `passes` times (2: recomputed under remat) and with `activations` its input too;
  each Conv rounds its kernel and its input; nothing else is rounded (attention's einsums stay float)."""
  kernels, convs = linear_and_conv_kernels(model)
  found = collections.Counter(op_shapes(jaxpr))
  assert kernels and not collections.Counter({s: passes * n for s, n in collections.Counter(kernels).items()}) - found
  assert sum(found.values()) == passes * (len(kernels) * (1 + activations) + 2 * convs)


# name, input shape, outputs, task, config overrides. The LM's and the encoder-decoder's token rows (batch 2 x 8)
# number d_model = 16: their square projections' inputs have the kernel's shape.
FAMILIES = [("text_transformer", (8,), 50, "lm", dict(d_model=16, num_heads=2, d_ff=32, num_layers=2)),
            ("text_transformer", (8,), 50, "lm", dict(d_model=16, num_heads=2, d_ff=32, scan_layers=False)),
            ("reverse_seq2seq", (8,), 16, "seq2seq", dict(d_model=16, num_heads=2, d_ff=32, num_layers=1)),
            ("digits_vit", (8, 8, 1), 10, "classify", {}), ("digits_transformer", (8, 8, 1), 10, "classify", {}),
            ("digits_cnn", (8, 8, 1), 10, "classify", {}), ("digits_resnet", (8, 8, 1), 10, "classify", {}),
            ("digits_mlp", (8, 8, 1), 10, "classify", {}), ("digits_lstm", (8, 8, 1), 10, "classify", {}),
            ("text_lstm", (8,), 50, "lm", dict(cell="gru", hidden_size=16))]


@pytest.mark.parametrize("name, shape, outputs, task, overrides", FAMILIES)
def test_qat_rounds_every_linear_and_conv_weight_of_every_family(name, shape, outputs, task, overrides):
  """Traced on abstract values (nothing computed or compiled): the forward pass rounds each projection's weight to
  int8, whatever the input's shape."""
  from jaxmodels.models import build_model  # pylint: disable=import-outside-toplevel
  config = experiment(name)
  config.model.update(**overrides)
  model = nnx.eval_shape(lambda: build_model(config.model, shape, outputs, nnx.Rngs(0), task=task))
  x = jax.ShapeDtypeStruct((2, *shape), jnp.int32 if task in ("lm", "seq2seq") else jnp.float32)
  for activations in (False, True) if name == "text_transformer" else (False,):
    qat = quantization.qat(model, 8, activations, config.train.quantization.exclude)
    graphdef, state = nnx.split(qat)
    forward = lambda s, *x: nnx.merge(graphdef, s)(*x)
    jaxpr = jax.make_jaxpr(forward)(state, *((x, x) if task == "seq2seq" else (x,))).jaxpr
    assert_every_weight_quantized(jaxpr, model, activations=activations)
  if name == "text_transformer":  # the sampler's KV-cache step too
    spec = dict(method="qat", bits=8, activations=False, exclude=config.train.quantization.exclude)
    graphdef, state = nnx.split(quantization.for_decoding(qat, spec))
    decode = lambda s, tokens, cache: nnx.merge(graphdef, s).decode(tokens, cache, 0)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    assert_every_weight_quantized(jax.make_jaxpr(decode)(state, tokens, model.init_cache(1, 8)).jaxpr, model)


def qat_config(name, **model):
  config = experiment(name)
  config.model.update(**model)
  config.train.update(steps=20, log_every=10, eval_every=100, warmup_steps=2)
  config.checkpoint.every = 10
  config.train.quantization.bits = 8
  return config


def check_qat_run(config, model, passes: int = 1) -> None:
  """A QAT run's train step rounds every Linear and Conv weight, and its trained `model` computes quantized: its
  loss on a training batch differs from the same parameters' in float, by little."""
  import optax  # pylint: disable=import-outside-toplevel

  from jaxmodels.models import build_model  # pylint: disable=import-outside-toplevel
  from jaxmodels.models.forward import model_input  # pylint: disable=import-outside-toplevel
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel
  exp = build_experiment(config)
  batch = exp.host_batch(0)
  assert_every_weight_quantized(exp.train_step.trace(exp.checkpoint_state, batch).jaxpr.jaxpr, model, passes)
  data = exp.dataset
  float_model = build_model(config.model, data.input_shape, data.num_outputs, nnx.Rngs(1),
                            task="lm" if data.task == "lm" else "classify")
  nnx.update(float_model, nnx.state(model, nnx.Param))
  x, y = model_input(batch["x"][:4]), batch["y"][:4]  # run eagerly: no compile
  loss = lambda m: float(optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())
  assert loss(model) != loss(float_model) and loss(model) == pytest.approx(loss(float_model), abs=0.05)


def test_qat_transformer_lm_trains_resumes_exports_compresses_and_samples(tmp_path, capsys):
  """A tiny scanned Transformer LM trained quantization-aware (int8; remat: its train step rounds each weight
  twice) learns and resumes; its export loads quantized and evaluates as the run did; its PTQ export (static
  input scales) samples."""
  import jaxmodels  # pylint: disable=import-outside-toplevel
  from jaxmodels.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  config = qat_config("text_transformer", num_layers=1, d_model=32, num_heads=2, d_ff=64)
  config.data.eval_windows = 8
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  losses = [r["loss"] for r in read_metrics(workdir) if r.get("split") == "train"]
  assert losses[-1] < losses[0] - 0.3  # 4.80 -> 3.51 nats in 20 steps
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))  # resume from step 10
  final = train_and_evaluate(config, workdir)
  resumed = [r["loss"] for r in read_metrics(workdir) if r.get("split") == "train"]
  assert resumed[-1] == pytest.approx(losses[-1], rel=1e-5)
  exported = str(tmp_path / "export")
  assert cli.main(["jaxmodels", "export", "--workdir", workdir, "--out", exported]) == 0
  check_qat_run(config, jaxmodels.load_model(exported), passes=2)
  capsys.readouterr()
  assert cli.main(["jaxmodels", "eval", "--workdir", exported]) == 0
  assert f"loss={final['loss']:.4f}" in capsys.readouterr().out
  out = str(tmp_path / "int8")
  assert cli.main(["jaxmodels", "compress", "--workdir", workdir, "--method", "ptq", "--activations", "--out",
                   out]) == 0  # static input scales, one per layer of the scanned stack
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
  qat = quantization.qat(model, 8, False, "embed")
  y, y_qat = np.asarray(model(x)), np.asarray(qat(x))
  assert not np.array_equal(y, y_qat) and np.allclose(y, y_qat, atol=0.05)


def test_static_input_scales_are_calibrated_per_tensor_and_per_layer():
  """PTQ with static activations: a dense layer's input scale is the largest |input| over the calibration batches
  over qwix's int8 bound, and the forward computes no absmax (the dynamic one does, per layer); a scanned stack
  gets each layer's own scale, the same as its unrolled twin's; a GRU (inputs quantized inside its time scan)
  runs at another batch size; placeholders (for a restore) have the calibrated tree."""
  from jaxmodels.models import MLP, RecurrentLM  # pylint: disable=import-outside-toplevel
  from jaxmodels.models.transformer import (  # pylint: disable=import-outside-toplevel
    TransformerConfig,
    TransformerLM,
    scan_to_unrolled,
  )
  mlp = MLP((16,), 10, hidden_sizes=(32,), rngs=nnx.Rngs(0))
  xs = [(i + 1) * jax.random.normal(jax.random.PRNGKey(i), (4, 16)) for i in range(3)]
  sample = quantization.sample_batch((16,), "classify")
  static = quantization.ptq(mlp, 8, "static", "embed", sample, [{"x": x} for x in xs])
  scale = nnx.to_pure_dict(nnx.state(static))["hidden"][0]["dot_general0_lhs_scale"]["array"]
  assert scale.shape == (1, 1) and float(scale[0, 0]) == pytest.approx(max(np.abs(x).max() for x in xs) / 127.5)
  dynamic = quantization.ptq(mlp, 8, "dynamic", "embed", sample)
  assert [len(op_shapes(jax.make_jaxpr(m)(xs[0]).jaxpr, "reduce_max")) for m in (static, dynamic)] == [0, 2]
  run = lambda model, x: jax.jit(lambda x: model(x))(x)  # one compile, not one per op
  assert np.abs(run(static, xs[0]) - run(mlp, xs[0])).max() < 0.1

  sizes = dict(d_model=16, num_heads=2, d_ff=32, num_layers=3)
  scanned = TransformerLM(50, TransformerConfig(**sizes), rngs=nnx.Rngs(0))
  unrolled = TransformerLM(50, TransformerConfig(**sizes, scan_layers=False), rngs=nnx.Rngs(1))
  nnx.update(unrolled, scan_to_unrolled(nnx.to_pure_dict(nnx.state(scanned))))
  tokens = [jax.random.randint(jax.random.PRNGKey(i), (2, 8), 0, 50) for i in range(2)]
  batches, sample = [{"x": t} for t in tokens], quantization.sample_batch((8,), "lm")
  exclude = "(.*/)?(pos_)?embed"
  per_layer = lambda m: nnx.to_pure_dict(nnx.state(quantization.ptq(m, 8, "static", exclude, sample, batches)))
  s, u = per_layer(scanned), per_layer(unrolled)
  query = s["stack"]["blocks"]["attn"]["query"]["dot_general0_lhs_scale"]["array"]
  assert query.shape == (3, 1, 1) and len(set(np.asarray(query).ravel())) == 3
  for name, twin in jax.tree_util.tree_flatten_with_path(scan_to_unrolled(s))[0]:
    np.testing.assert_allclose(twin, dict(jax.tree_util.tree_flatten_with_path(u)[0])[name], rtol=1e-6)
  placeholders = quantization.ptq(scanned, 8, "static", exclude, sample, None)
  assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(placeholders))) == jax.tree.map(np.shape, s)

  gru = RecurrentLM(50, cell="gru", hidden_size=16, num_layers=1, rngs=nnx.Rngs(0))
  quantized = quantization.ptq(gru, 8, "static", exclude, sample, batches)
  scales = [p for p, _ in nnx.to_flat_state(nnx.state(quantized)) if "dot_general0_lhs_scale" in p]
  assert len(scales) == 3  # the cell's input and recurrent projections, the head
  assert np.abs(run(quantized, tokens[0][:1]) - run(gru, tokens[0][:1])).max() < 0.2


def test_static_input_scales_of_a_bfloat16_model_have_its_compute_dtype():
  """A mixed-precision (bfloat16) model's static input scales are bfloat16, as qwix makes (and checks) them: the
  calibrated model and its placeholders (for a restore) run."""
  from jaxmodels.models import MLP  # pylint: disable=import-outside-toplevel
  mlp = MLP((16,), 10, hidden_sizes=(32,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  xs = [jax.random.normal(jax.random.PRNGKey(i), (4, 16)) for i in range(2)]
  for batches in ([{"x": x} for x in xs], None):
    static = quantization.ptq(mlp, 8, "static", "embed", quantization.sample_batch((16,), "classify"), batches)
    scale = nnx.to_pure_dict(nnx.state(static))["hidden"][0]["dot_general0_lhs_scale"]["array"]
    assert scale.dtype == jnp.bfloat16
    assert np.isfinite(jax.jit(lambda x: static(x))(xs[0])).all()  # before: ValueError (float32 != bfloat16)


def test_ptq_refuses_integer_inputs_in_float16():
  """qwix rescales an int8 x int8 product's int32 sums in the input's dtype: in float16 they overflow to inf (an
  int8 CNN or MLP with --activations evaluated as NaN). PTQ with quantized inputs (--activations, any
  convolution) of a float16 model is refused; a float16 MLP's weights alone still quantize."""
  from jaxmodels.models import MLP  # pylint: disable=import-outside-toplevel
  mlp = MLP((16,), 10, hidden_sizes=(32,), dtype=jnp.float16, rngs=nnx.Rngs(0))
  x = quantization.sample_batch((16,), "classify")
  for activations in ("static", "dynamic"):
    with pytest.raises(UserError, match="float16 model with quantized inputs"):
      quantization.ptq(mlp, 8, activations, "embed", x, [x])
  conv = nnx.Conv(1, 4, (3, 3), dtype=jnp.float16, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="float16 model with quantized inputs"):
    quantization.ptq(conv, 8, False, "embed", quantization.sample_batch((8, 8, 1), "classify"))
  assert quantization.ptq(mlp, 8, False, "embed", x) is not None


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
    (["--method", "ptq", "--activations", "always"], "argument --activations: invalid choice: 'always'"),
    (["--method", "ptq", "--calibration-batches", "4"], "--calibration-batches calibrates static input scales"),
    (["--method", "ptq", "--activations", "dynamic", "--calibration-batches", "4"], "it needs --activations (static)"),
    (["--method", "ptq", "--activations", "--calibration-batches", "0"], "--calibration-batches 0: expected at least"),
    (["--method", "prune", "--sparsity", "0.5", "--calibration-batches", "4"],
     "--calibration-batches is an option of --method ptq"),
    (["--method", "prune", "--sparsity", "0.5", "OUT_EXISTS"], "already exists and is not an empty directory"),
    (["--method", "ptq", "NO_CHECKPOINT"], "has no checkpoint"),
    (["--method", "prune", "--pattern", "1:11"], "--pattern 1:11: no prunable kernel of this model"),
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


def test_ptq_of_a_qat_run_keeps_its_width_by_default(tmp_path):
  from jaxmodels.tools import compress  # pylint: disable=import-outside-toplevel
  c = experiment("digits_cnn")
  c.train.quantization.bits = 4
  (tmp_path / "config.json").write_text(c.to_json())
  assert compress._ptq_options(str(tmp_path), None, None, None)["bits"] == 4  # pylint: disable=protected-access
  assert compress._ptq_options(str(tmp_path), 8, None, None)["bits"] == 8  # pylint: disable=protected-access
