"""Gaps found verifying issues 29 and 30 on main: what a model cannot compute, refused where it was silent."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxmodels.models import TransformerConfig, TransformerLM

LM = dict(d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16, scan_layers=False)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_forward_call_refuses_known_positions_outside_max_len(positions):
  # decode checked its positions_BT; __call__ and hidden_and_head did not: position 16 of a learned table gave NaN
  # logits, position -1 its last row, rotary positions past max_len a finite answer, all without a word.
  model = TransformerLM(11, TransformerConfig(positions=positions, **LM), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 4), jnp.int32)
  assert model(tokens, positions_BT=jnp.full((1, 4), 15)).shape == (1, 4, 11)
  for bad in (16, -1):
    with pytest.raises(ValueError, match=rf"position {bad} is outside \[0, 16\) \(4 of 4 out of range\)"):
      model(tokens, positions_BT=jnp.full((1, 4), bad))
    with pytest.raises(ValueError, match=rf"position {bad} is outside \[0, 16\)"):
      model.hidden_and_head(tokens, positions_BT=jnp.full((1, 4), bad))
