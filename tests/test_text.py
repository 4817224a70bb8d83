"""Text data, language-model training, sampling and mixed precision."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, experiment, read_metrics

from jaxmodels.config import default_config
from jaxmodels.data import load_dataset_from_config
from jaxmodels.data.text import CORPUS_MODULES, Vocab, default_corpus
from jaxmodels.runtime.errors import UserError
from jaxmodels.tools.sample import generate, load_language_model
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate


def text_config(path="", **data):
  c = default_config()
  c.data.source = "text"
  c.data.path = str(path)
  c.data.seq_len = 8
  for k, v in data.items():
    c.data[k] = v
  return c


def test_char_and_byte_vocabularies_round_trip():
  v = Vocab.build("char", "hello world")
  assert v.size == len(set("hello world")) + 1
  assert v.decode(v.encode("low")) == "low"
  assert v.encode("xyz").tolist() == [0, 0, 0]  # unseen characters map to the unknown id
  b = Vocab.build("byte", "")
  assert b.size == 256 and b.decode(b.encode("héllo ✓")) == "héllo ✓"
  with pytest.raises(UserError, match="data.tokenizer"):
    Vocab.build("word", "x")


def test_split_windows_and_deterministic_batches(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("".join(chr(97 + i % 26) for i in range(1000)), encoding="utf-8")
  ds = load_dataset_from_config(text_config(path, val_fraction=0.2))
  assert (len(ds.train_ids), len(ds.val_ids)) == (800, 200)
  b = ds.train_batch(3, 4)
  assert b["x"].shape == b["y"].shape == (4, 8)
  np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])  # y is x shifted by one
  np.testing.assert_array_equal(ds.train_batch(3, 4)["x"], b["x"])
  assert not np.array_equal(ds.train_batch(4, 4)["x"], b["x"])


def test_eval_sweep_counts_every_validation_target_once(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("abcdefghij" * 10, encoding="utf-8")  # 100 chars: 90 train, 10 validation
  ds = load_dataset_from_config(text_config(path, seq_len=4))
  batches = list(ds.eval_batches(2))
  targets = np.concatenate([b["y"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(targets, ds.val_ids[1:])
  assert all(b["x"].shape == (2, 4) for b in batches)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"abc\xff\xfedef", "is not UTF-8 text"),
    (b"x" * 50, "validation split .* has 5 tokens, shorter than one window"),
])
def test_bad_text_files(tmp_path, content, message):
  path = tmp_path / "t.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    load_dataset_from_config(text_config(path))


def test_seq_len_beyond_model_max_len_is_an_error():
  c = text_config(seq_len=64)
  c.model.family = "transformer"
  c.model.max_len = 32
  with pytest.raises(UserError, match="data.seq_len=64 exceeds model.max_len=32"):
    build_experiment(c)


def test_embedded_corpus_is_real_python_source():
  text = default_corpus()
  assert len(text) > 200_000 and "def " in text and "class " in text
  assert len(CORPUS_MODULES) == 5


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def tiny_lm(family, workdir_text, steps):
  c = text_config(workdir_text, seq_len=16, val_fraction=0.2)
  c.model.family = family
  c.model.update(dict(num_layers=2, num_heads=2, d_model=32, d_ff=64, max_len=64) if family == "transformer" else
                 dict(num_layers=2, hidden_size=64))  # a key of the other family would be refused
  c.train.update(dict(steps=steps, batch_size=16, learning_rate=1e-2, warmup_steps=10, log_every=50,
                      eval_every=steps))
  return c


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory):
  """Tiny Transformer and LSTM LMs trained on one short string repeated: both must learn it exactly.

  Every character of ALPHABET has one successor, so a perfect model reaches zero loss.
  """
  tmp = tmp_path_factory.mktemp("overfit")
  path = tmp / "repeat.txt"
  path.write_text(ALPHABET * 50, encoding="utf-8")
  runs = {}
  for family in ("transformer", "lstm"):
    workdir = str(tmp / family)
    runs[family] = (workdir, train_and_evaluate(tiny_lm(family, path, 300), workdir))
  return runs


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_tiny_lm_overfits_repeated_string(overfit_runs, family):
  workdir, final = overfit_runs[family]
  assert final["loss"] < 0.02
  assert final["perplexity"] < 1.02 and final["bits_per_char"] == pytest.approx(final["loss"] / np.log(2))
  assert os.path.isfile(os.path.join(workdir, "vocab.json"))
  assert "tokens_per_sec" in read_metrics(workdir)[-2]


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_greedy_sampling_continues_the_learned_string(overfit_runs, family):
  model, vocab = load_language_model(overfit_runs[family][0])
  out = generate(model, vocab.encode("abc"), 40, temperature=0.0)
  assert vocab.decode(out) == (ALPHABET * 2)[3:43]
  again = generate(model, vocab.encode("abc"), 40, temperature=0.0, seed=7)
  np.testing.assert_array_equal(out, again)  # greedy ignores the seed
  sampled = [generate(model, vocab.encode("xyz"), 10, temperature=1.0, top_k=3, seed=s) for s in (1, 1)]
  np.testing.assert_array_equal(*sampled)  # a fixed seed is deterministic


def test_sample_cli_and_its_errors(overfit_runs):
  workdir = overfit_runs["transformer"][0]
  cmd = [sys.executable, "-m", "jaxmodels", "sample", "--workdir", workdir]
  r = subprocess.run([*cmd, "--prompt", "789", "--length", "8", "--temperature", "0"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout == "789 abcdefg\n"
  r = subprocess.run([*cmd, "--prompt", "abc", "--length", "100"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 2 and "exceeds the model's max_len=64" in r.stderr


@pytest.mark.slow
def test_bfloat16_training_tracks_float32():
  """200 steps of the text transformer (shrunk) in bf16 compute end within a small gap of float32."""
  finals = {}
  for dtype in ("float32", "bfloat16"):
    c = experiment("text_transformer")
    c.data.seq_len = 32
    c.model.update(dict(num_layers=2, d_model=64, d_ff=128, dtype=dtype))
    c.train.update(dict(steps=200, batch_size=16, log_every=100, eval_every=200, warmup_steps=20))
    exp = build_experiment(c)
    state = exp.init_state()
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {np.dtype("float32")}
    for step in range(200):
      state, _ = exp.train_step(state, exp.dataset.train_batch(step, 16))
    finals[dtype] = exp.evaluate(state)["loss"]
  assert finals["float32"] < 2.8  # it learned something (unigram entropy is ~3.1 nats)
  assert abs(finals["bfloat16"] - finals["float32"]) < 0.05


def test_checkpoint_restores_across_scan_and_unrolled_layouts(tmp_path):
  from jaxmodels.models.transformer import unrolled_to_scan  # pylint: disable=import-outside-toplevel
  from jaxmodels.runs import checkpoint  # pylint: disable=import-outside-toplevel

  path = tmp_path / "a.txt"
  path.write_text(ALPHABET * 10, encoding="utf-8")
  config = tiny_lm("transformer", path, 3)
  config.model.scan_layers = False
  config.train.warmup_steps = 1
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  ckpts = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
  saved = ckpts.restore(3, build_experiment(config).init_state())
  config.model.scan_layers = True
  restored = ckpts.restore(3, build_experiment(config).init_state())
  assert restored.params["stack"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 32)
  for a, b in zip(jax.tree.leaves(unrolled_to_scan((saved.params, saved.opt_state))),
                  jax.tree.leaves((restored.params, restored.opt_state))):
    np.testing.assert_array_equal(a, b)
  config.train.steps = 5  # and training resumes in the other layout, compiling its step once
  config.train.fail_on_recompile = True
  assert np.isfinite(train_and_evaluate(config, workdir)["loss"])
  assert [r["step"] for r in read_metrics(workdir) if r["split"] == "eval"] == [3, 5]
