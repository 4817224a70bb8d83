"""What a model's outputs mean: the loss and the on-device metric sums of each task.

`data.task` for array data (text is always "lm"):
  classify    softmax cross-entropy over C logits; int labels (B,)
  binary      one sigmoid logit, binary cross-entropy; labels 0/1 (B,)
  multilabel  a sigmoid logit per label, binary cross-entropy; 0/1 targets (B, C)
  regress     `train.loss` (mse | mae | huber) on float targets of any trailing shape (B, ...)
(The copy and reverse sources are "seq2seq": token cross-entropy like "lm", plus whole-sequence exact matches.)

Your own loss, for any task: `train.loss=package.module:function` (`loss_function`), called inside the compiled
steps as `function(outputs, targets)` -> the loss of each target, the targets' shape (float32 after the call).
`outputs` are float32: the logits (..., C) for classify, lm and seq2seq, whose targets are int class ids (...);
for binary, multilabel and regress the outputs reshaped to the float32 targets' shape. The task's metrics
(accuracy, confusion, R^2, ...) are unchanged.

Every sum is over unmasked targets (an example for classify and binary, an
element for multilabel and regress), so a loss is a mean per target. The eval
sums are exact counts (int32) where they count, float32 sums otherwise; the host
turns them into scores (jaxmodels.tasks.scores).
"""

import jax
import jax.numpy as jnp
import optax

from jaxmodels.runtime.errors import UserError
from jaxmodels.runtime.imports import import_object, is_import_path

__all__ = ["AUC_BINS", "AUC_LOGIT_RANGE", "check_loss", "eval_sums", "is_loss", "loss_function", "loss_sums",
           "LOSS_CHOICES", "LOSSES", "TASKS", "train_metric_names"]

TASKS = ("classify", "binary", "multilabel", "regress")


LOSSES = ("mse", "mae", "huber")


LOSS_CHOICES = f"one of {', '.join(LOSSES)} (data.task=regress), or package.module:function (any task)"


def loss_function(loss: str):
  """The function `train.loss=package.module:function` names (see the module docstring); UserError naming
  train.loss for a path that does not import or names no function."""
  fn = import_object(loss, "train.loss")
  if not callable(fn):
    raise UserError(f"train.loss={loss!r} is of type {type(fn).__name__}, not a function (outputs, targets) -> losses")
  return fn


def is_loss(value) -> bool:
  """Whether `value` is a valid `train.loss` (validation's rule): a built-in name, or an import path of a function
  (one that does not import raises the UserError of `loss_function`, which says why)."""
  if not isinstance(value, str):
    return False
  return callable(loss_function(value)) if is_import_path(value) else value in LOSSES


def check_loss(loss: str, task: str, num_outputs: int, target_shape: tuple = ()) -> None:
  """Traces `loss_sums` of `task` on two abstract examples (of `target_shape` targets each, a sequence of 3 for lm
  and seq2seq) with `num_outputs` outputs, so that a `train.loss` function that fails or breaks the protocol is a
  one-line UserError naming it before a run writes anything, not at its first step."""
  lead = (2, 3) if task in ("lm", "seq2seq") else (2,)
  if task in ("classify", "lm", "seq2seq"):
    y = jax.ShapeDtypeStruct(lead, jnp.int32)
  else:
    y = jax.ShapeDtypeStruct((*lead, *target_shape), jnp.float32)
  logits = jax.ShapeDtypeStruct((*lead, num_outputs), jnp.float32)
  try:
    jax.eval_shape(lambda z, t: loss_sums(task, z, t, jnp.ones(t.shape, jnp.float32), loss), logits, y)
  except UserError as e:  # raised while tracing: JAX appended its note on traceback filtering to the message
    raise UserError(str(e).splitlines()[0]) from None
  except Exception as e:  # pylint: disable=broad-exception-caught  # whatever the user's function raises
    raise UserError(f"train.loss={loss!r} fails on outputs {logits.shape} and targets {y.shape} of data.task="
                    f"{task}: {type(e).__name__}: {e}".replace("\n", " ")) from None


def _own_losses(loss: str, outputs, y):
  """`train.loss`'s function of (outputs, targets), float32; UserError unless it gives a loss per target."""
  losses = jnp.asarray(loss_function(loss)(outputs, y))
  if losses.shape != y.shape:
    raise UserError(f"train.loss={loss!r} returned shape {tuple(losses.shape)} for targets of shape "
                    f"{tuple(y.shape)}: expected the loss of each target, the targets' shape")
  return losses.astype(jnp.float32)


AUC_BINS = 4096  # binary ROC AUC: histogram bins of the logit over [-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE]


AUC_LOGIT_RANGE = 16.0


def train_metric_names(task: str) -> tuple[str, ...]:
  """Names of the train step's metric vector: the second is accuracy, or for regression the mean absolute error."""
  return ("loss", "mae" if task == "regress" else "accuracy", "grad_norm", "skipped")


