import numpy as np
import pytest

from jaxmodels.config import default_config
from jaxmodels.data import load_dataset, padded_batches
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
    ds = load_dataset(npz_config(tmp_path, good_arrays(shape=shape), spatial_dims=dims))
    assert ds.input_shape == expected
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 3


def test_float_labels_with_integer_values_are_accepted(tmp_path):
  arrays = good_arrays()
  arrays["y_train"] = arrays["y_train"].astype(np.float64)
  assert load_dataset(npz_config(tmp_path, arrays)).y_train.dtype == np.int32


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
    load_dataset(npz_config(tmp_path, bad(mutate)))


def test_missing_file_and_path(tmp_path):
  with pytest.raises(UserError, match="file not found"):
    load_dataset(npz_config(tmp_path))
  c = default_config()
  c.data.source = "npz"
  with pytest.raises(UserError, match="needs data.path"):
    load_dataset(c)
  c.data.source = "csv"
  with pytest.raises(UserError, match="data.source='csv'"):
    load_dataset(c)


def test_digits_split_is_deterministic_by_seed():
  c = default_config()
  a, b = load_dataset(c), load_dataset(c)
  assert len(a.x_train) + len(a.x_test) == 1797
  assert len(a.x_test) == round(1797 * c.data.test_fraction)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  c.train.seed = 1
  assert not np.array_equal(load_dataset(c).y_test, a.y_test)
  assert a.x_train.max() <= 1.0 and a.input_shape == (8, 8, 1)


def test_train_batches_deterministic_epochwise_and_drop_partial(tmp_path):
  ds = load_dataset(npz_config(tmp_path, good_arrays(n_train=20)))
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
