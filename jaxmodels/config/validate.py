"""Checks of every configuration key, run before anything is loaded or built (`validate`), and the adjustments
that keep a shortened run valid (`expand_preset`, `fit_to_steps`).

Each key's allowed values live with the module that consumes it (the data sources, model families, optimizers,
tasks, mesh axes); this module only looks them up. `validate` checks each key on its own, group by group
(`DATA_RULES`, `MODEL_RULES`, ...), then the keys whose allowed values depend on others, group by group.
"""

import dataclasses
import math
import re

from ml_collections import config_dict

from jaxmodels.config.defaults import default_config
from jaxmodels.data import LM_SOURCES, SEQ2SEQ_SOURCES, SOURCE_CHOICES, SOURCES, is_source
from jaxmodels.data.tokenizers import TOKENIZERS
from jaxmodels.models import cnn, family_config, moe, presets, recurrent, resnet, rope, transformer
from jaxmodels.models.registry import FAMILIES, get_family, task_refusal
from jaxmodels.optim import OPTIMIZERS, SCHEDULES, pruning
from jaxmodels.parallel import pipeline
from jaxmodels.parallel.context import check_length as check_context_length
from jaxmodels.parallel.sharding import (
  MESH_AXES,
  STRATEGIES,
  activation_rules,
  parse_mesh,
)
from jaxmodels.runtime import extras
from jaxmodels.runtime.errors import UserError
from jaxmodels.tasks import LOSS_CHOICES, TASKS, eval_metric_names, is_loss, top_k_name

__all__ = ["CHECKPOINT_RULES", "config_task", "DATA_RULES", "DTYPES", "expand_preset", "fit_to_steps", "FRACTION",
           "metric_names", "MODEL_RULES", "NON_NEGATIVE", "NON_NEGATIVE_REAL", "one_of", "OPEN_UNIT",
           "PARALLEL_RULES", "PARAM_DTYPES", "POSITIVE", "POSITIVE_REAL", "RATE", "SEED", "SIZES", "TRAIN_RULES",
           "validate"]

# Compute dtypes: float16 trains with dynamic loss scaling (jaxmodels.optim.precision). Parameters and the
# optimizer state in float16 turn Adam's update NaN within steps, and float64 silently becomes float32 while
# jax_enable_x64 is off, so neither is offered.
DTYPES = ("float32", "bfloat16", "float16")


PARAM_DTYPES = ("float32", "bfloat16")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_regex(pattern) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return True


# (test, what the error says was expected) for the kinds of value a key can take.
POSITIVE = (lambda v: _is_int(v) and v > 0, "a positive integer")


NON_NEGATIVE = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")


OPEN_UNIT = (lambda v: _is_real(v) and 0 < v < 1, "a number in (0, 1)")


RATE = (lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)")


