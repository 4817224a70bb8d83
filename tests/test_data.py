import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_metrics

import jaxmodels.data
from jaxmodels.config import default_config, validate
from jaxmodels.data import SOURCES, load_dataset, load_dataset_from_config, padded_batches
from jaxmodels.runtime.errors import UserError


def good_arrays(n_train=20, n_test=7, shape=(6,)):
  rng = np.random.default_rng(0)
  return {"x_train": rng.normal(size=(n_train, *shape)), "y_train": np.arange(n_train) % 3,
          "x_test": rng.normal(size=(n_test, *shape)), "y_test": np.arange(n_test) % 3}


def npz_config(tmp_path, arrays=None, **data):
  path = tmp_path / "data.npz"
  if arrays is not None:
    np.savez(path, **arrays)
  c = default_config()
  c.data.source = "npz"
  c.data.path = str(path)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_npz_layouts_become_channels_last(tmp_path):
  cases = [((6,), None, (6, 1)), ((5, 4), None, (5, 4, 1)), ((5, 4, 3), None, (5, 4, 3)),
           ((6, 2), 1, (6, 2)), ((4, 4, 2), 2, (4, 4, 2))]
  for shape, dims, expected in cases:
    ds = load_dataset_from_config(npz_config(tmp_path, good_arrays(shape=shape), spatial_dims=dims))
    assert ds.input_shape == expected
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 3


def test_float_labels_with_integer_values_are_accepted(tmp_path):
  arrays = good_arrays()
  arrays["y_train"] = arrays["y_train"].astype(np.float64)
  assert load_dataset_from_config(npz_config(tmp_path, arrays)).y_train.dtype == np.int32


def bad(arrays_fn):
  a = good_arrays()
  arrays_fn(a)
  return a


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("y_test"), r"missing array 'y_test'"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train has 20 examples but y_train has 19"),
    (lambda a: a["x_test"].__setitem__((0, 0), np.nan), "x_test contains NaN or inf"),
    (lambda a: a["x_train"].__setitem__((3, 1), np.inf), "x_train contains NaN or inf"),
    (lambda a: a.update(y_test=np.array([0, 1, 2, 3, 0, 1, 2])), "y_test has label 3, out of range"),
    (lambda a: a.update(y_train=a["y_train"] - 1), "y_train has a negative label"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), "y_train must hold integer class labels"),
    (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "x_test has zero examples"),
    (lambda a: a.update(x_test=np.ones((7, 5))), r"x_train examples have shape \(6, 1\) but x_test"),
])
def test_bad_arrays_name_array_and_problem(tmp_path, mutate, message):
  with pytest.raises(UserError, match=message):
    load_dataset_from_config(npz_config(tmp_path, bad(mutate)))


def test_missing_file_and_path(tmp_path):
  with pytest.raises(UserError, match="file not found"):
    load_dataset_from_config(npz_config(tmp_path))
  c = default_config()
  c.data.source = "npz"
  with pytest.raises(UserError, match="needs data.path"):
    load_dataset_from_config(c)
  c.data.source = "csv"
  with pytest.raises(UserError, match="data.source='csv'"):
    load_dataset_from_config(c)


def test_digits_split_is_deterministic_by_seed():
  c = default_config()
  a, b = load_dataset_from_config(c), load_dataset_from_config(c)
  assert len(a.x_train) + len(a.x_test) == 1797
  assert len(a.x_test) == round(1797 * c.data.test_fraction)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  c.train.seed = 1
  assert not np.array_equal(load_dataset_from_config(c).y_test, a.y_test)
  assert a.x_train.max() <= 1.0 and a.input_shape == (8, 8, 1)


def test_train_batches_deterministic_epochwise_and_drop_partial(tmp_path):
  ds = load_dataset_from_config(npz_config(tmp_path, good_arrays(n_train=20)))
  # 20 examples, batch 6 -> 3 batches per epoch, the last 2 examples of each shuffle dropped.
  first = [ds.train_batch(s, 6)["x"] for s in range(3)]
  again = [ds.train_batch(s, 6)["x"] for s in (2, 0, 1)]  # any order of access
  np.testing.assert_array_equal(first[0], again[1])
  np.testing.assert_array_equal(first[2], again[0])
  rows = np.concatenate(first)
  assert len({r.tobytes() for r in rows}) == 18  # no repeats inside an epoch
  assert not np.array_equal(ds.train_batch(3, 6)["x"], first[0])  # a new shuffle next epoch
  with pytest.raises(UserError, match="exceeds the 20 training examples"):
    ds.train_batch(0, 21)


