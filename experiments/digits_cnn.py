"""A small CNN on scikit-learn's bundled 8x8 digits: the default experiment.

    python experiments/digits_cnn.py --workdir runs/digits_cnn
    jaxmodels train --config experiments/digits_cnn.py --workdir runs/digits_cnn

Expected: test accuracy 0.994 after 600 steps; about 10 s of training on a
2-core CPU.
"""

from jaxmodels.config import default_config


def get_config():
  config = default_config()
  config.model.family = "cnn"
  config.model.norm = "batch"
  config.train.steps = 600
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.weight_decay = 1e-4
  config.train.eval_every = 200
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