FRACTION = (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")


NON_NEGATIVE_REAL = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")


POSITIVE_REAL = (lambda v: _is_real(v) and v > 0, "a finite number > 0")


SIZES = (lambda v: isinstance(v, (tuple, list)) and all(POSITIVE[0](n) for n in v), "a tuple of positive integers")


SEED = (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)")


def one_of(allowed) -> tuple:
  allowed = tuple(allowed)
  return (lambda v: v in allowed, f"one of {', '.join(map(str, allowed))}")


# Each key's rule on its own, by config group. Free-form strings (`data.path`, `checkpoint.restore_from`,
# `train.distill.teacher`) are checked where they are read; booleans by the ConfigDict's types.
DATA_RULES = {
    "data.source": (is_source, SOURCE_CHOICES), "data.test_fraction": OPEN_UNIT, "data.seq_len": POSITIVE,
    "data.val_fraction": OPEN_UNIT, "data.tokenizer": one_of(TOKENIZERS), "data.vocab_size": NON_NEGATIVE,
    "data.eval_windows": NON_NEGATIVE, "data.image_size": NON_NEGATIVE, "data.workers": NON_NEGATIVE,
    "data.prefetch": NON_NEGATIVE, "data.task": one_of(("",) + TASKS),
    "data.spatial_dims": (lambda v: v in (None, 1, 2), "unset, 1 (signals) or 2 (images)"),
}


MODEL_RULES = {
    "model.dtype": one_of(DTYPES), "model.param_dtype": one_of(PARAM_DTYPES),
    "model.dropout": RATE, "model.hidden_sizes": SIZES, "model.features": SIZES, "model.kernel_sizes": SIZES,
    "model.strides": SIZES, "model.pool": one_of(cnn.POOLS), "model.head_sizes": SIZES,
    "model.norm": one_of(dict.fromkeys(cnn.NORMS + transformer.NORMS)), "model.num_layers": POSITIVE,
    "model.num_heads": POSITIVE, "model.d_model": POSITIVE, "model.d_ff": POSITIVE, "model.max_len": POSITIVE,
    "model.positions": one_of(transformer.POSITIONS), "model.mlp": one_of(transformer.MLPS),
    "model.remat": one_of(transformer.REMAT_POLICIES), "model.attention_impl": one_of(transformer.ATTENTION_IMPLS),
    "model.pooling": one_of(("mean", "cls", "last")), "model.cell": one_of(recurrent.CELLS),
    "model.hidden_size": POSITIVE,
    "model.num_kv_heads": (lambda v: v is None or POSITIVE[0](v), "unset or a positive integer"),
    "model.norm_eps": POSITIVE_REAL, "model.rope_theta": POSITIVE_REAL, "model.patch_size": POSITIVE,
    "model.stage_sizes": (lambda v: SIZES[0](v) and len(v) > 0, "a non-empty tuple of positive integers"),
    "model.block": one_of(resnet.BLOCKS), "model.width": POSITIVE, "model.stem": one_of(resnet.STEMS),
    # Transformer architecture variants (Hugging Face interop)
    "model.head_dim": transformer.OPTIONAL_POSITIVE, "model.sliding_window": transformer.OPTIONAL_POSITIVE,
    "model.rope_scaling": one_of(rope.ROPE_SCALINGS), "model.rope_original_max_len": POSITIVE,
    **{f"model.rope_{k}": POSITIVE_REAL for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast",
                                                    "beta_slow")},
    "model.rope_attention_factor": transformer.OPTIONAL_POSITIVE_REAL,
    "model.qk_norm": one_of(transformer.QK_NORMS), "model.norm_position": one_of(transformer.NORM_POSITIONS),
    **{f"model.{k}": transformer.OPTIONAL_POSITIVE_REAL for k in ("attn_logit_softcap", "final_logit_softcap",
                                                                   "attention_scale_dim")},
    "model.global_layer_every": NON_NEGATIVE,
    # Mixture of experts (checked whether or not num_experts turns them on)
    "model.num_experts": NON_NEGATIVE, "model.experts_per_token": POSITIVE, "model.num_shared_experts": NON_NEGATIVE,
    "model.moe_every": POSITIVE, "model.router": one_of(moe.ROUTERS), "model.capacity_factor": NON_NEGATIVE_REAL,
    "model.aux_loss_weight": NON_NEGATIVE_REAL, "model.z_loss_weight": NON_NEGATIVE_REAL,
}


