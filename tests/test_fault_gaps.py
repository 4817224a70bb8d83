"""Gaps found verifying issue 30 on main: faults of the kinds it lists, in commands it did not try."""

import json
import os

import pytest
from flax import nnx

from jaxmodels.data.chat import load_chat_template
from jaxmodels.data.sft import read_jsonl
from jaxmodels.data.tokenizers import from_file
from jaxmodels.models import MLP
from jaxmodels.runs import export as export_lib
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import StorageError, UserError


def test_an_export_onto_a_full_disk_is_one_line_naming_out_and_leaves_nothing_half_written(tmp_path, tmpfs,
                                                                                             monkeypatch):
  # Old code: "cannot write the storage: No space left on device" (no path), and OUT left holding
  # params.orbax-checkpoint-tmp/. compress, import-hf and export-hf write OUT the same way (export.writing_out).
  model = MLP((8, 8, 1), 10, hidden_sizes=(256,), rngs=nnx.Rngs(0))  # 67 KB of float32 parameters
  monkeypatch.setattr(export_lib, "load_run_model", lambda workdir: model)  # the run's newest checkpoint
  full_disk = tmpfs(48)
  out = full_disk / "out"
  with pytest.raises(StorageError, match=f"^cannot write {out}: No space left on device$"):
    export_lib.export(str(tmp_path / "run"), str(out))
  assert os.listdir(full_disk) == []


def test_a_jsonl_line_that_is_not_utf8_is_named_and_one_holding_u2028_is_read(tmp_path):
  # Old code read the whole file as text: a UnicodeDecodeError traceback for one bad byte, and a line whose JSON
  # string holds a raw U+2028 (json.dumps(..., ensure_ascii=False) writes it so) cut in two: "not JSON".
  good = json.dumps({"prompt": "a\u2028b", "response": "c\x85d"}, ensure_ascii=False).encode()
  path = tmp_path / "train.jsonl"
  path.write_bytes(good + b"\n" + good + b"\r\n")
  assert read_jsonl(str(path)) == [{"prompt": "a\u2028b", "response": "c\x85d"}] * 2
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte order mark, as some editors write: read, not refused
  assert read_jsonl(str(path)) == [{"prompt": "a\u2028b", "response": "c\x85d"}]
  path.write_bytes(good + b'\n\n{"prompt": "\xff", "response": "x"}\n')
  with pytest.raises(UserError, match=rf"^{path} line 3: not UTF-8 text \(byte 12: b'\\xff'\)$"):
    read_jsonl(str(path))


def test_a_binary_file_given_as_a_tokenizer_or_chat_template_is_named_in_one_line(tmp_path):
  # Old code: a UnicodeDecodeError traceback (tokenizer.json, a .tiktoken file, a .jinja template or a tokenizer
  # directory's chat_template.jinja), or for tokenizer_config.json "not JSON (utf-8 codec can't decode ...)".
  binary = b"\x89PNG\r\n\x1a\n\x00"
  for name in ("tokenizer.json", "r50k.tiktoken", "template.jinja", "dir/chat_template.jinja"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(binary)
  for path, load in ((tmp_path / "tokenizer.json", from_file), (tmp_path / "r50k.tiktoken", from_file),
                     (tmp_path / "template.jinja", load_chat_template), (tmp_path / "dir", load_chat_template)):
    with pytest.raises(UserError, match=r" is not UTF-8 text \(byte 0: b'\\x89'\)$") as e:
      load(str(path))
    assert str(e.value).startswith(str(path))


def test_a_file_that_cannot_be_written_is_named_not_its_temporary_sibling(tmpfs):
  # `jaxmodels eval` on a read-only workdir said "cannot write RUN/.eval_20.json.tmp-1069-28c7c20b: ...".
  disk = tmpfs(64, read_only=True)
  with pytest.raises(StorageError, match=f"^cannot write {disk}/eval_20.json: Read-only file system$"):
    storage.write_files(disk, {"eval_20.json": "{}"})
