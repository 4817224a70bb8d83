"""Flax NNX model families. Research code imports them directly:

    from jaxmodels.models import CNN, MLP, TransformerLM, RecurrentLM

Every module takes a compute `dtype` and a `param_dtype` and is called as
`model(x, train=..., rngs=...)`, where `rngs` (an `nnx.Rngs` with a `dropout`
stream) is needed only when training with dropout. Language models also have
`init_cache(batch, length)` and `decode(tokens, cache, index)` for compiled
sampling. `build_model` makes one from the `model.*` config group.
"""

import jax.numpy as jnp
from flax import nnx

from jaxmodels.errors import UserError
from jaxmodels.models.cnn import CNN
from jaxmodels.models.mlp import MLP
from jaxmodels.models.recurrent import RecurrentClassifier, RecurrentLM
from jaxmodels.models.transformer import TransformerClassifier, TransformerLM

TASKS = ("classify", "lm")


def build_model(model_config, input_shape, num_outputs: int, rngs: nnx.Rngs, task: str = "classify",
                axis_name: str | None = None):
  """The module named by `model.family` for `task`, sized for `input_shape` and `num_outputs`.

  For "lm", `input_shape` is (seq_len,) and `num_outputs` the vocabulary size.
  `axis_name` (the pmap strategy) makes BatchNorm average its statistics over that axis.
  """
  m = model_config
  dtypes = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
  if task == "lm":
    if m.family == "transformer":
      if input_shape[0] > m.max_len:
        raise UserError(f"data.seq_len={input_shape[0]} exceeds model.max_len={m.max_len}")
      return TransformerLM(num_outputs, m, **dtypes)
    if m.family == "lstm":
      return RecurrentLM(num_outputs, m.cell, m.hidden_size, m.num_layers, dropout=m.dropout, **dtypes)
    raise UserError(f"model.family={m.family!r} is not a language model: use transformer or lstm for text")
  common = dict(activation_name=m.activation, dropout=m.dropout, **dtypes)
  if m.family == "mlp":
    return MLP(input_shape, tuple(m.hidden_sizes), num_outputs, **common)
  if m.family == "cnn":
    return CNN(input_shape, tuple(m.features), tuple(m.kernel_sizes), tuple(m.strides), num_outputs,
               head_sizes=tuple(m.head_sizes), pool=m.pool, norm=m.norm, axis_name=axis_name, **common)
  if m.family == "transformer":
    return TransformerClassifier(input_shape, num_outputs, m, **dtypes)
  if m.family == "lstm":
    return RecurrentClassifier(input_shape, num_outputs, m.cell, m.hidden_size, m.num_layers, pooling=m.pooling,
                               bidirectional=m.bidirectional, dropout=m.dropout, **dtypes)
  raise UserError(f"model.family={m.family!r} is not a known family")


__all__ = ["CNN", "MLP", "RecurrentClassifier", "RecurrentLM", "TransformerClassifier", "TransformerLM",
           "build_model"]