TRAIN_RULES = {
    "train.loss": (is_loss, LOSS_CHOICES),
    "train.steps": POSITIVE, "train.batch_size": POSITIVE, "train.grad_accum_steps": POSITIVE,
    "train.optimizer": one_of(OPTIMIZERS), "train.learning_rate": POSITIVE_REAL,
    "train.schedule": one_of(SCHEDULES), "train.warmup_steps": NON_NEGATIVE, "train.end_lr_fraction": FRACTION,
    "train.weight_decay": NON_NEGATIVE_REAL, "train.momentum": RATE, "train.b1": RATE, "train.b2": RATE,
    "train.grad_clip": NON_NEGATIVE_REAL, "train.seed": SEED, "train.log_every": POSITIVE,
    "train.eval_every": POSITIVE, "train.eval_batch_size": POSITIVE,
    "train.eval_top_k": NON_NEGATIVE, "train.loss_scale_period": POSITIVE, "train.ema_decay": RATE,
    "train.logits_chunk": NON_NEGATIVE,
    "train.wandb_mode": one_of(("", "online", "offline")),
    "train.wandb_project": (lambda v: isinstance(v, str) and re.fullmatch(r"[^/\\#?%:]{0,128}", v) is not None,
                            "a W&B project name (at most 128 characters, none of / \\ # ? % :)"),
    "train.profile_steps": (lambda v: len(v) == 0 or (len(v) == 2 and all(map(_is_int, v)) and 0 <= v[0] < v[1]),
                            "() or (first, last) with 0 <= first < last"),
    "train.early_stopping.mode": one_of(("min", "max")), "train.early_stopping.patience": POSITIVE,
    "train.early_stopping.min_delta": NON_NEGATIVE_REAL,
    "train.pruning.sparsity": RATE, "train.pruning.scope": one_of(pruning.SCOPES),
    "train.pruning.pattern": (pruning.valid_pattern, "unstructured or N:M with 0 < N < M (e.g. 2:4)"),
    "train.pruning.start_step": NON_NEGATIVE, "train.pruning.end_step": NON_NEGATIVE,
    "train.pruning.every": POSITIVE, "train.distill.temperature": POSITIVE_REAL, "train.distill.alpha": FRACTION,
    "train.quantization.bits": one_of((0, 4, 8)),
    "train.quantization.exclude": (_is_regex, "a regex of module paths"),
    "train.freeze": (lambda v: isinstance(v, (tuple, list)) and all(map(_is_regex, v)), "a tuple of regexes"),
    "train.lr_multipliers": (lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and _is_regex(p[0]) and NON_NEGATIVE_REAL[0](p[1]) for p in v),
                             "a tuple of (regex, multiplier >= 0) pairs"),
    "train.lora.rank": NON_NEGATIVE, "train.lora.alpha": POSITIVE_REAL,
    "train.lora.targets": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(map(_is_regex, v)),
                           "a non-empty tuple of regexes"),
}


CHECKPOINT_RULES = {
    "checkpoint.every": NON_NEGATIVE, "checkpoint.keep": POSITIVE, "checkpoint.best_mode": one_of(("min", "max")),
    "checkpoint.restore_mode": one_of(("params", "full")),
}


PARALLEL_RULES = {
    "parallel.strategy": one_of(STRATEGIES), "parallel.num_processes": POSITIVE,
    "parallel.coordinator_address": (lambda v: not v or re.fullmatch(r"[^\s:]+:[0-9]+", v) is not None,
                                     "empty or HOST:PORT"),
    "parallel.init_timeout_s": POSITIVE_REAL, "parallel.heartbeat_timeout_s": POSITIVE_REAL,
    "parallel.pipeline_microbatches": NON_NEGATIVE, "parallel.pipeline_repeats": POSITIVE,
}


def _check(config, key: str, rule: tuple) -> None:
  value = config
  for name in key.split("."):
    value = value[name]
  test, expected = rule
  if not test(value):
    raise UserError(f"{key}={value!r}: expected {expected}")


def _check_rules(key: str, rules, first_ok, first_expected: str, mesh_axes) -> None:
  """`parallel.rules` / `parallel.fallback_rules`: pairs of (name or pattern, mesh axis or None)."""
  for rule in rules:
    ok = (isinstance(rule, (tuple, list)) and len(rule) == 2 and first_ok(rule[0])
          and (rule[1] is None or rule[1] in mesh_axes))
    if not ok:
      raise UserError(f"{key}: {rule!r} is not a pair ({first_expected}, mesh axis or None); mesh axes: "
                      f"{', '.join(mesh_axes)}")


def config_task(d) -> str:
  """The task of data group `d` before the data loads: a language model's, seq2seq, or `data.task` (an npz
  file's inferred task, where unset, counts as classify here)."""
  return ("lm" if d.source in LM_SOURCES else "seq2seq" if d.source in SEQ2SEQ_SOURCES
          else d.task if d.task in TASKS else "classify")


