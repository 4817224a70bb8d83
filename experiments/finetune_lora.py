"""LoRA fine-tuning of a released model on instructions: the worked example of docs/finetuning.md.

The model is the one `jaxmodels import-hf` wrote to exported/tiny-llama (here the small random Llama 3-style model
of experiments/hf/make_tiny_llama.py; any Llama, Mistral, Qwen... import works the same): its `model.*` keys are
read from the import, so the run builds the imported architecture, starts from its weights
(`checkpoint.restore_from`) and tokenizes with its tokenizer and chat template (`data.tokenizer_path`, the import's
hf/ directory). Rank-8 LoRA adapters on every attention and MLP projection train; the base weights stay frozen.
The data are the 80 prompt/response pairs and conversations of experiments/data/instructions.jsonl, packed into
rows of 128 tokens, the loss on the responses only.

    python experiments/hf/make_tiny_llama.py --out tiny-llama-hf
    jaxmodels import-hf tiny-llama-hf --out exported/tiny-llama
    jaxmodels train --config experiments/finetune_lora.py --workdir runs/tiny-llama-lora
    jaxmodels sample --workdir runs/tiny-llama-lora --prompts experiments/data/prompts.jsonl --chat --length 8 --temperature 0 --stop "<|eot_id|>"

Expected: 16,384 of 128,832 parameters train (rank-8 LoRA, 13%); validation loss 4.88 nats/token on the responses
after 300 steps, from a first training loss of 5.71 (a uniform guess over the 300 ids is ln 300 = 5.70; the frozen
random base's small logits bound how far adapters alone bring it), response-token accuracy 0.66; about 12 s of
training on a 2-core CPU.
"""

import json

from jaxmodels.config import from_saved, text_lm_config
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

BASE = "exported/tiny-llama"  # the `jaxmodels import-hf ... --out` directory


def get_config():
  saved = storage.path(BASE) / "config.json"
  if not saved.is_file():
    raise UserError(f"{saved} not found: import the model first (jaxmodels import-hf DIR --out {BASE})")
  config = text_lm_config()
  config.model = from_saved(json.loads(saved.read_text(encoding="utf-8"))).model  # the imported architecture
  config.checkpoint.restore_from = BASE
  config.data.source = "sft"
  config.data.path = "experiments/data/instructions.jsonl"
  config.data.tokenizer_path = f"{BASE}/hf"  # its tokenizer.json and chat template
  config.data.seq_len = 128
  config.train.lora.rank = 8
  config.train.lora.targets = ("attn", "mlp")
  config.train.update(dict(steps=300, batch_size=8, learning_rate=3e-3, warmup_steps=30, log_every=50,
                           eval_every=100, eval_batch_size=8))
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
