"""In-memory array data: the bundled digits and the user's own `.npz`, for every task of jaxmodels.tasks.

Batches are written by hand rather than through grain: the arrays already sit in
host memory, and making each training batch a pure function of (seed, step)
gives deterministic order and exact resume with no iterator state to save.
"""

import dataclasses
import importlib.resources
import zipfile
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["ALL_ROWS", "ArrayDataset", "check_batch_size", "digits", "DIGITS_FILE", "existing_file", "infer_task",
           "INT32_MAX", "load_digits", "load_digits_dataset", "load_npz", "load_npz_dataset", "NPZ_KEYS",
           "padded_batches", "Rows", "validate_arrays"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
Rows = np.ndarray | slice  # which rows of a global batch a process loads: indices (Layout.local_rows) or a slice
ALL_ROWS = slice(None)


@dataclasses.dataclass
class ArrayDataset:
  """Train and test arrays, x as float32 (N, *spatial, C); y int32 (N,) class labels (classify, binary),
  float32 (N, C) 0/1 targets (multilabel) or float32 (N, ...) targets (regress)."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int  # classes (classify, binary: 2), labels (multilabel); 0 for regress
  seed: int
  task: str = "classify"
  _epoch_perm: tuple = (None, None)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example, channels last."""
    return self.x_train.shape[1:]

  @property
  def num_outputs(self) -> int:
    """The model's output count: a logit per class (classify) or label (multilabel), one (binary), one per
    target element (regress)."""
    return {"binary": 1, "regress": int(np.prod(self.y_train.shape[1:], dtype=np.int64))}.get(self.task,
                                                                                            self.num_classes)

  def describe(self) -> str:
    what = {"classify": f"{self.num_classes} classes", "binary": "binary labels",
            "multilabel": f"{self.num_classes} labels",
            "regress": f"float targets of shape {self.y_train.shape[1:]}"}
    return (f"{len(self.x_train)} train / {len(self.x_test)} test examples of shape "
            f"{self.input_shape}, {what[self.task]}")

  def files(self) -> dict[str, str]:
    """Files the run keeps in its workdir: none for arrays."""
    return {}

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` (indices into the global batch) of the global batch for `step`.

    Epoch-wise seeded shuffles, last partial batch dropped; each process gathers
    only the rows its devices hold.
    """
    n = len(self.x_train)
    check_batch_size(batch_size, n)
    epoch, i = divmod(step, n // batch_size)
    if self._epoch_perm[0] != epoch:
      self._epoch_perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
    idx = self._epoch_perm[1][i * batch_size:(i + 1) * batch_size][rows]
    return {"x": self.x_train[idx], "y": self.y_train[idx]}

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape test batches (rows `rows` of each); padding is masked so each example counts once.

    Every process iterates the same number of batches, whatever its rows.
    """
    for batch in padded_batches(self.x_test, self.y_test, batch_size):
      yield {k: v[rows] for k, v in batch.items()}


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, mask: np.ndarray | None = None,
                   **more: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `batch_size` in order, the last padded with zeros; `mask` is 0 on padding.

  `mask` (shaped like `y`) can also zero real positions, e.g. past the end of a text. `more` are further
  arrays of the batch, with x's rows (seq2seq: 'source_mask', 'decoder_input').
  """
  mask = np.ones(y.shape, np.float32) if mask is None else mask
  for start in range(0, len(x), batch_size):
    batch = {k: v[start:start + batch_size] for k, v in dict(x=x, y=y, mask=mask, **more).items()}
    pad = batch_size - len(batch["x"])
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    yield batch


DIGITS_FILE = "digits.npz"  # package data beside this module: scikit-learn's 8x8 digits, as uint8


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits, bundled with jaxmodels: `images` float64 (1797, 8, 8) of values 0..16 and `target`
  int64 (1797,), the values and dtypes of `sklearn.datasets.load_digits()` (tests check them against it).

  Stored as uint8 in `digits.npz` (45 KB), so the core install needs no scikit-learn.
  """
  with importlib.resources.files(__package__).joinpath(DIGITS_FILE).open("rb") as fh, np.load(fh) as f:
    return f["images"].astype(np.float64), f["target"].astype(np.int64)


def load_digits(test_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """The bundled 8x8 digits (`digits()`, shipped with the package), scaled to [0, 1]."""
  images, target = digits()
  x = (images / 16.0).astype(np.float32)
  y = target.astype(np.int32)
  if not 0.0 < test_fraction < 1.0:
    raise UserError(f"data.test_fraction must lie in (0, 1), got {test_fraction}")
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  test, train = perm[:n_test], perm[n_test:]
  return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def existing_file(path: str, what: str) -> epath.Path:
  """`path` (local or gs://) when it is a file; UserError naming data.path for a missing path or a directory
  (`what` the file should be, e.g. "an .npz file")."""
  p = storage.path(path)
  if p.is_dir():
    raise UserError(f"data.path={path} is a directory, not {what}")
  if not p.is_file():
    raise UserError(f"data.path: file not found: {path}")
  return p


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The four arrays (NPZ_KEYS) of the .npz file at `path`; UserError for a missing path, a directory, a file that
  is not an .npz archive (or is unreadable), or a missing array."""
  if not path:
    raise UserError("data.source=npz needs data.path, the .npz file with x_train, y_train, x_test, y_test")
  existing_file(path, "an .npz file")
  try:
    with storage.path(path).open("rb") as fh:
      loaded = np.load(fh, allow_pickle=False)
      if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file holds one bare array
        raise UserError(f"{path}: one array (.npy), not an .npz archive of {', '.join(NPZ_KEYS)} "
                        f"(write one with np.savez)")
      with loaded as f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
          raise UserError(f"{path}: missing array {missing[0]!r} (found: {', '.join(f.files) or 'none'})")
        return {k: f[k] for k in NPZ_KEYS}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip, truncated, pickled, empty
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "allow_pickle" in reason:  # numpy's guess for any bytes that are not .npy/.npz: text, pickles, ...
      reason = "not a NumPy .npz archive"
    raise UserError(f"{path}: not a readable .npz file ({reason})") from None


INT32_MAX = np.iinfo(np.int32).max


def _labels(name: str, y: np.ndarray) -> np.ndarray:
  """Class labels as int32, checked before the cast: integral, non-negative and within int32."""
  if y.ndim != 1:
    raise UserError(f"{name} must be a 1-D array of class labels, got shape {y.shape} (set data.task to regress, "
                    f"or multilabel for 0/1 targets)")
  if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
    raise UserError(f"{name} must hold integer class labels, got dtype {y.dtype}")
  if np.issubdtype(y.dtype, np.floating):
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
      raise UserError(f"{name} must hold integer class labels, found {y[bad][0]} (float targets: set "
                      f"data.task=regress)")
  if (y < 0).any():
    raise UserError(f"{name} has a negative label ({y.min()}); labels must lie in [0, num_classes)")
  if y.max() > INT32_MAX:
    raise UserError(f"{name} has label {y.max()}, beyond int32: labels must be class indices 0..num_classes-1")
  return y.astype(np.int32)


def _examples(name: str, x: np.ndarray, spatial_dims: int | None, compute_dtype) -> np.ndarray:
  """Examples as float32, channels last; every value must be finite and within `compute_dtype`'s range."""
  if x.ndim < 2 or x.ndim > 4:
    raise UserError(f"{name} must have shape (N, L), (N, H, W) or either with a channel axis, got {x.shape}")
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
    raise UserError(f"{name} must hold real numbers, got dtype {x.dtype}")
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x)
    if bad.any():
      raise UserError(f"{name} contains NaN or inf ({int(bad.sum())} entries)")
  # Checked before the cast, which would turn values beyond the range into inf without an error.
  limit, largest = float(jnp.finfo(compute_dtype).max), max(abs(float(x.min())), abs(float(x.max())))
  if largest > limit:
    raise UserError(f"{name} has values up to {largest:.3g} in magnitude, beyond the {limit:.3g} that "
                    f"{jnp.dtype(compute_dtype).name} (model.dtype) holds: rescale the data")
  x = x.astype(np.float32)
  rank = x.ndim - 1
  dims = spatial_dims or {1: 1, 2: 2, 3: 2}[rank]
  if rank == dims:
    x = x[..., None]  # one channel
  elif rank != dims + 1:
    raise UserError(f"{name} has shape {x.shape}, which does not fit data.spatial_dims={dims}")
  return x


def infer_task(y: np.ndarray) -> str:
  """`data.task` when unset, where the labels leave no doubt: (N,) labels classify, (N, C) of 0/1 is multilabel.

  Anything else (float targets included, which may as well be damaged labels) goes to `_labels`, whose error
  names data.task.
  """
  if y.ndim == 2 and (np.issubdtype(y.dtype, np.number) or y.dtype == bool) and np.isin(y, (0, 1)).all():
    return "multilabel"
  return "classify"


def _targets(name: str, y: np.ndarray, task: str) -> np.ndarray:
  """Targets of a task other than classify, as float32 (multilabel, regress) or int32 0/1 (binary)."""
  if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == bool):
    raise UserError(f"{name} must hold numbers for data.task={task}, got dtype {y.dtype}")
  values = np.asarray(y, np.float64)
  if not np.all(np.isfinite(values)):
    raise UserError(f"{name} contains NaN or inf")
  if task == "regress":
    return y.astype(np.float32)
  expected = {"binary": 1, "multilabel": 2}[task]
  if y.ndim != expected or not np.isin(values, (0, 1)).all():
    shape = "(N,)" if task == "binary" else "(N, num_labels)"
    other = values[~np.isin(values, (0, 1))]
    found = f" and value {other[0]}" if len(other) else ""
    raise UserError(f"{name} must hold 0/1 labels of shape {shape} for data.task={task}, got shape {y.shape}{found}")
  return y.astype(np.int32 if task == "binary" else np.float32)


def validate_arrays(arrays: dict[str, np.ndarray], spatial_dims: int | None, compute_dtype="float32",
                    task: str = "") -> dict:
  """Checks and normalises the four arrays for `task` (inferred when empty, see `infer_task`); raises UserError
  naming the array and the problem.

  Rejects what would train without an error but mean nothing: empty splits, a single class, values the
  cast to float32 (x) or int32 (y), or the model's `compute_dtype`, would change, labels that do not fit the task.
  """
  task = task or infer_task(np.asarray(arrays["y_train"]))
  out = {"task": task}
  for split in ("train", "test"):
    xn, yn = f"x_{split}", f"y_{split}"
    x, y = np.asarray(arrays[xn]), np.asarray(arrays[yn])
    for name, a in ((xn, x), (yn, y)):
      if a.ndim == 0:
        raise UserError(f"{name} is a scalar ({a!r}), not an array of examples")
    if len(x) == 0:
      raise UserError(f"{xn} has zero examples")
    if len(x) != len(y):
      raise UserError(f"{xn} has {len(x)} examples but {yn} has {len(y)}")
    out[xn] = _examples(xn, x, spatial_dims, compute_dtype)
    out[yn] = _labels(yn, y) if task == "classify" else _targets(yn, y, task)
  if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
    raise UserError(f"x_train examples have shape {out['x_train'].shape[1:]} "
                    f"but x_test examples have shape {out['x_test'].shape[1:]}")
  if out["y_train"].shape[1:] != out["y_test"].shape[1:]:
    raise UserError(f"y_train targets have shape {out['y_train'].shape[1:]} "
                    f"but y_test targets have shape {out['y_test'].shape[1:]}")
  if task != "classify":
    out["num_classes"] = {"binary": 2, "multilabel": out["y_train"].shape[-1], "regress": 0}[task]
    return out
  present = np.unique(out["y_train"])
  if len(present) < 2:
    raise UserError(f"y_train holds one class ({present[0]}): a classifier needs examples of at least two")
  classes = int(present[-1]) + 1
  for yn in ("y_train", "y_test"):
    if out[yn].max() >= classes:
      raise UserError(f"{yn} has label {int(out[yn].max())}, out of range for {classes} classes "
                      f"(inferred from y_train)")
  out["num_classes"] = classes
  return out


def check_batch_size(batch_size: int, num_examples: int) -> None:
  if batch_size > num_examples:
    raise UserError(f"train.batch_size={batch_size} exceeds the {num_examples} training examples")


def load_digits_dataset(*, seed: int, test_fraction: float, task: str, spatial_dims: int | None,
                        compute_dtype) -> ArrayDataset:
  """`data.source=digits`: the bundled digits (`load_digits`), `test_fraction` held out by `seed`, checked as
  `validate_arrays` for `task` ("" infers it) and `compute_dtype` (model.dtype)."""
  arrays = load_digits(test_fraction, seed)
  return ArrayDataset(**validate_arrays(arrays, spatial_dims, compute_dtype, task), seed=seed)


def load_npz_dataset(*, path: str, seed: int, task: str, spatial_dims: int | None, compute_dtype) -> ArrayDataset:
  """`data.source=npz`: the arrays of the .npz file at `path` (`load_npz`), checked as `validate_arrays`; `seed`
  orders the training batches."""
  return ArrayDataset(**validate_arrays(load_npz(path), spatial_dims, compute_dtype, task), seed=seed)
