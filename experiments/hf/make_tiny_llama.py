"""Writes a small random Llama-3-style model, as a user would download one, for the worked example of
docs/finetuning.md: a `transformers.LlamaConfig` with Llama 3's `rope_scaling` (`rope_type` llama3), grouped-query
attention and untied embeddings (d_model 64, 2 layers), its random weights, and a byte-level BPE tokenizer trained
with the `tokenizers` library on experiments/data/instructions.jsonl, with Llama 3's special tokens and a Llama 3
chat template (written to chat_template.jinja, where transformers 5 saves a tokenizer's template). All saved with
`save_pretrained` (safetensors); nothing is downloaded; seeded, so the same directory every time.

    python experiments/hf/make_tiny_llama.py --out tiny-llama-hf

Needs the `dev` extra's `torch` and `transformers` (`pip install 'jaxmodels[dev]'`).
"""

import argparse
import json
import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "instructions.jsonl")
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
# Llama 3's template, without its system-prompt date lines and tool calls.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                 "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
VOCAB_SIZE = 300


def texts(path: str = DATA) -> list[str]:
  """The prompts, responses and message contents of the instruction file: the tokenizer's training text."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      out += [m["content"] for m in record.get("messages", [])] + [record.get("prompt", ""), record.get("response", "")]
  return [t for t in out if t]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE of VOCAB_SIZE ids (the 256 bytes, Llama 3's special tokens, merges) with the chat template."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts(), trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                              chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A random Llama 3-style causal LM over `tokenizer`'s vocabulary (float32)."""
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(config).eval()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the directory to write (config.json, model.safetensors, "
                      "tokenizer files)")
  parser.add_argument("--seed", type=int, default=0, help="the weights' torch seed")
  args = parser.parse_args(argv)
  tokenizer = make_tokenizer()
  model = make_model(tokenizer, args.seed)
  model.save_pretrained(args.out)
  tokenizer.save_pretrained(args.out)
  print(f"wrote {args.out}: Llama 3-style, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"vocabulary of {len(tokenizer)}, rope_type llama3")


if __name__ == "__main__":
  main()
