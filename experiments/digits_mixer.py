"""Your own module through the command line: an MLP-Mixer (experiments/modules/mixer.py) on the bundled digits.

    jaxmodels train --config experiments/digits_mixer.py --workdir runs/digits_mixer --config.model.depth=3

`set_family` names the module by import path and adds its Config's fields as model.* keys, which the lines after
it and the command line set. Expected: test accuracy 0.972 after 600 steps (depth 2); about 70 s of training on a
loaded 2-core CPU.
"""

from jaxmodels.config import default_config, set_family


def get_config():
  config = default_config()
  set_family(config, "experiments.modules.mixer:Mixer")  # importable from the repository root
  config.model.hidden = 64
  config.train.steps = 600
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.weight_decay = 1e-4
  config.train.eval_every = 200
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
