"""An LSTM classifier reading each 8x8 digit as a sequence of 8 rows of 8 pixels.

    python experiments/digits_lstm.py --workdir runs/digits_lstm

Expected: test accuracy 0.983 after 1000 steps; about 5 s of training on a 2-core CPU.
"""

from jaxmodels.config import default_config


def get_config():
  config = default_config()
  config.model.family = "lstm"
  config.model.cell = "lstm"
  config.model.num_layers = 1
  config.model.hidden_size = 128
  config.model.pooling = "last"
  config.train.steps = 1000
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.grad_clip = 1.0
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
