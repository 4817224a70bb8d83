"""A small ResNet (v1.5 basic blocks, small-image stem) on the bundled 8x8 digits.

    python experiments/digits_resnet.py --workdir runs/digits_resnet

Three stages of one basic block each (16, 32, 64 channels; 8x8 -> 4x4 -> 2x2), BatchNorm.
For CIFAR-style 32x32 images use --config.model.preset=resnet18 --config.model.stem=small.
Expected: test accuracy 1.000 (0.994 at step 200) after 400 steps; about 17 s of training on a 2-core CPU.
"""

from jaxmodels.config import default_config


def get_config():
  config = default_config()
  config.model.family = "resnet"
  config.model.stem = "small"
  config.model.stage_sizes = (1, 1, 1)
  config.model.width = 16
  config.train.steps = 400
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 40
  config.train.weight_decay = 1e-4
  config.train.eval_every = 200
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