def metric_names(config, task: str) -> tuple[str, ...]:
  """The eval metrics `train.early_stopping.metric` and `checkpoint.keep_best` may name: the task's
  (jaxmodels.tasks.eval_metric_names), and a classifier's top-k accuracy for `train.eval_top_k` > 1."""
  d, top_k = config.data, config.train.eval_top_k
  unit = d.tokenizer if d.source == "text" else "token"
  if d.source == "npz" and not d.task:  # inferred when the data loads: any array task's metric until then
    names = tuple(dict.fromkeys(m for k in TASKS for m in eval_metric_names(k, unit)))
  else:
    names = eval_metric_names(task, unit)
  return names + ((top_k_name(top_k),) if task == "classify" and top_k > 1 else ())


def validate(config: config_dict.ConfigDict) -> None:
  """Checks every key of the config up front, so a bad value never reaches data loading or model building.

  Raises `UserError` naming the first bad key, its value and what it accepts: each key on its own first, then the
  keys whose allowed values depend on others. Expands `model.preset` into the `model.*` keys (`expand_preset`).
  """
  _check(config, "model.preset", one_of(("",) + tuple(presets.PRESETS)))
  expand_preset(config)
  task = config_task(config.data)
  # model.family: a registered family, or a module by import path whose Config checks its own keys
  family = config.model.family
  own = set() if family in FAMILIES else {f"model.{f.name}" for f in dataclasses.fields(get_family(family).config)}
  for rules in (DATA_RULES, MODEL_RULES, TRAIN_RULES, CHECKPOINT_RULES, PARALLEL_RULES, _derived_rules(config, task)):
    for key, rule in rules.items():
      if key not in own:
        _check(config, key, rule)
  _check_data(config.data)
  _check_model(config, task)
  _check_train(config)
  _check_parallel(config.parallel)
  _check_context(config, task)
  _check_pipeline(config, task)


def _derived_rules(config, task: str) -> dict:
  """The rules of single keys whose allowed values depend on other keys: the process index, the metric names."""
  n, metric = config.parallel.num_processes, one_of(("",) + metric_names(config, task))
  process_id = (lambda v: _is_int(v) and 0 <= v < n, f"an integer in [0, parallel.num_processes={n})")
  return {"parallel.process_id": process_id, "checkpoint.keep_best": metric, "train.early_stopping.metric": metric}


def _check_data(d) -> None:
  """Data keys that contradict the source."""
  if d.source == "text" and d.task:
    raise UserError(f"data.task={d.task!r} is set but data.source=text is always a language model: leave it empty")
  if d.source in SEQ2SEQ_SOURCES and d.task:
    raise UserError(f"data.task={d.task!r} is set but data.source={d.source} is always seq2seq: leave it empty")
  for key in ("tokenizer_path", "chat_template"):  # sft's own keys
    if d[key] and d.source != "sft":
      raise UserError(f"data.{key}={d[key]!r} is set but data.source={d.source} does not read it: it applies to "
                      f"data.source=sft")
  if d.document_mask and d.source in SOURCES and d.source != "tokens":  # only token corpora have end-of-text cuts
    raise UserError(f"data.document_mask=True is set but data.source={d.source} does not read it: it applies to "
                    f"data.source=tokens (sft examples are always kept apart)")
  if d.source == "digits" and d.path:
    raise UserError(f"data.path={d.path!r} is set but data.source=digits reads no file: set data.source=npz "
                    f"or text, or leave data.path empty")


def _check_model(config, task: str) -> None:
  """The family against the task, and the family's own config (its fields and their relations)."""
  m = config.model
  modules = get_family(m.family).modules
  if m.family in FAMILIES and (task == "seq2seq") != ("seq2seq" in modules):
    raise UserError(f"model.family={m.family} with data.source={config.data.source}: the encoder-decoder (encdec) "
                    f"takes paired sequences (data.source=copy or reverse), and they take only it")
  packed = config.data.source == "sft" or (config.data.source == "tokens" and config.data.document_mask)
  if packed and m.family in FAMILIES and m.family != "transformer":
    what = "data.source=sft" if config.data.source == "sft" else "data.document_mask=True"
    raise UserError(f"model.family={m.family} with {what}: packed documents (segment ids) need "
                    f"model.family=transformer, or a module of your own whose __call__ takes segment_ids_BT")
  family_config(m, default_config().model)
  kind = task if task in ("lm", "seq2seq") else "classify"
  if kind not in modules:
    raise UserError(f"model.family={m.family!r} {task_refusal(m.family, kind)}")


