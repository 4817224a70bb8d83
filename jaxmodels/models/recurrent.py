"""LSTM and GRU families: a character language model and a sequence classifier.

Cells come from Flax NNX (`OptimizedLSTMCell`, `GRUCell`, for their parameters
and initialisers); the time loop is a `jax.lax.scan`, never a Python loop over
time steps, with the input projection of all steps hoisted out of it (`run_cell`). Layers are a Python list
(layer 0 reads the input width, the rest the hidden width), each optionally
bidirectional in the classifier. Shape suffixes: B batch, T time, F input
features, H hidden size, V vocabulary, K classes. Under a mesh the inputs,
carries, each layer's outputs and the logits are pinned to the batch's
sharding (`jaxmodels.parallel.constrain`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels.models.layers import POSITIVE, RATE, check_indices, choice, require, resolve
from jaxmodels.parallel.sharding import constrain

__all__ = ["BATCH", "cell_step", "CELLS", "LENGTH", "LSTMConfig", "make_cell", "POOLINGS", "recurrent_param_count",
           "RecurrentClassifier", "RecurrentLM", "RecurrentStack", "run_cell", "zero_carry"]

BATCH, LENGTH = "activation_batch", "activation_length"

CELLS = {"lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell}
POOLINGS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """LSTM or GRU layers (language model or classifier); raises ValueError naming the first bad field."""

  cell: str = "lstm"  # lstm | gru
  hidden_size: int = 256  # H, each direction's state width
  num_layers: int = 2  # stacked recurrent layers
  bidirectional: bool = False  # classifier only: a backward direction too, outputs concatenated
  pooling: str = "mean"  # classifier: last (final states) | mean (over time)
  dropout: float = 0.0  # between layers and before the head, in training only

  def __post_init__(self):
    choice(self, "cell", CELLS)
    require(self, "hidden_size", POSITIVE)
    require(self, "num_layers", POSITIVE)
    require(self, "bidirectional", (lambda v: isinstance(v, bool), "True or False"))
    choice(self, "pooling", POOLINGS)
    require(self, "dropout", RATE)


def make_cell(kind, in_features, hidden, dtype, param_dtype, rngs):
  return CELLS[kind](in_features, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def cell_step(cell, carry, xw_BG):
  """One time step of `cell` given its input projection `xw_BG` = cell.dense_i(x_BF); returns (carry, y_BH).

  The gate math of flax's OptimizedLSTMCell and GRUCell, written out because
  their `__call__` projects the input inside the step: here the projection of
  every time step is one matmul before the scan (`run_cell`), and only the
  recurrent matmul stays in the loop. Parameters (dense_i, dense_h) are the
  cells' own, so their names and shapes are unchanged.
  """
  if isinstance(cell, nnx.OptimizedLSTMCell):
    c_BH, h_BH = carry
    i, f, g, o = jnp.split(xw_BG + cell.dense_h(h_BH), 4, axis=-1)
    c_BH = cell.gate_fn(f) * c_BH + cell.gate_fn(i) * cell.activation_fn(g)
    h_BH = cell.gate_fn(o) * cell.activation_fn(c_BH)
    return (c_BH, h_BH), h_BH
  h_BH = carry
  xr, xz, xn = jnp.split(xw_BG, 3, axis=-1)
  hr, hz, hn = jnp.split(cell.dense_h(h_BH), 3, axis=-1)
  r, z = cell.gate_fn(xr + hr), cell.gate_fn(xz + hz)
  n = cell.activation_fn(xn + r * hn)
  h_BH = (1.0 - z) * n + z * h_BH
  return h_BH, h_BH


def run_cell(cell, carry, x_BTF, reverse=False):
  """Scans `cell` over time; returns (final carry, outputs_BTH).

  The input projection of all T steps is one (T*B, F) x (F, G) matmul ahead of
  the scan (G = 4H for an LSTM, 3H for a GRU), for training and decoding's
  prefill alike; each scan step does only the (B, H) x (H, G) recurrent matmul.
  """
  def step(c, xw_BG):
    c, y_BH = cell_step(cell, c, xw_BG)
    return jax.tree.map(lambda a: constrain(a, (BATCH,)), c), constrain(y_BH, (BATCH,))
  carry = jax.tree.map(lambda a: constrain(a, (BATCH,)), carry)
  x_TBF = jnp.swapaxes(x_BTF, 0, 1)
  T, B, F = x_TBF.shape
  xw_TBG = cell.dense_i(x_TBF.reshape(T * B, F)).reshape(T, B, -1)  # 2-D: one plain matmul, also in the backward
  carry, y_TBH = jax.lax.scan(step, carry, xw_TBG, reverse=reverse)
  return carry, constrain(jnp.swapaxes(y_TBH, 0, 1), (BATCH, LENGTH))


def zero_carry(kind, batch_size, hidden, dtype):
  """The zero initial state: (c, h) for an LSTM, h for a GRU, in the compute dtype."""
  h = jnp.zeros((batch_size, hidden), dtype)
  return (h, h) if kind == "lstm" else h


class RecurrentStack(nnx.Module):
  """`num_layers` recurrent layers with dropout between them; optional backward direction."""

  def __init__(self, cell, in_features, hidden_size, num_layers, *, bidirectional=False, dropout=0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    width = 2 * hidden_size if bidirectional else hidden_size
    ins = [in_features] + [width] * (num_layers - 1)
    self.forward = nnx.List([make_cell(cell, i, hidden_size, dtype, param_dtype, rngs) for i in ins])
    self.backward = (nnx.List([make_cell(cell, i, hidden_size, dtype, param_dtype, rngs) for i in ins])
                     if bidirectional else None)
    self.dropout = nnx.Dropout(dropout)
    self.cell, self.hidden_size, self.dtype = cell, hidden_size, dtype

  def init_carry(self, batch_size: int):
    """Per-layer zero carries of the forward cells (what a language model carries while decoding)."""
    return [zero_carry(self.cell, batch_size, self.hidden_size, self.dtype) for _ in self.forward]

  def __call__(self, x_BTF, carries=None, rngs=None):
    """Returns (outputs_BTH of the last layer, final forward carries, final backward carries or None)."""
    B = x_BTF.shape[0]
    carries = carries if carries is not None else self.init_carry(B)
    new_fwd, new_bwd = [], []
    for i, cell in enumerate(self.forward):
      if i:
        x_BTF = self.dropout(x_BTF, deterministic=rngs is None, rngs=rngs)
      carry, y_BTH = run_cell(cell, carries[i], x_BTF)
      new_fwd.append(carry)
      if self.backward is not None:
        bcarry, yb_BTH = run_cell(self.backward[i], zero_carry(self.cell, B, self.hidden_size, self.dtype),
                                  x_BTF, reverse=True)
        new_bwd.append(bcarry)
        y_BTH = jnp.concatenate([y_BTH, yb_BTH], axis=-1)
      x_BTF = y_BTH
    return x_BTF, new_fwd, (new_bwd if self.backward is not None else None)


class RecurrentLM(nnx.Module):
  """Character (or byte) language model: tokens_BT -> embed -> recurrent layers -> logits_BTV.

      RecurrentLM(vocab_size, LSTMConfig(cell="gru", hidden_size=128), rngs=nnx.Rngs(0))

  Any length runs (no position table). A call raises ValueError for a token id outside the vocabulary where the
  ids are known (an eager call, not inside jax.jit or scan: `jaxmodels.models.layers.known`).
  """

  Config = LSTMConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("lm",)

  def __init__(self, vocab_size: int, config: LSTMConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(LSTMConfig, config, fields)
    cell, hidden_size, num_layers, dropout = c.cell, c.hidden_size, c.num_layers, c.dropout
    self.embed = nnx.Embed(vocab_size, hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rnn = RecurrentStack(cell, hidden_size, hidden_size, num_layers, dropout=dropout, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.head = nnx.Linear(hidden_size, vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.vocab_size = vocab_size

  def _forward(self, tokens_BT, carries, rngs):
    check_indices(tokens_BT, self.vocab_size, "token id")
    h_BTH, carries, _ = self.rnn(constrain(self.embed(tokens_BT), (BATCH, LENGTH)), carries, rngs)
    logits_BTV = self.head(self.dropout(h_BTH, deterministic=rngs is None, rngs=rngs))
    return constrain(logits_BTV, (BATCH, LENGTH, "activation_vocab")), carries

  def __call__(self, tokens_BT, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self._forward(tokens_BT, None, rngs if train else None)[0]

  def init_cache(self, batch_size: int, length: int):  # pylint: disable=unused-argument
    """The decoding state: per-layer carries (their size does not depend on the length)."""
    return self.rnn.init_carry(batch_size)

  def decode(self, tokens_BT, cache, index):  # pylint: disable=unused-argument
    """Logits for `tokens_BT` continuing from the carried state; returns (logits, new carries)."""
    return self._forward(tokens_BT, cache, None)


class RecurrentClassifier(nnx.Module):
  """Sequence classifier: x_BT... -> recurrent layers -> last-state or mean pooling -> logits_BK.

  `input_shape` is one example's shape, (T, ...) with everything after T
  flattened into features (digit rows: (8, 8, 1) -> 8 steps of 8 features).

      RecurrentClassifier((8, 8, 1), 10, LSTMConfig(pooling="last", bidirectional=True), rngs=nnx.Rngs(0))
  """

  Config = LSTMConfig  # the module protocol of jaxmodels.models.registry
  tasks = ("classify",)

  def __init__(self, input_shape, num_classes: int, config: LSTMConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **fields):
    c = self.config = resolve(LSTMConfig, config, fields)
    cell, hidden_size, num_layers, pooling = c.cell, c.hidden_size, c.num_layers, c.pooling
    bidirectional, dropout = c.bidirectional, c.dropout
    self.rnn = RecurrentStack(cell, math.prod(input_shape[1:]), hidden_size, num_layers,
                              bidirectional=bidirectional, dropout=dropout, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    width = 2 * hidden_size if bidirectional else hidden_size
    self.out = nnx.Linear(width, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.pooling, self.dtype = pooling, dtype

  def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
    rngs = rngs if train else None
    B, T = x.shape[:2]
    y_BTH, fwd, bwd = self.rnn(constrain(x.reshape(B, T, -1).astype(self.dtype), (BATCH, LENGTH)), rngs=rngs)
    if self.pooling == "mean":
      pooled = y_BTH.mean(axis=1)
    else:  # the last forward output, and the backward direction's output at t=0 (its last step)
      pooled = y_BTH[:, -1] if bwd is None else jnp.concatenate(
          [y_BTH[:, -1, :y_BTH.shape[-1] // 2], y_BTH[:, 0, y_BTH.shape[-1] // 2:]], axis=-1)
    return constrain(self.out(self.dropout(pooled, deterministic=rngs is None, rngs=rngs)), (BATCH,))


def recurrent_param_count(cell: str, in_features: int, hidden: int, num_layers: int) -> int:
  """Parameters of a unidirectional RecurrentStack: LSTM 4H(F + H + 1) per layer, GRU 3H(F + H + 1)."""
  gates = {"lstm": 4, "gru": 3}[cell]
  ins = [in_features] + [hidden] * (num_layers - 1)
  return sum(gates * hidden * (i + hidden + 1) for i in ins)
