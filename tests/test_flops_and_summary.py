"""FLOP accounting with the causal convention (jaxmodels.models.flops) on a hand-computed case, and the model
summary line and preset notes that `bench compile` / `bench step` print (jaxmodels.bench.summary)."""

import types

import jax
from conftest import experiment
from flax import nnx

from jaxmodels.bench.summary import model_summary, preset_overrides
from jaxmodels.config import validate
from jaxmodels.models import flops
from jaxmodels.models.transformer import TransformerLM
from jaxmodels.train.experiment import build_experiment


def tiny_lm_config(remat):
  c = experiment("text_transformer")
  c.model.update(dict(num_layers=2, d_model=16, num_heads=2, d_ff=32, norm="rms", mlp="swiglu", use_bias=False,
                      tie_embeddings=False, remat=remat))
  c.data.seq_len, c.train.batch_size = 8, 2
  return c


def test_causal_attention_is_halved_and_remat_adds_hardware_flops():
  vocab, dataset = 50, types.SimpleNamespace(task="lm", num_outputs=50, input_shape=(8,))
  # By hand: per layer 2 d^2 (q, o) + 2 d^2 (k, v) + 3 d f (SwiGLU) + 2 d (RMSNorms) = 512 + 512 + 1536 + 32 =
  # 2,592; two layers 5,184, a final norm 16, the untied head 16 x 50 = 800: 6,000 non-embedding parameters.
  # Per token: 6 x 6,000 + causal attention 12 x L x T x d / 2 = 6 x 2 x 8 x 16 = 1,536 (PaLM's whole count:
  # 3,072). 2 x 8 = 16 tokens per step.
  model_flops = 16 * (6 * 6000 + 1536)
  # remat=full recomputes the blocks' forward: 2 x 5,184 + attention's forward third 512 per token;
  # remat=dots only the attention products' forward: 512 per token.
  expected = {"none": model_flops, "full": model_flops + 16 * (2 * 5184 + 512), "dots": model_flops + 16 * 512}
  for remat, hardware in expected.items():
    c = tiny_lm_config(remat)
    abstract = nnx.eval_shape(lambda c=c: TransformerLM(vocab, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                                                        norm="rms", tie_embeddings=False, rngs=nnx.Rngs(0)))
    assert flops.model_flops_per_step(c, dataset, abstract) == model_flops
    assert flops.hardware_flops_per_step(c, dataset, abstract, model_flops) == hardware
  assert flops.attention_flops(2, 8, 16, causal=False) == 3072 == 2 * flops.attention_flops(2, 8, 16, causal=True)


def test_summary_line_and_the_notes_of_preset_fields_the_experiment_overrides():
  c = tiny_lm_config("none")
  exp = build_experiment(c)
  params = sum(x.size for x in jax.tree.leaves(exp.checkpoint_state.params))
  assert model_summary(exp) == (f"model: transformer, {params:,} parameters, 2 layers, d_model 16, vocabulary "
                                f"{exp.dataset.num_outputs:,}, 16 tokens per step")
  assert preset_overrides(c) == []
  c = experiment("text_transformer")  # its own num_layers=4 wins over the preset's 16
  c.model.preset = "llama3.2-1b"
  validate(c)
  notes = preset_overrides(c)
  assert [n for n in notes if "num_layers" in n] == [
      "note: model.num_layers=4 (the experiment's or the command line's) overrides preset llama3.2-1b's 16"]
  assert not [n for n in notes if "d_model" in n]  # the preset's d_model was taken
