"""Image classification data kept as uint8 on the host: `data.source=images`.

`data.path` is a directory with one sub-directory of images per class (the
ImageNet layout: `train/` and `val/` (or `test/`, `validation/`) each holding
the class directories, or the class directories alone, split by
`data.test_fraction`), or an `.npz` of uint8 `x_train, y_train, x_test, y_test`.
Images are decoded (Pillow: the `images` extra) and augmented in grain worker processes
(`data.workers`, see jaxmodels.data.loader) and reach the device as uint8,
(B, S, S, C) with S = `data.image_size`; the train and eval steps scale them
to [0, 1] there (`jaxmodels.models.forward.model_input`), so the host moves a quarter of
float32's bytes.

Training (`data.augment`): a random resized crop (area CROP_SCALE, aspect
CROP_RATIO of the image) and a horizontal flip with probability 1/2, drawn from
`default_rng([seed, step, row])`: a pure function of (seed, step, row), so
resume is exact. Without augmentation, and for evaluation: the central
EVAL_CROP of the image (its shorter side), resized to S. Example order is the
epoch-wise seeded shuffle of the array datasets.
"""

import dataclasses
import functools
import math
from typing import Iterator

import numpy as np
from etils import epath

from jaxmodels.data import loader
from jaxmodels.data.arrays import (
  ALL_ROWS,
  Rows,
  check_batch_size,
  load_npz,
  validate_arrays,
)
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CROP_RATIO", "CROP_SCALE", "decode", "EVAL_CROP", "FEATURE", "IMAGE_EXTENSIONS", "ImageDataset",
           "ImageLoader", "load_image_dataset", "TEST_SPLITS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TEST_SPLITS = ("val", "validation", "test")
CROP_SCALE = (0.25, 1.0)  # share of the image's area a training crop covers
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio
FEATURE = "data.source=images"  # what needs Pillow (jaxmodels.runtime.extras)
EVAL_CROP = 0.875  # share of the shorter side an evaluation centre crop keeps (ImageNet's 224 of 256)


@dataclasses.dataclass(frozen=True)
class ImageLoader:
  """What a worker process needs to make batches: paths (str) or uint8 images, labels, sizes. Pickles."""

  x_train: np.ndarray  # (N,) paths, or (N, H, W, C) uint8
  y_train: np.ndarray  # (N,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  size: int  # side S of the square images the model sees
  channels: int  # 1 (grey) or 3 (RGB)
  augment: bool
  seed: int

  def image(self, x) -> "PIL.Image.Image":  # noqa: F821
    """Example `x` (a path or a uint8 array) as a PIL image of `channels`; UserError naming a file that does not
    decode (raised in a worker process, it reaches the training process as it is)."""
    Image = extras.require("PIL.Image", FEATURE)  # pylint: disable=invalid-name
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
      return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    return decode(str(x)).convert("L" if self.channels == 1 else "RGB")

  def crop(self, img, rng: np.random.Generator | None) -> np.ndarray:
    """(S, S, C) uint8: a random resized crop and flip (rng given) or the centre crop, resized to S."""
    Image = extras.require("PIL.Image", FEATURE)  # pylint: disable=invalid-name
    w, h = img.size
    flip = False
    if rng is None:
      side = EVAL_CROP * min(w, h)
      box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
      area = w * h * rng.uniform(*CROP_SCALE)
      ratio = math.exp(rng.uniform(*np.log(CROP_RATIO)))
      cw, ch = min(w, math.sqrt(area * ratio)), min(h, math.sqrt(area / ratio))
      x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      box, flip = (x0, y0, x0 + cw, y0 + ch), rng.random() < 0.5
    out = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
    if flip:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8).reshape(self.size, self.size, self.channels)


def decode(path: str) -> "PIL.Image.Image":  # noqa: F821
  """The image file at `path`, decoded whole; UserError naming the file when it is unreadable or does not decode
  (not an image, truncated, damaged data, a decompression bomb)."""
  Image = extras.require("PIL.Image", FEATURE)  # pylint: disable=invalid-name
  try:
    with storage.path(path).open("rb") as f:
      img = Image.open(f)
      img.load()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoders raise these
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{path}: not a readable image ({reason}); remove or replace it") from None
  return img


