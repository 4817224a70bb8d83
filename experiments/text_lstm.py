"""A character-level LSTM language model on the embedded corpus (Python stdlib source).

    python experiments/text_lstm.py --workdir runs/text_lstm
    jaxmodels sample --workdir runs/text_lstm --prompt "def " --length 200

Expected: validation loss 1.18 nats/char (perplexity 3.3, 1.71 bits/char) after
600 steps, against a unigram entropy of 3.09 nats/char for the corpus; about
90 s of training on a 2-core CPU (140 ms/step).
"""

from jaxmodels.config import text_lm_config


def get_config():
  config = text_lm_config()  # text data, seq_len 64, 600 steps of batch 32 (see jaxmodels/config/defaults.py)
  config.model.family = "lstm"
  config.model.cell = "lstm"
  config.model.num_layers = 2
  config.model.hidden_size = 256
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
