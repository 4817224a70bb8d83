"""Every bad input is a one-line UserError raised before anything is built or written (issue 13).

Config keys are checked by `config.validate` (every key of jaxmodels/config/defaults.py has a case here, enforced by
`test_every_config_key_has_a_bad_value_case`); data by `load_dataset`. In-process calls keep this cheap; one
CLI test checks the exit code, the single stderr line and the absent workdir.
"""

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from jaxmodels.config import default_config, validate
from jaxmodels.data import load_dataset_from_config
from jaxmodels.runtime.errors import UserError

NAN, INF = math.nan, math.inf

# (key, a value the ConfigDict's types accept but the run cannot use, the start of the expected message).
BAD_VALUES = [
    ("data.source", "csv", "data.source='csv': expected one of digits, npz, text, tokens, images"),
    ("data.image_size", -1, "data.image_size=-1: expected an integer >= 0"),
    ("data.workers", -2, "data.workers=-2: expected an integer >= 0"),
    ("data.prefetch", -1, "data.prefetch=-1: expected an integer >= 0"),
    ("data.vocab_size", -1, "data.vocab_size=-1: expected an integer >= 0"),
    ("data.eval_windows", -3, "data.eval_windows=-3: expected an integer >= 0"),
    ("data.path", "mine.npz", "data.path='mine.npz' is set but data.source=digits reads no file"),
    ("data.test_fraction", 1.0, "data.test_fraction=1.0: expected a number in (0, 1)"),
    ("data.test_fraction", NAN, "data.test_fraction=nan"),
    ("data.spatial_dims", 0, "data.spatial_dims=0: expected unset, 1"),
    ("data.spatial_dims", 3, "data.spatial_dims=3"),
    ("data.seq_len", 0, "data.seq_len=0: expected a positive integer"),
    ("data.val_fraction", 0.0, "data.val_fraction=0.0"),
    ("data.val_fraction", 1.5, "data.val_fraction=1.5"),
    ("data.tokenizer", "word", "data.tokenizer='word': expected one of char, byte"),
    ("data.tokenizer_path", "tok", "data.tokenizer_path='tok' is set but data.source=digits does not read it"),
    ("data.chat_template", "t.jinja", "data.chat_template='t.jinja' is set but data.source=digits does not read it"),
    ("data.document_mask", True, "data.document_mask=True is set but data.source=digits does not read it"),
    ("data.task", "rank", "data.task='rank': expected one of , classify, binary, multilabel, regress"),
    ("model.family", "rnn", "model.family='rnn'"),
    ("model.dtype", "int8", "model.dtype='int8': expected one of float32, bfloat16, float16"),
    ("model.dtype", "float8", "model.dtype='float8'"),
    ("model.dtype", "foo", "model.dtype='foo'"),
    ("model.dtype", "float64", "model.dtype='float64'"),  # would silently compute in float32 (x64 off)
    ("model.param_dtype", "float16", "model.param_dtype='float16': expected one of float32, bfloat16"),
    ("model.param_dtype", "int8", "model.param_dtype='int8'"),
    ("model.dropout", -0.1, r"model.dropout=-0.1: expected a number in [0, 1)"),
    ("model.dropout", 1.0, "model.dropout=1.0"),
    ("model.dropout", NAN, "model.dropout=nan"),
    ("model.activation", "nope", "model.activation='nope' is not a jax.nn activation"),
    ("model.hidden_sizes", (32, 0), "model.hidden_sizes=(32, 0): expected a tuple of positive integers"),
    ("model.features", (32, -1), "model.features=(32, -1)"),
    ("model.kernel_sizes", (3, 0), "model.kernel_sizes=(3, 0)"),
    ("model.strides", (0, 1), "model.strides=(0, 1)"),
    ("model.pool", "min", "model.pool='min': expected one of max, avg, none"),
    ("model.norm", "group", "model.norm='group'"),
    ("model.head_sizes", (1.5,), "model.head_sizes=(1.5,)"),
    ("model.num_layers", 0, "model.num_layers=0"),
    ("model.num_heads", 0, "model.num_heads=0"),
    ("model.d_model", -8, "model.d_model=-8"),
    ("model.d_ff", 0, "model.d_ff=0"),
    ("model.max_len", 0, "model.max_len=0"),
    ("model.positions", "alibi", "model.positions='alibi'"),
    ("model.mlp", "relu", "model.mlp='relu'"),
    ("model.remat", "some", "model.remat='some'"),
    ("model.attention_impl", "flash", "model.attention_impl='flash'"),
    ("model.pooling", "max", "model.pooling='max'"),
    ("model.cell", "rnn", "model.cell='rnn'"),
    ("model.hidden_size", 0, "model.hidden_size=0"),
    ("model.preset", "gpt3", "model.preset='gpt3': expected one of , gpt2, gpt2-medium"),
    ("model.num_kv_heads", 0, "model.num_kv_heads=0: expected unset or a positive integer"),
    ("model.norm_eps", 0.0, "model.norm_eps=0.0: expected a finite number > 0"),
    ("model.norm_eps", NAN, "model.norm_eps=nan"),
    ("model.rope_theta", -1.0, "model.rope_theta=-1.0"),
    ("model.head_dim", 0, "model.head_dim=0: expected unset or a positive integer"),
    ("model.rope_scaling", "ntk", "model.rope_scaling='ntk': expected one of none, linear, llama3, yarn"),
    ("model.rope_factor", 0.0, "model.rope_factor=0.0"),
    ("model.rope_original_max_len", 0, "model.rope_original_max_len=0"),
    ("model.rope_low_freq_factor", -1.0, "model.rope_low_freq_factor=-1.0"),
    ("model.rope_high_freq_factor", 0.0, "model.rope_high_freq_factor=0.0"),
    ("model.rope_beta_fast", 0.0, "model.rope_beta_fast=0.0"),
    ("model.rope_beta_slow", -1.0, "model.rope_beta_slow=-1.0"),
    ("model.rope_attention_factor", 0.0, "model.rope_attention_factor=0.0: expected unset or a positive number"),
    ("model.sliding_window", 0, "model.sliding_window=0: expected unset or a positive integer"),
    ("model.num_experts", -1, "model.num_experts=-1: expected an integer >= 0"),
    ("model.experts_per_token", 0, "model.experts_per_token=0: expected a positive integer"),
    ("model.num_shared_experts", -1, "model.num_shared_experts=-1: expected an integer >= 0"),
    ("model.moe_every", 0, "model.moe_every=0: expected a positive integer"),
    ("model.router", "topk", "model.router='topk': expected one of softmax, sigmoid"),
    ("model.capacity_factor", -1.0, "model.capacity_factor=-1.0: expected a finite number >= 0"),
    ("model.aux_loss_weight", -1.0, "model.aux_loss_weight=-1.0: expected a finite number >= 0"),
    ("model.z_loss_weight", float("nan"), "model.z_loss_weight=nan: expected a finite number >= 0"),
    ("parallel.pipeline_microbatches", -1, "parallel.pipeline_microbatches=-1: expected an integer >= 0"),
    ("parallel.pipeline_repeats", 0, "parallel.pipeline_repeats=0: expected a positive integer"),
    ("train.freeze", ("[",), "train.freeze=('[',): expected a tuple of regexes"),
    ("train.lr_multipliers", (("x", -1.0),), "train.lr_multipliers=(('x', -1.0),): expected a tuple of (regex, "
     "multiplier >= 0) pairs"),
    ("train.logits_chunk", -1, "train.logits_chunk=-1: expected an integer >= 0"),
    ("train.lora.alpha", 0.0, "train.lora.alpha=0.0: expected a finite number > 0"),
    ("train.lora.rank", -1, "train.lora.rank=-1: expected an integer >= 0"),
    ("train.lora.targets", ("[",), "train.lora.targets=('[',): expected a non-empty tuple of regexes"),
    ("model.qk_norm", "layer", "model.qk_norm='layer': expected one of none, head, full"),
    ("model.norm_position", "inner", "model.norm_position='inner': expected one of pre, post, sandwich"),
    ("model.global_layer_every", -1, "model.global_layer_every=-1"),
    ("model.attn_logit_softcap", 0.0, "model.attn_logit_softcap=0.0: expected unset or a positive number"),
    ("model.final_logit_softcap", -1.0, "model.final_logit_softcap=-1.0: expected unset or a positive number"),
    ("model.attention_scale_dim", 0.0, "model.attention_scale_dim=0.0: expected unset or a positive number"),
    ("model.patch_size", 0, "model.patch_size=0"),
    ("model.stage_sizes", (), "model.stage_sizes=(): expected a non-empty tuple of positive integers"),
    ("model.stage_sizes", (2, 0), "model.stage_sizes=(2, 0)"),
    ("model.block", "wide", "model.block='wide': expected one of basic, bottleneck"),
    ("model.width", 0, "model.width=0"),
    ("model.stem", "cifar", "model.stem='cifar': expected one of imagenet, small"),
    ("train.steps", 0, "train.steps=0"),
    ("train.batch_size", -1, "train.batch_size=-1"),
    ("train.grad_accum_steps", 0, "train.grad_accum_steps=0"),
    ("train.optimizer", "lion", "train.optimizer='lion': expected one of adamw, adam, sgd"),
    ("train.learning_rate", INF, "train.learning_rate=inf: expected a finite number > 0"),
    ("train.learning_rate", NAN, "train.learning_rate=nan"),
    ("train.schedule", "step", "train.schedule='step'"),
    ("train.warmup_steps", -1, "train.warmup_steps=-1: expected an integer >= 0"),
    ("train.end_lr_fraction", 1.5, r"train.end_lr_fraction=1.5: expected a number in [0, 1]"),
    ("train.weight_decay", INF, "train.weight_decay=inf: expected a finite number >= 0"),
    ("train.weight_decay", -0.1, "train.weight_decay=-0.1"),
    ("train.momentum", 1.0, "train.momentum=1.0"),
    ("train.b1", 1.0, "train.b1=1.0"),
    ("train.b2", -0.5, "train.b2=-0.5"),
    ("train.grad_clip", -1.0, "train.grad_clip=-1.0"),
    ("train.grad_clip", NAN, "train.grad_clip=nan"),
    ("train.seed", -1, r"train.seed=-1: expected an integer in [0, 2**31)"),
    ("train.log_every", 0, "train.log_every=0"),
    ("train.eval_every", 0, "train.eval_every=0"),
    ("train.eval_batch_size", 0, "train.eval_batch_size=0"),
    ("train.eval_top_k", -1, "train.eval_top_k=-1: expected an integer >= 0"),
    ("train.loss", "l1", "train.loss='l1': expected one of mse, mae, huber"),
    ("train.early_stopping.metric", "f2", "train.early_stopping.metric='f2': expected one of , loss, accuracy"),
    ("train.early_stopping.mode", "lowest", "train.early_stopping.mode='lowest': expected one of min, max"),
    ("train.early_stopping.patience", 0, "train.early_stopping.patience=0: expected a positive integer"),
    ("train.early_stopping.min_delta", -0.1, "train.early_stopping.min_delta=-0.1: expected a finite number >= 0"),
    ("train.pruning.sparsity", 1.0, "train.pruning.sparsity=1.0: expected a number in [0, 1)"),
    ("train.pruning.pattern", "4:2", "train.pruning.pattern='4:2': expected unstructured or N:M with 0 < N < M"),
    ("train.pruning.pattern", "block", "train.pruning.pattern='block'"),
    ("train.pruning.scope", "model", "train.pruning.scope='model': expected one of layer, global"),
    ("train.pruning.start_step", -1, "train.pruning.start_step=-1: expected an integer >= 0"),
    ("train.pruning.end_step", -1, "train.pruning.end_step=-1: expected an integer >= 0"),
    ("train.pruning.every", 0, "train.pruning.every=0: expected a positive integer"),
    ("train.distill.temperature", 0.0, "train.distill.temperature=0.0: expected a finite number > 0"),
    ("train.distill.alpha", 1.5, "train.distill.alpha=1.5: expected a number in [0, 1]"),
    ("train.quantization.bits", 2, "train.quantization.bits=2: expected one of 0, 4, 8"),
    ("train.quantization.exclude", "(", "train.quantization.exclude='(': expected a regex of module paths"),
    ("train.profile_steps", (5, 2), r"train.profile_steps=(5, 2): expected () or (first, last)"),
    ("train.loss_scale_period", 0, "train.loss_scale_period=0: expected a positive integer"),
    ("train.ema_decay", 1.0, r"train.ema_decay=1.0: expected a number in [0, 1)"),
    ("train.ema_decay", -0.5, "train.ema_decay=-0.5"),
    ("train.wandb_project", "team/proj", "train.wandb_project='team/proj': expected a W&B project name"),
    ("train.wandb_mode", "disabled", "train.wandb_mode='disabled': expected one of , online, offline"),
    ("checkpoint.every", -1, "checkpoint.every=-1"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
    ("checkpoint.keep_best", "perplexity", "checkpoint.keep_best='perplexity': expected one of , loss, accuracy"),
    ("checkpoint.best_mode", "mid", "checkpoint.best_mode='mid'"),
    ("checkpoint.restore_mode", "half", "checkpoint.restore_mode='half'"),
    ("parallel.strategy", "ddp", "parallel.strategy='ddp'"),
    ("parallel.mesh", "data=0", "parallel.mesh='data=0': every axis size must be a positive integer or -1"),
    ("parallel.mesh", "model=2", "parallel.mesh: unknown axis 'model'"),
    ("parallel.mesh", "data=1,data=1", "parallel.mesh: axis 'data' is given twice"),
    ("parallel.dcn_mesh", "data=-1", "parallel.dcn_mesh='data=-1': every axis size must be a positive integer"),
    ("parallel.dcn_mesh", "slice=2", "parallel.dcn_mesh: unknown axis 'slice'"),
    ("parallel.activation_rules", (("activation_batch",),), "parallel.activation_rules: ('activation_batch',) is not"),
    ("parallel.activation_rules", (("activation_batch", "model"),),
     "parallel.activation_rules: activation_batch maps to unknown mesh axes ['model']"),
    ("parallel.rules", (("embed", "model"),), "parallel.rules: ('embed', 'model') is not a pair"),
    ("parallel.fallback_rules", (("(", "fsdp"),), "parallel.fallback_rules: ('(', 'fsdp') is not a pair (path regex"),
    ("parallel.coordinator_address", "host", "parallel.coordinator_address='host': expected empty or HOST:PORT"),
    ("parallel.num_processes", 0, "parallel.num_processes=0"),
    ("parallel.process_id", 1, r"parallel.process_id=1: expected an integer in [0, parallel.num_processes=1)"),
    ("parallel.init_timeout_s", 0, "parallel.init_timeout_s=0"),
    ("parallel.heartbeat_timeout_s", -1, "parallel.heartbeat_timeout_s=-1"),
]
# Keys that need no case: booleans (the ConfigDict refuses any other type) and checkpoint.restore_from and
# train.distill.teacher, paths checked where they are read (tests/test_compression_train.py).
NO_CASE = {"checkpoint.restore_from", "train.distill.teacher"}


def leaf_keys(config, prefix: str = "") -> dict:
  """{"group.key": value}, nested groups (train.early_stopping.metric) included."""
  out = {}
  for k, v in (config.to_dict() if hasattr(config, "to_dict") else config).items():
    out.update(leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def set_key(config, key: str, value) -> None:
  *groups, name = key.split(".")
  for group in groups:
    config = config[group]
  config[name] = value


def configured(**overrides):
  c = default_config()
  for key, value in overrides.items():
    group, name = key.split("__")
    if isinstance(value, dict):  # a nested group: these of its keys
      c[group][name].update(value)
    else:
      c[group][name] = value
  return c


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_config_value_is_one_line_naming_the_key(key, value, message):
  c = default_config()
  set_key(c, key, value)
  with pytest.raises(UserError) as e:
    validate(c)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_config_key_has_a_bad_value_case():
  keys = leaf_keys(default_config())
  uncovered = {k for k, v in keys.items() if not isinstance(v, bool)} - NO_CASE - {k for k, _, _ in BAD_VALUES}
  assert not uncovered
  validate(default_config())  # and the defaults pass


@pytest.mark.parametrize("overrides, message", [
    (dict(model__family="cnn", model__norm="rms"), "model.norm='rms': expected one of batch, layer, none"),
    (dict(model__family="cnn", model__strides=(1,)), "model.features, model.kernel_sizes and model.strides"),
    (dict(model__family="transformer", model__norm="batch"), "model.norm='batch': expected one of layer, rms"),
    (dict(model__family="transformer", model__d_model=30), "model.d_model=30 is not divisible by model.num_heads"),
    (dict(model__family="transformer", model__d_model=36), "model.positions=rotary needs an even head size"),
    (dict(model__family="transformer", model__pooling="last"), "model.pooling='last': expected one of mean, cls"),
    (dict(model__family="lstm", model__pooling="cls"), "model.pooling='cls': expected one of last, mean"),
    (dict(data__source="text", model__family="mlp"), "model.family='mlp' is not a language model"),
    (dict(data__source="text", model__family="vit"), "model.family='vit' is not a language model"),
    (dict(model__family="transformer", model__num_kv_heads=3),
     "model.num_kv_heads=3: expected unset or a positive divisor of model.num_heads=4"),
    (dict(model__family="cnn", model__d_model=64), "model.d_model=64 does not apply to model.family=cnn"),
    (dict(model__family="mlp", model__stem="small"), "model.stem='small' does not apply to model.family=mlp"),
    (dict(model__family="resnet", model__activation="gelu"), "model.activation='gelu' does not apply"),
    (dict(model__family="lstm", model__preset="gpt2"), "model.family='lstm' contradicts model.preset='gpt2'"),
    (dict(model__family="vit", model__d_model=30), "model.d_model=30 is not divisible by model.num_heads"),
    (dict(data__source="text", model__family="lstm", checkpoint__keep_best="bits_per_byte"),
     "checkpoint.keep_best='bits_per_byte': expected one of , loss, accuracy, perplexity, bits_per_char"),
    (dict(train__batch_size=64, train__grad_accum_steps=3), "train.batch_size=64 is not divisible"),
    (dict(train__pruning=dict(sparsity=0.9, pattern="2:4")),
     "train.pruning.sparsity=0.9 with pattern 2:4: expected 0.5"),
    (dict(train__pruning=dict(sparsity=0.5, pattern="2:4", scope="global")), "train.pruning.scope=global ranks"),
    (dict(train__pruning=dict(sparsity=0.5, start_step=10, end_step=5)),
     "train.pruning.end_step=5 is below train.pruning.start_step=10"),
    (dict(train__distill=dict(teacher="runs/t"), parallel__strategy="pmap"), "train.distill.teacher is set but"),
    (dict(train__quantization=dict(bits=8), model__dtype="float16"),
     "train.quantization.bits=8 with model.dtype=float16: qwix computes"),
    (dict(data__source="reverse"), "model.family=cnn with data.source=reverse: the encoder-decoder (encdec) takes"),
    (dict(data__source="text", model__family="encdec"), "model.family=encdec with data.source=text"),
    (dict(data__source="copy", model__family="encdec", model__pooling="cls"),
     "model.pooling='cls' does not apply to model.family=encdec"),
    (dict(data__source="copy", model__family="encdec", data__task="classify"),
     "data.task='classify' is set but data.source=copy is always seq2seq"),
    (dict(data__source="copy", model__family="encdec", checkpoint__keep_best="f1_macro"),
     "checkpoint.keep_best='f1_macro': expected one of , loss, accuracy, exact_match, perplexity"),
])
def test_keys_that_depend_on_each_other(overrides, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(configured(**overrides))


def test_build_experiment_refuses_a_non_finite_learning_rate():
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="train.learning_rate=inf"):
    build_experiment(configured(train__learning_rate=INF))


# Data: what np.load returns, degenerate datasets, lossy casts.

def arrays(n_train=20, n_test=7, classes=3):
  rng = np.random.default_rng(0)
  return {"x_train": rng.normal(size=(n_train, 6)), "y_train": np.arange(n_train) % classes,
          "x_test": rng.normal(size=(n_test, 6)), "y_test": np.arange(n_test) % classes}


def npz_config(path, **overrides):
  c = configured(**overrides)
  c.data.source, c.data.path = "npz", str(path)
  c.train.batch_size = 4
  return c


def write(tmp_path, kind):
  path = tmp_path / f"data.{kind}"
  if kind == "npy":
    np.save(path, np.ones((3, 3)))
    path = tmp_path / "data.npy"
  elif kind == "txt":
    path.write_text("x_train,y_train\n1,2\n")
  elif kind == "pkl":
    path.write_bytes(pickle.dumps(arrays()))
  elif kind == "empty":
    path.write_bytes(b"")
  elif kind == "truncated":
    np.savez(tmp_path / "full.npz", **arrays())
    path.write_bytes((tmp_path / "full.npz").read_bytes()[:300])
  elif kind == "dir":
    path.mkdir()
  return path


@pytest.mark.parametrize("kind, message", [
    ("npy", r"data.npy: one array \(.npy\), not an .npz archive of x_train, y_train, x_test, y_test"),
    ("txt", "data.txt: not a readable .npz file"),
    ("pkl", "data.pkl: not a readable .npz file"),
    ("empty", "data.empty: not a readable .npz file"),
    ("truncated", "data.truncated: not a readable .npz file"),
    ("dir", "data.dir is a directory, not an .npz file"),
])
def test_files_that_are_not_npz_archives(tmp_path, kind, message):
  with pytest.raises(UserError, match=message) as e:
    load_dataset_from_config(npz_config(write(tmp_path, kind)))
  assert "\n" not in str(e.value)


def with_arrays(tmp_path, mutate, **overrides):
  a = arrays()
  mutate(a)
  np.savez(tmp_path / "data.npz", **a)
  return npz_config(tmp_path / "data.npz", **overrides)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(y_train=np.zeros(20, int), y_test=np.zeros(7, int)),
     r"y_train holds one class \(0\): a classifier needs examples of at least two"),
    (lambda a: a.update(y_train=np.full(20, 2), y_test=np.full(7, 2)), r"y_train holds one class \(2\)"),
    (lambda a: a.update(x_train=np.float64(1.0)), r"x_train is a scalar"),
    (lambda a: a.update(y_test=np.int64(0)), r"y_test is a scalar"),
    (lambda a: a.update(x_train=a["x_train"] + 1j), "x_train must hold real numbers, got dtype complex128"),
    (lambda a: a.update(x_train=np.full((20, 6), 1e39)), r"x_train has values up to 1e\+39 in magnitude, beyond"),
    (lambda a: a["x_test"].__setitem__((0, 0), -1e300), r"x_test has values up to 1e\+300"),
    (lambda a: a.update(y_train=a["y_train"] + 2**32), "y_train has label 4294967298, beyond int32"),
    (lambda a: a.update(y_train=(a["y_train"] + 2**40).astype(np.uint64)), "y_train has label .* beyond int32"),
    (lambda a: a.update(y_test=a["y_test"] * 1e10), r"y_test has label 20000000000.0, beyond int32"),
    (lambda a: a.update(y_train=a["y_train"] + 0.25), "y_train must hold integer class labels, found 0.25"),
])
def test_degenerate_data_and_lossy_casts(tmp_path, mutate, message):
  with pytest.raises(UserError, match=message):
    load_dataset_from_config(with_arrays(tmp_path, mutate))