def loss_sums(task: str, logits, y, mask, loss: str = "mse") -> dict[str, jax.Array]:
  """float32 sums over unmasked targets: `loss_sum`, `correct` (regress: the absolute error) and `count`.

  `logits` (B, num_outputs) float; classify and lm take labels of any shape with
  logits (*labels.shape, C); the other tasks reshape the logits to `y`'s shape. `loss`: regress's built-in loss,
  or for any task the import path of your own (the module docstring; UserError if it breaks the protocol).
  """
  logits = logits.astype(jnp.float32)
  own = is_import_path(loss)
  if task in ("classify", "lm", "seq2seq"):
    losses = (_own_losses(loss, logits, y) if own else optax.softmax_cross_entropy_with_integer_labels(logits, y))
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  else:
    outputs, y = logits.reshape(y.shape), y.astype(jnp.float32)
    if own:
      losses = _own_losses(loss, outputs, y)
    elif task == "regress":
      losses = {"mse": jnp.square(outputs - y), "mae": jnp.abs(outputs - y),
                "huber": optax.huber_loss(outputs, y, delta=1.0)}[loss]
    else:
      losses = optax.sigmoid_binary_cross_entropy(outputs, y)
    if task == "regress":
      correct = jnp.abs(outputs - y)
    else:
      correct = ((outputs > 0) == (y > 0.5)).astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def eval_sums(task: str, logits, y, mask, top_k: int = 0, loss: str = "mse", y_shift=None) -> dict[str, jax.Array]:
  """`loss_sums` plus the task's metric sums over unmasked targets:

  classify: `top_k_correct` (float32, for `top_k` > 0) and `confusion` (C, C) int32,
    rows the true class, columns the predicted one (argmax);
  binary: `confusion` (2, 2) at logit 0 and `auc_hist` (2, AUC_BINS) int32, the
    logit histogram of each true class;
  multilabel: `label_counts` (3, C) int32, true positives, predicted and true positives per label;
  regress: per output (y.shape[1:]) float32 sums `target_count`, `y_sum`, `y_sq_sum`, `sq_error_sum`,
    `abs_error_sum`; `y_sum` and `y_sq_sum` of y - `y_shift` (per output, e.g. the training targets' mean):
    R^2's total sum of squares, y_sq_sum - y_sum^2 / n, does not depend on the shift, but about 0 its float32
    terms lose the variance of targets far from 0 (mean 1e4, std 3: R^2 0.922 for scikit-learn's 0.867);
  seq2seq: `exact` (rows whose every unmasked target is the argmax) and `sequences` (rows with a target), int32.
    Teacher-forced, so `exact` also counts the rows greedy decoding gets right: where every step's argmax is
    right, the decoder is fed exactly the target (tests/test_seq2seq.py checks it against `generate`).
  """
  sums = loss_sums(task, logits, y, mask, loss)
  logits, kept = logits.astype(jnp.float32), mask > 0
  count = lambda index, shape: jnp.zeros(shape, jnp.int32).at[index].add(kept.astype(jnp.int32))
  if task == "classify":
    if top_k:
      _, top_BK = jax.lax.top_k(logits, top_k)
      sums["top_k_correct"] = jnp.sum(jnp.any(top_BK == y[..., None], axis=-1).astype(jnp.float32) * mask)
    num_classes = logits.shape[-1]
    sums["confusion"] = count((y, jnp.argmax(logits, -1)), (num_classes, num_classes))
  elif task == "binary":
    z, label = logits.reshape(y.shape), y.astype(jnp.int32)
    sums["confusion"] = count((label, (z > 0).astype(jnp.int32)), (2, 2))
    bins = jnp.clip(((z + AUC_LOGIT_RANGE) / (2 * AUC_LOGIT_RANGE) * AUC_BINS).astype(jnp.int32), 0, AUC_BINS - 1)
    sums["auc_hist"] = count((label, bins), (2, AUC_BINS))
  elif task == "multilabel":
    predicted, actual = (logits.reshape(y.shape) > 0) & kept, (y > 0.5) & kept
    sums["label_counts"] = jnp.stack([jnp.sum(predicted & actual, 0), jnp.sum(predicted, 0),
                                      jnp.sum(actual, 0)]).astype(jnp.int32)
  elif task == "seq2seq":
    wrong_BT = (jnp.argmax(logits, -1) != y) & kept
    sums["exact"] = jnp.sum(~jnp.any(wrong_BT, axis=-1) & jnp.any(kept, axis=-1)).astype(jnp.int32)
    sums["sequences"] = jnp.sum(jnp.any(kept, axis=-1)).astype(jnp.int32)
  elif task == "regress":
    outputs, y = logits.reshape(y.shape), y.astype(jnp.float32)
    centred = y if y_shift is None else y - y_shift
    sums.update(target_count=jnp.sum(mask, 0), y_sum=jnp.sum(centred * mask, 0),
                y_sq_sum=jnp.sum(jnp.square(centred) * mask, 0),
                sq_error_sum=jnp.sum(jnp.square(outputs - y) * mask, 0),
                abs_error_sum=jnp.sum(jnp.abs(outputs - y) * mask, 0))
  return sums
