"""Datasets: `load_dataset(config)` picks the source named by `data.source`.

A dataset has `task` ("classify", "lm" or "seq2seq"), `input_shape`, `num_outputs`,
`describe()`, `files()` (name -> text to keep in the workdir), language models a `unit` (bits_per_<unit>),
`train_batch(step, batch_size, rows)` (a pure function of the step, so order is
deterministic and resume is exact) and `eval_batches(batch_size, rows)`
(fixed-shape, padded batches carrying a `mask`); `rows` picks the rows of the
global batch this process loads (default: all).
"""

from jaxmodels.data.arrays import (
  ArrayDataset,
  check_batch_size,
  load_array_dataset,
  padded_batches,
  validate_arrays,
)
from jaxmodels.data.images import load_image_dataset
from jaxmodels.data.seq2seq import load_seq2seq_dataset
from jaxmodels.data.text import TextDataset, load_text_dataset
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.data.tokens import load_token_dataset
from jaxmodels.runtime.errors import UserError

SOURCES = ("digits", "npz", "text", "tokens", "images", "copy", "reverse")
SEQ2SEQ_SOURCES = ("copy", "reverse")  # jaxmodels.data.seq2seq: paired sequences for the encoder-decoder
LM_SOURCES = ("text", "tokens")


def load_dataset(config):
  """The dataset of `data.*`; arrays are checked against `model.dtype` too.

  Raises UserError for data that cannot train or would train on nonsense (see validate_arrays, load_text_dataset).
  """
  source = config.data.source
  if source in ("digits", "npz"):
    return load_array_dataset(config.data, config.train.seed, config.model.dtype)
  if source == "text":
    return load_text_dataset(config.data, config.train.seed)
  if source == "tokens":
    return load_token_dataset(config.data, config.train.seed)
  if source == "images":
    return load_image_dataset(config.data, config.train.seed)
  if source in SEQ2SEQ_SOURCES:
    return load_seq2seq_dataset(config.data, config.train.seed)
  raise UserError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")


__all__ = ["ArrayDataset", "LM_SOURCES", "SEQ2SEQ_SOURCES", "SOURCES", "check_batch_size", "TextDataset", "Vocab",
           "load_dataset",
           "padded_batches", "validate_arrays"]
