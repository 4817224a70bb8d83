"""A character-level Transformer language model on the embedded corpus (Python stdlib source).

    python experiments/text_transformer.py --workdir runs/text_transformer
    jaxmodels sample --workdir runs/text_transformer --prompt "def " --length 200

Expected: validation loss 1.02 nats/char (perplexity 2.8, 1.48 bits/char) after
600 steps, against a unigram entropy of 3.09 nats/char for the corpus; about
105 s of training on a 2-core CPU (~150 ms/step, 13 K tokens/s).
"""

from jaxmodels.config import text_lm_config


def get_config():
  config = text_lm_config()  # text data, seq_len 64, 600 steps of batch 32 (see jaxmodels/config/defaults.py)
  config.model.family = "transformer"
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_model = 128
  config.model.d_ff = 512
  config.model.norm = "rms"
  # Keep only matmul outputs for the backward pass and recompute the rest: on the development CPU
  # the scanned stack's saved activations cost more memory traffic than recomputing them
  # (batch 12: 52.8 against 63.7 ms/step with remat=none; docs/benchmarks.md).
  config.model.remat = "dots"
  config.train.weight_decay = 0.1
  config.train.b2 = 0.95
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