def _check_train(config) -> None:
  """Training keys that depend on others: early stopping's best checkpoint, tracking, pruning, quantization,
  distillation, accumulation."""
  t, ck = config.train, config.checkpoint
  es = t.early_stopping
  if es.metric and ck.keep_best and (ck.keep_best, ck.best_mode) != (es.metric, es.mode):
    raise UserError(f"checkpoint.keep_best={ck.keep_best!r} (best_mode={ck.best_mode}) differs from "
                    f"train.early_stopping.metric={es.metric!r} (mode={es.mode}): the checkpoint early stopping "
                    f"names as best must be kept; leave checkpoint.keep_best empty or make them agree")
  # What the config asks of optional libraries, before a run writes anything (gs:// paths: runtime.storage).
  for module, feature, asked in (("wandb", f"train.wandb_project={t.wandb_project!r}", t.wandb_project),
                                 ("qwix", f"train.quantization.bits={t.quantization.bits}", t.quantization.bits),
                                 ("PIL", "data.source=images", config.data.source == "images")):
    if asked:
      extras.check(module, feature)
  pruning.check(t.pruning)
  if t.quantization.bits and config.model.dtype == "float16":  # qwix's scales: qarray.compute_scale_zero_point
    raise UserError(f"train.quantization.bits={t.quantization.bits} with model.dtype=float16: qwix computes the "
                    "quantization scales in the compute dtype and replaces one under sqrt(float16's smallest "
                    "normal) = 0.0078 by 1, which rounds a typical weight to 0; train quantization-aware in "
                    "float32 or bfloat16")
  if t.lora.rank and t.quantization.bits:
    raise UserError(f"train.lora.rank={t.lora.rank} with train.quantization.bits={t.quantization.bits}: LoRA "
                    f"adapts float kernels; quantization-aware training of a LoRA run is not supported")
  if t.distill.teacher and config.parallel.strategy == "pmap":
    raise UserError("train.distill.teacher is set but parallel.strategy=pmap cannot take the teacher: use dp or fsdp")
  if t.batch_size % t.grad_accum_steps:
    raise UserError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")


def _check_parallel(p) -> None:
  """The mesh's axis sizes and the sharding rules."""
  sizes = parse_mesh(p.mesh, p.strategy)
  if any(n != -1 and n < 1 for n in sizes.values()):
    raise UserError(f"parallel.mesh={p.mesh!r}: every axis size must be a positive integer or -1")
  dcn = parse_mesh(p.dcn_mesh, "single", "parallel.dcn_mesh")
  if any(n < 1 for n in dcn.values()):
    raise UserError(f"parallel.dcn_mesh={p.dcn_mesh!r}: every axis size must be a positive integer")
  _check_rules("parallel.rules", p.rules, lambda n: isinstance(n, str), "logical axis name", MESH_AXES)
  _check_rules("parallel.fallback_rules", p.fallback_rules, _is_regex, "path regex", MESH_AXES)
  activation_rules(p.activation_rules)


