"""Datasets: `load_dataset(source, path=..., seed=..., ...)` loads the source `source` names, from keyword arguments
(the `data.*` keys of the same names, `train.seed` and `model.dtype`); `load_dataset_from_config(config)` takes a
run's config.

`source` is a built-in name (the keys of `SOURCES`) or an import path `package.module:function` of your own. Either
way it names a function called with the keyword arguments among `load_dataset`'s that its signature lists (all of
them if it takes `**kwargs`), that returns a `Dataset`: built-in and your own sources go through the one table.

`loader.StepStream` computes a dataset's batches ahead of use (grain worker processes or a thread).
"""

import inspect
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from jaxmodels.data import loader
from jaxmodels.data.arrays import (
  ALL_ROWS,
  ArrayDataset,
  Rows,
  check_batch_size,
  load_digits_dataset,
  load_npz_dataset,
  padded_batches,
  validate_arrays,
)
from jaxmodels.data.images import ImageDataset, load_image_dataset
from jaxmodels.data.loader import StepStream
from jaxmodels.data.seq2seq import Seq2SeqDataset, load_seq2seq_dataset
from jaxmodels.data.sft import SFTDataset, load_sft_dataset
from jaxmodels.data.text import TextDataset, load_text_dataset
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.data.tokens import TokenDataset, load_token_dataset
from jaxmodels.runtime.errors import UserError
from jaxmodels.runtime.imports import import_object, is_import_path


class Dataset(Protocol):
  """What every source returns (ArrayDataset, TextDataset, TokenDataset, SFTDataset, ImageDataset, Seq2SeqDataset).

  Batches are dicts of NumPy arrays: 'x' (B, *input_shape) and 'y' (classify: int32 (B,) labels; lm: int32 (B, T)
  next tokens), plus what the task needs ('mask' (B,) or (B, T) float32 on evaluation batches: 0 on padding; on
  training batches too where targets carry no loss, e.g. sft's prompts) and, for packed documents, 'segment_ids'
  (B, T) int32 (the Transformer attends within a segment; jaxmodels.models.forward passes them).
  `rows` picks the rows of the global batch this process loads (indices or a slice; default all). Besides these
  members, a dataset of task lm or seq2seq has `unit` (a token's name for the eval metric bits_per_<unit>), one of
  the array tasks `x_train` (its length is the number of training examples), and regress `y_train` too (its mean
  is the output's initial shift).
  """

  task: str  # "classify", "binary", "multilabel", "regress", "lm" or "seq2seq"
  input_shape: tuple[int, ...]  # one example's shape
  num_outputs: int  # the model's outputs: classes, labels, targets or the vocabulary

  def describe(self) -> str:
    """One line for the log: sizes, classes or vocabulary."""

  def files(self) -> dict[str, str]:
    """Files the run keeps in its workdir (name -> text), e.g. a language model's vocab.json."""

  def train_batch(self, step: int, batch_size: int, rows: Rows = ALL_ROWS) -> dict[str, np.ndarray]:
    """Rows `rows` of global training batch `step`: a pure function of the step, so resume is exact."""

  def eval_batches(self, batch_size: int, rows: Rows = ALL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape evaluation batches carrying a 'mask', the same count on every process."""


# The built-in sources by `data.source` name; an import path resolves to a function of the same protocol.
SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_dataset, "npz": load_npz_dataset, "text": load_text_dataset,
    "tokens": load_token_dataset, "images": load_image_dataset, "copy": load_seq2seq_dataset,
    "reverse": load_seq2seq_dataset, "sft": load_sft_dataset,
}
SEQ2SEQ_SOURCES = ("copy", "reverse")  # jaxmodels.data.seq2seq: paired sequences for the encoder-decoder
LM_SOURCES = ("text", "tokens", "sft")
SOURCE_CHOICES = f"one of {', '.join(SOURCES)}, or package.module:function"


def source_function(source: str) -> Callable[..., Dataset]:
  """The function `source` names (a key of SOURCES or `package.module:function`); UserError naming data.source
  for an unknown name, a path that does not import, or a function whose parameters are not `load_dataset`'s."""
  if not is_import_path(source):
    if source not in SOURCES:
      raise UserError(f"data.source={source!r}: expected {SOURCE_CHOICES}")
    return SOURCES[source]
  fn = import_object(source, "data.source")
  if not callable(fn):
    raise UserError(f"data.source={source!r} is of type {type(fn).__name__}, not a function returning a dataset")
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # a builtin without a signature
    raise UserError(f"data.source={source!r}: its signature cannot be read") from None
  known = inspect.signature(load_dataset).parameters
  for p in params:
    if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) or (p.name not in known and p.kind != p.VAR_KEYWORD
                                                           and p.default is p.empty):
      raise UserError(f"data.source={source!r}: parameter {p.name!r} is not a keyword argument it can be given "
                      f"(it may take: {', '.join(known)})")
  return fn


