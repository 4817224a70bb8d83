"""A model applied to a batch dict: the one place that knows which batch keys each kind of model reads.
"""

import jax.numpy as jnp

from jaxmodels.models.transformer import segment_positions
from jaxmodels.parallel import context

__all__ = ["context_order", "forward", "model_input"]


def model_input(x):
  """The model's input: uint8 images (data.source=images, moved as bytes) scaled to float32 [0, 1] on the device."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def forward(model, batch: dict, **kwargs):
  """The model's logits for a batch: an encoder-decoder (seq2seq) reads the source and, teacher-forced, the
  decoder input; every other model reads `x`, and a language model also `segment_ids` and `positions` where the
  batch has them (packed documents; `context_order`). `kwargs`: train, rngs."""
  if "decoder_input" in batch:
    return model(batch["x"], batch["decoder_input"], source_mask_BS=batch["source_mask"], **kwargs)
  sequence = {f"{k}_BT": batch[k] for k in ("segment_ids", "positions") if k in batch}
  return model(model_input(batch["x"]), **sequence, **kwargs)


def context_order(batch: dict) -> dict:
  """The batch a step traced under context parallelism (`jaxmodels.parallel.context.size()` = C > 1) computes
  on: every (B, T, ...) leaf (tokens `x`, targets `y`, `mask`, `segment_ids`) in the load-balanced order
  (`context.load_balance`), with the tokens' `positions` (B, T) int32 (restarting at each segment), taken
  before the reorder. Elsewhere the batch itself.

  Done once per step, on the step's input batch, whose sequences are whole on each device: a local gather of
  token ids. The loss sums over tokens, so the reordered logits meet reordered targets and never go back.
  UserError for a sequence length that 2C does not divide.
  """
  c = context.size()
  if c == 1:
    return batch
  B, T = batch["x"].shape[:2]
  context.check_length(T, c)
  if "positions" not in batch:
    positions = (segment_positions(batch["segment_ids"]) if "segment_ids" in batch
                 else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    batch = {**batch, "positions": positions}
  return {k: context.load_balance(v, c) if v.shape[:2] == (B, T) else v for k, v in batch.items()}
