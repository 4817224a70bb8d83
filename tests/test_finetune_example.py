"""The worked example of docs/finetuning.md, in process and shortened: a small random Llama 3-style model written
by experiments/hf/make_tiny_llama.py is imported (its tokenizer and chat template kept for sampling), LoRA-fine-tuned
by experiments/finetune_lora.py on experiments/data/instructions.jsonl (only the adapters change), exported merged,
written back by export-hf, and loaded in `transformers` with jaxmodels' logits."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT

import jaxmodels
from jaxmodels.cli.main import main
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.hf.convert import export_hf, import_hf
from jaxmodels.runs.export import export, load_params, load_trained_params
from jaxmodels.tools.sample import load_chat

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", "hf", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(a directory holding experiments/ and exported/tiny-llama, the Hugging Face directory it came from)."""
  root = tmp_path_factory.mktemp("example")
  os.symlink(os.path.join(ROOT, "experiments"), root / "experiments")
  _script("make_tiny_llama").main(["--out", str(root / "tiny-llama-hf")])
  import_hf(str(root / "tiny-llama-hf"), str(root / "exported" / "tiny-llama"))
  return root, root / "tiny-llama-hf"


def test_import_keeps_the_tokenizer_and_chat_template_for_sampling(imported):
  root, hf_dir = imported
  out = str(root / "exported" / "tiny-llama")
  reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
  tok = Vocab.load(out)  # vocab.json
  text = "Reverse lemon. <|eot_id|>"
  assert tok.encode(text).tolist() == reference.encode(text, add_special_tokens=False)
  assert tok.eot == reference.eos_token_id
  messages = [{"role": "user", "content": "Reverse lemon."}]
  assert load_chat(out).render(messages, add_generation_prompt=True) == reference.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  samples = jaxmodels.sample(out, ["Reverse lemon."], chat=True, max_new_tokens=2, temperature=0)
  assert samples.prompts[0].startswith("<|begin_of_text|><|start_header_id|>user")


@pytest.fixture(scope="module")
def tuned(imported):
  """The root of `imported`, where runs/lora holds experiments/finetune_lora.py's run of 3 steps (its paths are
  relative, as in the docs: checkpoint.restore_from=exported/tiny-llama)."""
  root, _ = imported
  with pytest.MonkeyPatch.context() as m:
    m.chdir(root)
    assert main(["jaxmodels", "train", "--config", "experiments/finetune_lora.py", "--workdir", "runs/lora",
                 "--config.train.steps=3", "--config.train.eval_every=3"]) == 0
  return root


def test_lora_finetune_exports_what_transformers_computes(tuned, monkeypatch):
  root = tuned
  monkeypatch.chdir(root)
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  base, tuned = flat(load_params("exported/tiny-llama")), flat(load_trained_params("runs/lora", log=lambda _: None))
  adapters = {k for k in tuned if "lora_" in k}
  assert set(tuned) - adapters == set(base)
  assert all(np.array_equal(tuned[k], base[k]) for k in base)  # every base weight bit-identical
  assert any(np.abs(tuned[k]).max() > 0 for k in adapters if "lora_b" in k)  # the adapters (B starts at 0) trained
  export("runs/lora", "exported/lora")
  export_hf("exported/lora", "exported/lora-hf")
  assert _script("compare_hf_logits").logit_difference("exported/lora-hf", "exported/lora") < 1e-4
  # the tokenizer and token ids of the import the run started from are carried through
  assert transformers.AutoTokenizer.from_pretrained("exported/lora-hf").apply_chat_template(
      [{"role": "user", "content": "Hi"}], tokenize=False).startswith("<|begin_of_text|>")
  assert json.loads((root / "exported" / "lora-hf" / "config.json").read_text())["eos_token_id"] == 1


def test_export_hf_of_a_run_from_a_relative_import_from_another_directory_keeps_its_tokenizer(tuned, tmp_path,
                                                                                            monkeypatch, capsys):
  # The run saved restore_from as written ("exported/tiny-llama"): export-hf from elsewhere found no tokenizer
  # files and token ids, and said nothing.
  root = tuned
  saved = json.loads((root / "runs" / "lora" / "config.json").read_text())["checkpoint"]["restore_from"]
  assert saved == str(root / "exported" / "tiny-llama")
  monkeypatch.chdir(tmp_path)
  export_hf(str(root / "runs" / "lora"), "lora-hf")
  assert (tmp_path / "lora-hf" / "tokenizer.json").is_file()
  assert json.loads((tmp_path / "lora-hf" / "config.json").read_text())["eos_token_id"] == 1
  # a run saved before restore_from was made absolute, its import not found from here: a note, not silence
  old = export(str(root / "runs" / "lora"), "old-export")
  config = json.loads((tmp_path / old / "config.json").read_text())
  config["checkpoint"]["restore_from"] = "exported/tiny-llama"
  (tmp_path / old / "config.json").write_text(json.dumps(config))
  capsys.readouterr()
  export_hf(old, "old-hf")
  assert "restore_from='exported/tiny-llama', which is not found from here" in capsys.readouterr().out
  assert not (tmp_path / "old-hf" / "tokenizer.json").exists()


def test_export_hf_of_a_run_from_a_run_from_an_import_keeps_its_tokenizer(tuned, tmp_path):
  # A second fine-tuning (restore_from the first run, whose restore_from is the import): export-hf looked one
  # step back only, found no hf/ there, and wrote no tokenizer files or token ids without a word.
  root = tuned
  first = export(str(root / "runs" / "lora"), str(tmp_path / "first"))  # its config: restore_from the import
  second = export(str(root / "runs" / "lora"), str(tmp_path / "second"))
  config = json.loads((tmp_path / "second" / "config.json").read_text())
  config["checkpoint"]["restore_from"] = first
  (tmp_path / "second" / "config.json").write_text(json.dumps(config))
  export_hf(second, str(tmp_path / "second-hf"), log=print)
  assert (tmp_path / "second-hf" / "tokenizer.json").is_file()
  assert json.loads((tmp_path / "second-hf" / "config.json").read_text())["eos_token_id"] == 1