def test_values_beyond_float16_compute_are_refused_only_under_float16(tmp_path):
  big = lambda a: a["x_train"].__setitem__((0, 0), 1e5)
  assert load_dataset_from_config(with_arrays(tmp_path, big)).x_train.max() == np.float32(1e5)
  with pytest.raises(UserError, match=r"x_train has values up to 1e\+05 .* that float16 \(model.dtype\) holds"):
    load_dataset_from_config(with_arrays(tmp_path, big, model__dtype="float16"))


def test_fewer_training_examples_than_a_batch(tmp_path):
  from jaxmodels.train.experiment import build_experiment  # pylint: disable=import-outside-toplevel
  c = with_arrays(tmp_path, lambda a: None)
  c.model.family = "mlp"
  c.train.batch_size = 21
  with pytest.raises(UserError, match="train.batch_size=21 exceeds the 20 training examples"):
    build_experiment(c)


def test_text_of_one_repeated_character(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("a" * 200)
  c = configured(data__source="text", data__path=str(path), data__seq_len=8)
  with pytest.raises(UserError, match="repeats one token \\('a'\\): there is nothing to learn"):
    load_dataset_from_config(c)
  c.data.tokenizer = "byte"
  with pytest.raises(UserError, match="repeats one token"):
    load_dataset_from_config(c)


@pytest.mark.parametrize("flags, message", [
    (["--config.model.dtype=int8"], "jaxmodels: error: model.dtype='int8': expected one of float32, bfloat16, "
                                    "float16"),
    (["--config.data.source=npz", "--config.data.path={tmp}/x.npy"],
     "jaxmodels: error: {tmp}/x.npy: one array (.npy), not an .npz archive"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, flags, message):
  np.save(tmp_path / "x.npy", np.ones((4, 3)))
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/digits_mlp.py",
                      f"--workdir={workdir}", *[f.format(tmp=tmp_path) for f in flags]], cwd=ROOT,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2
  assert r.stderr.strip().startswith(message.format(tmp=tmp_path)) and len(r.stderr.strip().splitlines()) == 1
  assert not workdir.exists()
