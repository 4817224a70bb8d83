"""Gaps found verifying issue 30 on main: faults of the kinds it lists, in commands it did not try."""

import os
import subprocess

import pytest
from conftest import experiment

from jaxmodels.runs.export import export
from jaxmodels.runtime.errors import StorageError
from jaxmodels.train.loop import train_and_evaluate


@pytest.fixture
def full_disk(tmp_path):
  """A 48 KiB tmpfs: too small for any export (root ignores permission bits, so a mount is the way to refuse)."""
  target = tmp_path / "disk"
  target.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(target)],
                                         capture_output=True, check=False).returncode:
    pytest.skip("needs permission to mount a tmpfs")
  yield target
  subprocess.run(["umount", str(target)], check=False)


def test_an_export_onto_a_full_disk_is_one_line_naming_out_and_leaves_nothing_half_written(tmp_path, full_disk):
  # Old code: "cannot write the storage: No space left on device" (no path), and OUT left holding
  # params.orbax-checkpoint-tmp/. compress, import-hf and export-hf write OUT the same way.
  config = experiment("digits_mlp")
  config.train.steps, config.train.warmup_steps, config.train.eval_every = 1, 0, 1
  train_and_evaluate(config, str(tmp_path / "run"))
  out = full_disk / "out"
  with pytest.raises(StorageError, match=f"^cannot write {out}: No space left on device$"):
    export(str(tmp_path / "run"), str(out))
  assert os.listdir(full_disk) == []
