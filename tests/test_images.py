"""Image datasets (data.source=images): class folders and uint8 npz, augmentation as a function of (seed, step, row)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, experiment
from etils import epath
from PIL import Image
from sklearn.datasets import load_digits

from jaxmodels.bench.timing import abstract_args
from jaxmodels.data import load_dataset, load_dataset_from_config
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.experiment import build_experiment
from jaxmodels.train.loop import train_and_evaluate


def write_digit_pngs(root, per_class: int | None = None, size: int = 16) -> None:
  """scikit-learn's digits as `size`-pixel greyscale PNGs in one sub-directory per class."""
  digits = load_digits()
  counts = {}
  for i, (img, y) in enumerate(zip(digits.images, digits.target)):
    if per_class is not None and counts.get(y, 0) >= per_class:
      continue
    counts[y] = counts.get(y, 0) + 1
    os.makedirs(os.path.join(root, str(y)), exist_ok=True)
    Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR).save(
        os.path.join(root, str(y), f"{i:04d}.png"))


def images_config(path, **data):
  c = experiment("digits_cnn")
  c.data.source, c.data.path, c.data.workers = "images", str(path), 0
  for k, v in data.items():
    c.data[k] = v
  return c


def test_folder_batches_are_uint8_and_a_function_of_seed_step_and_row(tmp_path):
  write_digit_pngs(tmp_path, per_class=6)
  ds = load_dataset_from_config(images_config(tmp_path, image_size=12))
  assert ds.input_shape == (12, 12, 1) and ds.num_classes == 10 and len(ds.x_train) == 48
  b = ds.train_batch(5, 8)
  assert b["x"].dtype == np.uint8 and b["x"].shape == (8, 12, 12, 1) and b["y"].dtype == np.int32
  again = load_dataset_from_config(images_config(tmp_path, image_size=12))
  np.testing.assert_array_equal(again.train_batch(5, 8)["x"], b["x"])  # a fresh dataset: the same crops
  part = again.train_batch(5, 8, np.array([2, 7]))  # a process's own rows: the same crops as in the whole batch
  np.testing.assert_array_equal(part["x"], b["x"][[2, 7]])
  assert not np.array_equal(ds.train_batch(6, 8)["x"], b["x"])
  plain = load_dataset_from_config(images_config(tmp_path, image_size=12, augment=False))
  np.testing.assert_array_equal(plain.train_batch(5, 8)["y"], b["y"])  # same examples, crops differ
  assert not np.array_equal(plain.train_batch(5, 8)["x"], b["x"])
  batches = list(ds.eval_batches(5))
  assert sum(int(x["mask"].sum()) for x in batches) == 12 and len(batches) == 3
  assert sorted(np.concatenate([x["y"][x["mask"] == 1] for x in batches]).tolist()) == sorted(ds.loader.y_test)


def test_uint8_npz_images_and_the_step_takes_bytes(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (40, 10, 10, 3), np.uint8), "y_train": np.arange(40) % 4,
            "x_test": rng.integers(0, 256, (8, 10, 10, 3), np.uint8), "y_test": np.arange(8) % 4}
  np.savez(tmp_path / "img.npz", **arrays)
  c = images_config(tmp_path / "img.npz", image_size=8)
  c.train.batch_size = 8
  exp = build_experiment(c)
  assert exp.dataset.input_shape == (8, 8, 3) and exp.dataset.num_classes == 4
  state, batch = abstract_args(exp)
  assert batch["x"].dtype == np.uint8
  assert "ui8" in exp.train_step.lower(state, batch).as_text()  # scaled to float32 on the device
  np.savez(tmp_path / "float.npz", **{**arrays, "x_train": arrays["x_train"].astype(np.float32)})
  with pytest.raises(UserError, match="x_train must hold uint8 images"):
    load_dataset_from_config(images_config(tmp_path / "float.npz"))


def test_bad_image_folders(tmp_path):
  (tmp_path / "only").mkdir()
  Image.new("L", (4, 4)).save(tmp_path / "only" / "a.png")
  with pytest.raises(UserError, match="holds one class"):
    load_dataset_from_config(images_config(tmp_path))
  with pytest.raises(UserError, match="holds no class sub-directories of images"):
    load_dataset_from_config(images_config(tmp_path / "only"))


def damage(png) -> None:
  """Zeroes 40 bytes of a PNG's image data: its header still opens, its pixels do not decode."""
  raw = png.read_bytes()
  png.write_bytes(raw[:60] + bytes(40) + raw[100:])


def test_an_image_that_does_not_decode_is_named_in_training_and_evaluation(tmp_path):
  write_digit_pngs(tmp_path, per_class=4)
  ds = load_dataset("images", path=str(tmp_path), workers=0, test_fraction=0.5, seed=1)
  bad_train, bad_test = ds.loader.x_train[-1], ds.loader.x_test[0]  # x_train[0] decoded at load: it is fine
  for bad in (bad_train, bad_test):
    damage(epath.Path(bad))
  with pytest.raises(UserError, match=rf"{bad_train}: not a readable image \(.*\); remove or replace it"):
    for step in range(10):  # 20 training images, batches of 8: every one within 10 steps
      ds.train_batch(step, 8)
  with pytest.raises(UserError, match=rf"{bad_test}: not a readable image \(.*\); remove or replace it"):
    list(ds.eval_batches(4))


def test_a_corrupt_image_among_300_stops_a_run_with_workers_in_one_line(tmp_path):
  write_digit_pngs(tmp_path / "d", per_class=30)
  bad = tmp_path / "d" / "3" / sorted(os.listdir(tmp_path / "d" / "3"))[5]
  damage(bad)
  r = subprocess.run([sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/digits_cnn.py",
                      f"--workdir={tmp_path / 'run'}", "--config.data.source=images",
                      f"--config.data.path={tmp_path / 'd'}", "--config.data.workers=2", "--config.train.steps=40", "--config.train.batch_size=64",
                      "--config.train.warmup_steps=2", "--config.train.eval_every=40"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2, r.stderr[-3000:]
  # One line, no worker traceback, no shared memory left behind by the workers.
  assert r.stderr.strip() == (f"jaxmodels: error: {bad}: not a readable image (broken data stream when reading "
                              f"image file); remove or replace it"), r.stderr[-3000:]


@pytest.mark.slow
def test_digit_pngs_train_to_095_with_worker_processes_and_augmentation(tmp_path):
  write_digit_pngs(tmp_path / "digits")
  c = images_config(tmp_path / "digits", workers=2, augment=True)
  c.train.update(steps=500, log_every=100, eval_every=500)
  final = train_and_evaluate(c, str(tmp_path / "run"))
  assert final["accuracy"] >= 0.95, final
  ds = load_dataset_from_config(images_config(tmp_path / "digits", workers=2))
  in_process = load_dataset_from_config(images_config(tmp_path / "digits", workers=0))
  for step in (7, 8, 3):  # from the workers' stream, in order and after a jump: the batches of one process
    np.testing.assert_array_equal(ds.train_batch(step, 16)["x"], in_process.train_batch(step, 16)["x"])