def _train_batch(loader_: ImageLoader, batch_size: int, rows: np.ndarray, step: int) -> dict[str, np.ndarray]:
  """Rows `rows` of the global training batch of `step`: a module function, so grain's workers can pickle it."""
  n = len(loader_.x_train)
  epoch, i = divmod(step, n // batch_size)
  idx = np.random.default_rng([loader_.seed, epoch]).permutation(n)[i * batch_size:(i + 1) * batch_size][rows]
  x = np.stack([loader_.crop(loader_.image(loader_.x_train[j]),
                             np.random.default_rng([loader_.seed, step, int(r)]) if loader_.augment else None)
                for j, r in zip(idx, rows)])
  return {"x": x, "y": loader_.y_train[idx]}


def _eval_batch(loader_: ImageLoader, batch_size: int, rows: np.ndarray, b: int) -> dict[str, np.ndarray]:
  """Rows `rows` of test batch `b`, zero-padded past the end (mask 0)."""
  index = b * batch_size + rows
  real = index < len(loader_.x_test)
  x = np.zeros((len(rows), loader_.size, loader_.size, loader_.channels), np.uint8)
  y = np.zeros(len(rows), np.int32)
  for r in np.flatnonzero(real):
    x[r] = loader_.crop(loader_.image(loader_.x_test[index[r]]), None)
    y[r] = loader_.y_test[index[r]]
  return {"x": x, "y": y, "mask": real.astype(np.float32)}


@dataclasses.dataclass
class ImageDataset:
  """Images as uint8 (B, S, S, C) batches, labels int32 (B,); see the module docstring."""

  task = "classify"

  loader: ImageLoader
  num_classes: int
  workers: int  # grain worker processes (0: the training process, with a prefetch thread)
  source: str
  _stream: tuple = (None, None)  # (batch size, rows) -> loader.StepStream of training batches

  @property
  def x_train(self) -> np.ndarray:
    return self.loader.x_train

  @property
  def input_shape(self) -> tuple[int, ...]:
    return (self.loader.size, self.loader.size, self.loader.channels)

  @property
  def num_outputs(self) -> int:
    return self.num_classes

  def describe(self) -> str:
    augment = "random resized crops and flips" if self.loader.augment else "no augmentation"
    return (f"{self.source}: {len(self.loader.x_train)} train / {len(self.loader.x_test)} test images as "
            f"{self.input_shape} uint8, {self.num_classes} classes, {augment}, {self.workers} worker processes")

  def files(self) -> dict[str, str]:
    return {}

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch for `step`; consecutive steps come from grain's workers, made ahead."""
    check_batch_size(batch_size, len(self.loader.x_train))
    rows = np.arange(batch_size)[rows]
    key = (batch_size, rows.tobytes())
    if self._stream[0] != key:
      if self._stream[1] is not None:
        self._stream[1].close()
      fn = functools.partial(_train_batch, self.loader, batch_size, rows)
      self._stream = (key, loader.StepStream(fn, self.workers))
    return self._stream[1].get(step)

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Centre-cropped test batches (rows `rows` of each), padding masked; the same count on every process."""
    rows = np.arange(batch_size)[rows]
    fn = functools.partial(_eval_batch, self.loader, batch_size, rows)
    return loader.in_order(fn, math.ceil(len(self.loader.x_test) / batch_size), self.workers)


def _class_dirs(directory: epath.Path) -> dict[str, list[str]]:
  """class name -> sorted image paths, for each sub-directory holding images."""
  out = {}
  for d in sorted(p for p in directory.iterdir() if p.is_dir()):
    files = sorted(str(f) for f in d.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS))
    if files:
      out[d.name] = files
  return out


def _folder(path: str, test_fraction: float, seed: int) -> tuple[dict, list[str]]:
  root = storage.path(path)
  split_dirs = {p.name: p for p in root.iterdir() if p.is_dir()}
  test_name = next((n for n in TEST_SPLITS if n in split_dirs), None)
  if "train" in split_dirs and test_name:
    train, test = _class_dirs(split_dirs["train"]), _class_dirs(split_dirs[test_name])
    classes = sorted(train)
    unknown = sorted(set(test) - set(train))
    if unknown:
      raise UserError(f"{path}/{test_name} has classes that {path}/train lacks: {', '.join(unknown[:5])}")
    arrays = {}
    for split, found in (("train", train), ("test", test)):
      pairs = [(f, classes.index(c)) for c in sorted(found) for f in found[c]]
      arrays[f"x_{split}"] = np.array([f for f, _ in pairs], dtype=object)
      arrays[f"y_{split}"] = np.array([y for _, y in pairs], np.int32)
    return arrays, classes
  found = _class_dirs(root)
  classes = sorted(found)
  pairs = [(f, i) for i, c in enumerate(classes) for f in found[c]]
  if not pairs:
    raise UserError(f"{path} holds no class sub-directories of images ({', '.join(IMAGE_EXTENSIONS)}), nor "
                    f"train/ and val/ directories of them")
  perm = np.random.default_rng(seed).permutation(len(pairs))
  n_test = int(round(len(pairs) * test_fraction))
  x = np.array([f for f, _ in pairs], dtype=object)
  y = np.array([c for _, c in pairs], np.int32)
  return {"x_train": x[perm[n_test:]], "y_train": y[perm[n_test:]], "x_test": x[perm[:n_test]],
          "y_test": y[perm[:n_test]]}, classes


def load_image_dataset(*, path: str, seed: int, test_fraction: float, image_size: int, augment: bool,
                       workers: int) -> ImageDataset:
  """`data.source=images`: the images at `path` (a directory of class folders, or an .npz), `test_fraction` of a
  folder without train/ and val/ held out by `seed`, as `image_size` crops (0: the first image's shorter side),
  `augment`ed, decoded by `workers` processes.

  Raises UserError for a missing path, no images, empty splits, one class, an npz whose images are not uint8, or
  an unreadable first image. The other files are decoded when a batch first needs them: one that does not decode
  stops the run then, with a UserError naming it (`decode`); checking each at load would read the whole dataset.
  """
  extras.check("PIL", FEATURE)
  if not path:
    raise UserError("data.source=images needs data.path: a directory of class sub-directories, or an .npz of uint8 "
                    "images")
  if path.endswith(".npz"):
    arrays = load_npz(path)
    for k in ("x_train", "x_test"):
      if arrays[k].dtype != np.uint8 or arrays[k].ndim not in (3, 4):
        raise UserError(f"{k} must hold uint8 images (N, H, W[, C]), got {arrays[k].dtype} {arrays[k].shape} "
                        f"(data.source=npz takes other arrays)")
    # Labels, lengths and classes are checked as for data.source=npz, with a one-byte stand-in for each image.
    stand_ins = {k: np.zeros((len(arrays[k]), 1), np.uint8) for k in ("x_train", "x_test")}
    checked = validate_arrays({**arrays, **stand_ins}, None)
    x_train, x_test = (a if a.ndim == 4 else a[..., None] for a in (arrays["x_train"], arrays["x_test"]))
    num_classes, channels, size = checked["num_classes"], x_train.shape[-1], image_size or min(x_train.shape[1:3])
    y_train, y_test = checked["y_train"], checked["y_test"]
  else:
    if not storage.path(path).is_dir():
      raise UserError(f"data.path: not a directory or .npz file: {path}")
    arrays, classes = _folder(path, test_fraction, seed)
    x_train, x_test, y_train, y_test = arrays["x_train"], arrays["x_test"], arrays["y_train"], arrays["y_test"]
    if len(classes) < 2:
      raise UserError(f"{path} holds one class ({classes[0]}): a classifier needs at least two")
    if not len(x_test):
      raise UserError(f"{path}: the test split is empty")
    num_classes = len(classes)
    first = decode(x_train[0])
    channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3
    size = image_size or min(first.size)
  loader_ = ImageLoader(x_train, y_train, x_test, y_test, size, channels, augment, seed)
  return ImageDataset(loader_, num_classes, workers, path)