def is_source(value) -> bool:
  """Whether `value` is a valid `data.source` (validation's rule): a built-in name, or an import path of a source
  function (one that does not import raises the UserError of `source_function`, which says why)."""
  if not isinstance(value, str):
    return False
  return bool(source_function(value)) if is_import_path(value) else value in SOURCES


def load_dataset(source: str = "digits", *, path: str = "", seed: int = 0, compute_dtype: str = "float32",
                 task: str = "", test_fraction: float = 0.2, spatial_dims: int | None = None, seq_len: int = 128,
                 val_fraction: float = 0.1, tokenizer: str = "char", image_size: int = 0, augment: bool = True,
                 workers: int = 2, vocab_size: int = 0, eval_windows: int = 0, tokenizer_path: str = "",
                 chat_template: str = "", document_mask: bool = False) -> Dataset:
  """The dataset of `source` (see the module docstring), from keyword arguments: each is the `data.*` key of its
  name with its default, `seed` is `train.seed` (the split and the batch order) and `compute_dtype` `model.dtype`
  (array values must fit it). Only the arguments the source's function lists are passed to it.

  Raises UserError for an unknown source, data that cannot train or would train on nonsense (see validate_arrays,
  load_text_dataset, ...), or a source that returns no Dataset or one of another `task` than a non-empty `task`.
  A misspelled keyword is a TypeError.
  """
  values = dict(locals())  # the arguments, by name
  fn = source_function(source)
  params = inspect.signature(fn).parameters.values()
  if not any(p.kind == p.VAR_KEYWORD for p in params):
    values = {p.name: values[p.name] for p in params if p.name in values}
  dataset = fn(**values)
  if is_import_path(source):
    _check_dataset(source, dataset, task)
  return dataset


def _check_dataset(source: str, dataset, task: str) -> None:
  """UserError naming data.source when an import-path source's result breaks the Dataset protocol."""
  members = [m for m in ("task", "input_shape", "num_outputs", "describe", "files", "train_batch", "eval_batches")
             if not hasattr(dataset, m)]
  if not members:
    needs = {"lm": ("unit",), "seq2seq": ("unit",), "regress": ("x_train", "y_train")}.get(dataset.task, ("x_train",))
    members = [m for m in needs if not hasattr(dataset, m)]
  if members:
    raise UserError(f"data.source={source!r} returned a {type(dataset).__name__} without {', '.join(members)} "
                    f"(see jaxmodels.data.Dataset)")
  if task and dataset.task != task:
    raise UserError(f"data.task={task!r} but data.source={source!r} returned a dataset of task {dataset.task!r}")


def load_dataset_from_config(config) -> Dataset:
  """`load_dataset` of a run's config: the `data.*` keys it takes, `train.seed` and `model.dtype`."""
  keys = set(inspect.signature(load_dataset).parameters) - {"seed", "compute_dtype"}
  return load_dataset(**{k: config.data[k] for k in keys}, seed=config.train.seed, compute_dtype=config.model.dtype)


__all__ = ["ArrayDataset", "Dataset", "ImageDataset", "LM_SOURCES", "SEQ2SEQ_SOURCES", "SFTDataset", "SOURCES",
           "SOURCE_CHOICES", "Seq2SeqDataset", "StepStream", "TextDataset", "TokenDataset", "Vocab", "check_batch_size",
           "is_source", "load_dataset", "load_dataset_from_config", "load_digits_dataset", "load_image_dataset",
           "load_npz_dataset", "load_seq2seq_dataset", "load_sft_dataset", "load_text_dataset", "load_token_dataset",
           "loader", "padded_batches", "source_function", "validate_arrays"]
