"""What a benchmark compiled: the one-line model summary and the preset notes that `bench compile` and
`bench step` print before their figures.

XLA's FLOP count covers a scanned stack's body once, so a figure alone cannot show that the experiment's own
`model.num_layers` replaced a preset's: the summary line names the sizes the step was built with, and a note
names every preset field the experiment (or the command line) set to another value.
"""

import dataclasses

from jaxmodels.models import family_config, presets
from jaxmodels.models.params import count_params

__all__ = ["model_summary", "preset_overrides"]


def model_summary(exp) -> str:
  """'model: transformer, 1,235,814,400 parameters, 16 layers, d_model 2048, vocabulary 128,256, 16,384 tokens
  per step' for an experiment (jaxmodels.train.experiment.Experiment); sizes its family lacks are left out.
  Parameters are counted from the train state's (a tied embedding once)."""
  m, t, task = exp.config.model, exp.config.train, exp.dataset.task
  typed = family_config(m)[1]  # the family's own fields: every family's keys sit in `model.*`
  parts = [f"{count_params(exp.checkpoint_state.params):,} parameters"]
  # A mixture-of-experts family adds ", N active" to the line above (the parameters one token uses).
  if getattr(typed, "num_layers", None) is not None:
    parts.append(f"{typed.num_layers} layers")
  if getattr(typed, "d_model", None) is not None:
    parts.append(f"d_model {typed.d_model}")
  if task in ("lm", "seq2seq"):
    parts.append(f"vocabulary {exp.dataset.num_outputs:,}")
  if task == "lm":
    parts.append(f"{t.batch_size * exp.config.data.seq_len:,} tokens per step")
  else:
    parts.append(f"{t.batch_size:,} examples per step")
  return f"model: {m.family}, " + ", ".join(parts)


def preset_overrides(config) -> list[str]:
  """One note per field of `model.preset` whose value in the (validated) config differs from the preset's:
  the experiment file or the command line set it, and it wins (jaxmodels.config.expand_preset). [] without a
  preset."""
  name = config.model.get("preset")
  if not name:
    return []
  preset = presets.get(name).config
  notes = []
  for field in dataclasses.fields(preset):
    ours, theirs = config.model.get(field.name), getattr(preset, field.name)
    if ours != theirs and not (isinstance(ours, (list, tuple)) and tuple(ours) == theirs):
      notes.append(f"note: model.{field.name}={ours!r} (the experiment's or the command line's) overrides preset "
                   f"{name}'s {theirs!r}")
  return notes
