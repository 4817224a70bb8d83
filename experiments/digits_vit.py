"""A small Vision Transformer on the bundled 8x8 digits: 2x2 patches (16 tokens) and a class token.

    python experiments/digits_vit.py --workdir runs/digits_vit

The blocks are the paper's (gelu MLP, biases, LayerNorm); `--config.model.preset=vit-s16` gives ViT-S/16
for 224x224 images. Expected: test accuracy 0.981 (0.969 at step 300) after 600 steps; about 12 s of training
on a 2-core CPU.
"""

from jaxmodels.config import default_config


def get_config():
  config = default_config()
  config.model.family = "vit"
  config.model.patch_size = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.d_ff = 128
  config.model.mlp = "gelu"
  config.model.use_bias = True
  config.model.pooling = "cls"
  config.train.steps = 600
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 60
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0
  config.train.eval_every = 300
  return config


if __name__ == "__main__":
  from jaxmodels.cli import run_experiment
  run_experiment(__file__)
