"""Compares a Hugging Face directory's logits in `transformers` with a jaxmodels model's: the last step of the
worked example of docs/finetuning.md (a LoRA run, exported merged and written back by `export-hf`).

    python experiments/hf/compare_hf_logits.py --hf exported/tiny-llama-lora-hf --model exported/tiny-llama-lora

prints the largest absolute difference of the float32 logits of a batch of token ids (2 x 32, the same ids for
both) and exits 1 if it exceeds `--atol` (default 1e-4). Needs the `dev` extra's `torch` and `transformers`.
"""

import argparse
import sys

import numpy as np
import torch
import transformers

import jaxmodels


def logit_difference(hf_dir: str, model_path: str, seed: int = 0) -> float:
  """The largest |logit difference| between `transformers`' model of `hf_dir` and `jaxmodels.load_model(model_path)`
  on 2 x 32 random token ids drawn with `seed` (float32)."""
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ids = np.random.default_rng(seed).integers(0, hf.config.vocab_size, (2, 32))
  with torch.no_grad():
    expected = hf(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(jaxmodels.load_model(model_path)(ids.astype(np.int32)), np.float32)
  return float(np.abs(got - expected).max())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf", required=True, help="a Hugging Face directory (export-hf's --out)")
  parser.add_argument("--model", required=True, help="a jaxmodels export, import or run workdir")
  parser.add_argument("--atol", type=float, default=1e-4, help="the largest difference accepted")
  args = parser.parse_args(argv)
  diff = logit_difference(args.hf, args.model)
  print(f"largest logit difference, transformers vs jaxmodels: {diff:.2e} (accepted: {args.atol:g})")
  return int(not diff <= args.atol)


if __name__ == "__main__":
  sys.exit(main())
