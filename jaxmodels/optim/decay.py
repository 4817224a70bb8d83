"""Which parameters take weight decay: `decay_mask`, shared by the optimizer factory and magnitude pruning.
"""

import jax

__all__ = ["decay_mask", "EMBEDDINGS", "NO_DECAY"]

NO_DECAY = ("bias", "scale")  # biases, and the scales of LayerNorm, RMSNorm and BatchNorm


EMBEDDINGS = ("embedding", "cls")  # nnx.Embed tables and the classifier's learned CLS token


def decay_mask(params, decay_embeddings: bool = True):
  """True for parameters that take weight decay, by role (each leaf's name), never by rank.

  Kernels (and any other weight) decay; biases and norm scales never do;
  embeddings do when `decay_embeddings` (`train.decay_embeddings`). A
  Transformer's scanned (layers, d_model) norm scales thus get the same mask
  as the unrolled layout's (d_model,) ones. `params`: a pure dict or nnx.State.
  """
  def decays(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
    name = names[-1] if names else ""
    return name not in NO_DECAY and (decay_embeddings or name not in EMBEDDINGS)

  return jax.tree_util.tree_map_with_path(decays, params)