def _check_pipeline(config, task: str) -> None:
  """A `stage` mesh axis: the family, layers and batch sizes its schedule needs (jaxmodels.parallel.pipeline)."""
  p, m, t = config.parallel, config.model, config.train
  stages = parse_mesh(p.mesh, p.strategy)["stage"]
  if stages in (1, -1):
    return
  if p.strategy == "pmap":
    raise UserError(f"parallel.mesh={p.mesh!r}: pipeline stages need a jit strategy (dp, fsdp or tp), not pmap")
  if m.family != "transformer" or task != "lm" or not m.scan_layers:
    raise UserError(f"parallel.mesh={p.mesh!r}: pipeline parallelism (stage={stages}) runs the Transformer LM "
                    f"(model.family=transformer, a language-model data.source) with model.scan_layers=True only")
  if m.num_experts:
    raise UserError(f"parallel.mesh={p.mesh!r}: pipeline parallelism (stage={stages}) runs dense Transformers "
                    f"only, not model.num_experts={m.num_experts} (use the expert axis for mixtures of experts)")
  schedule = pipeline.Schedule(stages, p.pipeline_microbatches or stages, p.pipeline_repeats)
  try:
    schedule.check(m.num_layers, t.batch_size // t.grad_accum_steps)
    schedule.check(m.num_layers, t.eval_batch_size)
  except ValueError as e:
    raise UserError(str(e)) from None


def _check_context(config, task: str) -> None:
  """A `context` mesh axis (context parallelism) splits a Transformer LM's sequences into 2 x context chunks."""
  context = parse_mesh(config.parallel.mesh, config.parallel.strategy)["context"]
  if context == 1:
    return
  if config.model.family != "transformer" or task != "lm":
    raise UserError(f"parallel.mesh={config.parallel.mesh!r}: the context axis splits the sequences of the "
                    f"Transformer LM only (model.family=transformer on text or tokens), not model.family="
                    f"{config.model.family} on data.source={config.data.source}")
  m, sizes = config.model, parse_mesh(config.parallel.mesh, config.parallel.strategy)
  # The ring attends by segment ids and causal places alone, each expert's tokens and each stage's micro-batches
  # are whole sequences: what it does not compute is refused, not approximated.
  unsupported = [what for what, on in (
      ("model.sliding_window", m.sliding_window is not None), ("model.attn_logit_softcap", m.attn_logit_softcap),
      (f"model.num_experts={m.num_experts}", m.num_experts), (f"stage={sizes['stage']}", sizes["stage"] not in (1, -1)),
      (f"expert={sizes['expert']}", sizes["expert"] not in (1, -1))) if on]
  if unsupported:
    raise UserError(f"parallel.mesh={config.parallel.mesh!r}: context parallelism does not combine with "
                    f"{', '.join(unsupported)}")
  if context > 1:
    check_context_length(config.data.seq_len, context, "data.seq_len")


def expand_preset(config: config_dict.ConfigDict) -> None:
  """Writes `model.preset`'s family and fields into the `model.*` keys still at their defaults (idempotent).

  The config then records the values the run uses (config.json, resume checks).
  Raises UserError if `model.family` was set to another family than the preset's.
  """
  m = config.model
  if not m.preset:
    return
  preset, defaults = presets.get(m.preset), default_config().model
  if m.family not in (defaults.family, preset.family):
    raise UserError(f"model.family={m.family!r} contradicts model.preset={m.preset!r}, a {preset.family} preset")
  m.family = preset.family
  for field in dataclasses.fields(preset.config):
    if m[field.name] == defaults[field.name]:
      m[field.name] = getattr(preset.config, field.name)


def fit_to_steps(config: config_dict.ConfigDict) -> list[str]:
  """Adjusts keys that must stay below `train.steps`, so that `--config.train.steps=N` alone always runs, and
  fills `checkpoint.keep_best` from `train.early_stopping`.

  A `train.warmup_steps` that is not below `train.steps` (an experiment's warmup
  after a shortening override) becomes a tenth of the run; a `train.profile_steps`
  window that starts past the run is reported. Returns one notice per adjustment,
  for the caller to print; the config records the values the run uses.
  """
  t, notices = config.train, []
  if t.early_stopping.metric and not config.checkpoint.keep_best:  # early stopping's best checkpoint is kept
    config.checkpoint.keep_best, config.checkpoint.best_mode = t.early_stopping.metric, t.early_stopping.mode
  if t.warmup_steps >= t.steps:
    warmup = t.steps // 10
    notices.append(f"train.warmup_steps={t.warmup_steps} is not below train.steps={t.steps}: warming up over "
                   f"{warmup} steps (a tenth of the run) instead")
    t.warmup_steps = warmup
  if t.pruning.sparsity and t.pruning.end_step >= t.steps:
    notices.append(f"train.pruning.end_step={t.pruning.end_step} is not below train.steps={t.steps}: this run "
                   f"stops before the final sparsity {t.pruning.sparsity} (a resumed longer run reaches it)")
  if t.profile_steps and t.profile_steps[0] >= t.steps:
    notices.append(f"train.profile_steps={tuple(t.profile_steps)} starts at or after train.steps={t.steps}: "
                   f"no profile will be written")
  return notices
