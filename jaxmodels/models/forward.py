"""A model applied to a batch dict: the one place that knows which batch keys each kind of model reads.
"""

import jax.numpy as jnp

__all__ = ["forward", "model_input"]


def model_input(x):
  """The model's input: uint8 images (data.source=images, moved as bytes) scaled to float32 [0, 1] on the device."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def forward(model, batch: dict, **kwargs):
  """The model's logits for a batch: an encoder-decoder (seq2seq) reads the source and, teacher-forced, the
  decoder input; a batch of packed documents (`segment_ids`: data.source=sft, tokens with data.document_mask)
  gives them to the model as `segment_ids_BT`; every other model reads `x` alone. `kwargs`: train, rngs."""
  if "decoder_input" in batch:
    return model(batch["x"], batch["decoder_input"], source_mask_BS=batch["source_mask"], **kwargs)
  if "segment_ids" in batch:
    return model(batch["x"], segment_ids_BT=batch["segment_ids"], **kwargs)
  return model(model_input(batch["x"]), **kwargs)