def test_eval_batches_pad_and_mask_every_example_once():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10)
  batches = list(padded_batches(x, y, 4))
  assert [b["x"].shape for b in batches] == [(4, 1)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  seen = np.concatenate([b["y"] for b in batches])[mask == 1]
  np.testing.assert_array_equal(np.sort(seen), y)
  assert mask.sum() == 10 and mask[-2:].sum() == 0


def test_load_dataset_takes_keyword_arguments_whose_defaults_are_the_configs():
  c = default_config()
  c.train.seed, c.data.test_fraction = 3, 0.25
  plain, grouped = load_dataset("digits", seed=3, test_fraction=0.25), load_dataset_from_config(c)
  for k in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(plain, k), getattr(grouped, k))
  params = inspect.signature(load_dataset).parameters
  defaults = {k: p.default for k, p in params.items()}
  d = default_config()
  assert defaults == {**{k: d.data[k] for k in params if k not in ("seed", "compute_dtype")},
                      "seed": d.train.seed, "compute_dtype": d.model.dtype}
  for fn in SOURCES.values():  # every built-in source takes only what load_dataset passes
    assert set(inspect.signature(fn).parameters) <= set(params), fn
  with pytest.raises(TypeError, match="test_fration"):
    load_dataset("digits", test_fration=0.5)
  assert all(hasattr(jaxmodels.data, name) for name in jaxmodels.data.__all__)
  assert {"StepStream", "load_text_dataset", "load_token_dataset", "Dataset"} <= set(jaxmodels.data.__all__)


def test_a_directory_or_file_where_the_other_is_expected_is_named(tmp_path):
  (tmp_path / "arrays.npz").mkdir()
  with pytest.raises(UserError, match=r"arrays.npz is a directory, not an .npz file"):
    load_dataset("npz", path=str(tmp_path / "arrays.npz"))
  with pytest.raises(UserError, match=r"arrays.npz is a directory, not an .npz file"):
    load_dataset("images", path=str(tmp_path / "arrays.npz"))
  with pytest.raises(UserError, match=r"arrays.npz is a directory, not a text file"):
    load_dataset("text", path=str(tmp_path / "arrays.npz"))
  (tmp_path / "corpus.txt").write_text("abc" * 100)
  with pytest.raises(UserError, match=r"corpus.txt is a file, not a directory"):
    load_dataset("tokens", path=str(tmp_path / "corpus.txt"))


# A data source of one's own (data.source=MODULE:blobs): two Gaussian blobs as an ArrayDataset.
SOURCE_MODULE = """
import numpy as np
from jaxmodels.data import ArrayDataset, validate_arrays

def blobs(*, seed, test_fraction, compute_dtype, n=400):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  x = rng.normal(size=(n, 4)) + 4.0 * y[:, None]
  k = int(n * test_fraction)
  arrays = {"x_train": x[k:], "y_train": y[k:], "x_test": x[:k], "y_test": y[:k]}
  return ArrayDataset(**validate_arrays(arrays, None, compute_dtype), seed=seed)

def not_a_dataset(seed):
  return {"x": seed}

def wants_colour(seed, colour):
  return None
"""


def write_source(directory, name: str) -> None:
  (directory / f"{name}.py").write_text(SOURCE_MODULE)


def test_a_source_by_import_path_loads_and_one_that_breaks_the_protocol_is_named(tmp_path, monkeypatch):
  write_source(tmp_path, "jm_blob_source")
  monkeypatch.syspath_prepend(str(tmp_path))
  ds = load_dataset("jm_blob_source:blobs", seed=1, test_fraction=0.25)
  assert (ds.task, ds.num_outputs, ds.input_shape, len(ds.x_test)) == ("classify", 2, (4, 1), 100)
  cases = [("jm_no_such_module:blobs", "cannot import jm_no_such_module"),
           ("jm_blob_source:nothing", "jm_blob_source has no attribute nothing"),
           ("jm_blob_source", r"expected one of digits, .*, or package.module:function"),
           ("jm_blob_source:not_a_dataset", "returned a dict without task"),
           ("jm_blob_source:wants_colour", "parameter 'colour' is not a keyword argument")]
  for source, message in cases:
    with pytest.raises(UserError, match=message) as e:
      load_dataset(source)
    assert str(e.value).startswith(f"data.source={source!r}")
  with pytest.raises(UserError, match="data.task='regress' but data.source='jm_blob_source:blobs' returned"):
    load_dataset("jm_blob_source:blobs", task="regress")
  c = default_config()
  c.data.source = "jm_no_such_module:blobs"
  with pytest.raises(UserError, match="data.source='jm_no_such_module:blobs': cannot import jm_no_such_module"):
    validate(c)


def test_a_source_by_import_path_trains_through_the_command_line(tmp_path):
  write_source(tmp_path, "jm_cli_source")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
  train = [sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/digits_mlp.py",
           "--config.train.steps=20", "--config.train.log_every=10", "--config.train.eval_every=20",
           "--config.train.warmup_steps=2", "--config.train.batch_size=32"]
  r = subprocess.run([*train, f"--workdir={tmp_path / 'run'}", "--config.data.source=jm_cli_source:blobs"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert read_metrics(str(tmp_path / "run"))[-1]["accuracy"] > 0.9  # the blobs are apart: a source of its own
  r = subprocess.run([*train, f"--workdir={tmp_path / 'bad'}", "--config.data.source=jm_cli_source:blobz"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2
  assert r.stderr.strip() == ("jaxmodels: error: data.source='jm_cli_source:blobz': jm_cli_source has no "
                              "attribute blobz")
  assert not (tmp_path / "bad").exists()
