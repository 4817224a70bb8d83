"""Knowledge distillation (`train.distill.*`): a student trains on a trained teacher run's softened outputs.

    loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton, Vinyals & Dean 2015: T^2 keeps the soft term's gradients on the hard
term's scale as T changes.) Both terms are summed over the targets in float32
and divided once by the batch's target count, as the hard loss alone is
(jaxmodels.train.step.make_steps), so language models distill per token.

The teacher is any family: its model is rebuilt from its run's own config.json
and model.json, with the parameters of its newest checkpoint (local or gs://).
Its forward pass (train=False: no dropout, BatchNorm's running statistics) runs
inside the student's compiled train step; its arrays are an argument of that
step, sharded by the run's parameter rules, neither donated nor differentiated
(not constants baked into the program). The train metrics' `loss` stays the
hard-label loss, comparable with an undistilled run's.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmodels import parallel
from jaxmodels.runs import export
from jaxmodels.runs.state import split_model
from jaxmodels.runtime import storage
from jaxmodels.runtime.errors import UserError

__all__ = ["kl_sum", "load_teacher", "SOFTMAX_TASKS", "StepWithTeacher", "Teacher"]

SOFTMAX_TASKS = ("classify", "lm")  # the tasks whose outputs are softmax logits, which a temperature softens


@dataclasses.dataclass
class Teacher:
  """A loaded teacher: its graph, its arrays ({"params", "model_state"} pure dicts on the mesh) and the mixing
  constants."""

  graphdef: nnx.GraphDef
  variables: dict
  shardings: dict  # like `variables`: where the step takes them
  temperature: float
  alpha: float

  def objective(self, logits, x, mask, hard_sum, variables):
    """The student's summed objective (float32 scalar) for one (micro-)batch.

    `logits` the student's (*targets, C); `x` the model input; `mask` (*targets)
    0/1; `hard_sum` the summed hard-label loss; `variables` the teacher's arrays
    as passed to the step (traced).
    """
    model = nnx.merge(self.graphdef, variables["params"], variables["model_state"])
    teacher = jax.lax.stop_gradient(model(x, train=False))
    return (1.0 - self.alpha) * hard_sum + self.alpha * self.temperature**2 * kl_sum(logits, teacher, mask,
                                                                                     self.temperature)


def kl_sum(student_logits, teacher_logits, mask, temperature: float):
  """sum over unmasked targets of KL(softmax(teacher / T) || softmax(student / T)), float32 (nats)."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.sum(kl * mask.astype(jnp.float32))


def _read(workdir, name: str):
  path = storage.path(workdir) / name
  return json.loads(path.read_text()) if path.is_file() else None


def _split_settings(config: dict) -> dict:
  """The settings that decide which examples a run holds out: the data, and where a seeded shuffle splits it
  (digits, image folders) its fraction and `train.seed`; a text's last `val_fraction`."""
  data = config["data"]
  keys = {"data.source": data["source"], "data.path": data["path"]}
  if data["source"] in ("digits", "images"):
    keys.update({"data.test_fraction": data["test_fraction"], "train.seed": config["train"]["seed"]})
  elif data["source"] == "text":
    keys["data.val_fraction"] = data["val_fraction"]
  return keys


def load_teacher(config, dataset, layout) -> Teacher | None:
  """The teacher of `train.distill.teacher` for a student on `dataset`, placed on `layout`'s mesh (a
  parallel.Layout), or None when distillation is off.

  Raises UserError (before anything is written) when the teacher's workdir holds
  no run or no checkpoint, or was trained on other data: another task, input
  shape, number of outputs (classes, vocabulary size) or vocabulary, or another
  held-out split (`_split_settings`).
  """
  d = config.train.distill
  if not d.teacher:
    return None
  where = f"train.distill.teacher={d.teacher!r}"
  if dataset.task not in SOFTMAX_TASKS:
    raise UserError(f"{where}: distillation needs a softmax task ({', '.join(SOFTMAX_TASKS)}), not "
                    f"data.task={dataset.task}")
  spec = _read(d.teacher, "model.json")
  if spec is None or _read(d.teacher, "config.json") is None:
    raise UserError(f"{where}: no config.json and model.json there: not a jaxmodels run")
  ours = {"task": dataset.task, "input_shape": list(dataset.input_shape), "num_outputs": dataset.num_outputs}
  theirs = {k: spec.get(k) for k in ours}
  if theirs != ours:
    diff = ", ".join(f"{k} {theirs[k]} (student {ours[k]})" for k in ours if theirs[k] != ours[k])
    raise UserError(f"{where} was trained on other data: {diff}; teacher and student must share the dataset")
  vocab = dataset.files().get("vocab.json")
  if vocab is not None and _read(d.teacher, "vocab.json") != json.loads(vocab):
    raise UserError(f"{where} has another vocabulary (vocab.json) than the student's data")
  split, student_split = _split_settings(_read(d.teacher, "config.json")), _split_settings(config.to_dict())
  if split != student_split:
    diff = ", ".join(f"{k}={split.get(k)!r} (student {v!r})" for k, v in student_split.items() if split.get(k) != v)
    raise UserError(f"{where} held out other examples ({diff}): it has trained on some of the student's eval "
                    f"split, which would leak into its soft targets; train both with the same settings")
  try:
    model = export.load_run_model(d.teacher)
  except UserError as e:  # e.g. "RUN has no checkpoint"
    raise UserError(f"{where}: {e}") from None
  graphdef, params, model_state = split_model(model)
  # Parameters split by the run's parallel.rules (e.g. over fsdp like the student's), other state replicated.
  p = config.parallel
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  specs = parallel.partition_specs(nnx.state(model, nnx.Param), layout.mesh, p.rules, p.fallback_rules)
  shardings = {"params": jax.tree.map(layout.named, specs, is_leaf=is_spec),
               "model_state": jax.tree.map(lambda _: layout.replicated, model_state)}
  variables = jax.device_put({"params": params, "model_state": model_state}, shardings)
  return Teacher(graphdef, variables, shardings, d.temperature, d.alpha)


class StepWithTeacher:
  """A jitted (state, batch, teacher arrays) step that is called, lowered and traced as (state, batch), so the
  loop, the recompile alarm and `jaxmodels bench` use it like the plain step."""

  def __init__(self, jitted, variables):
    self.jitted, self.variables = jitted, variables

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.variables)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.variables)

  def trace(self, state, batch):
    return self.jitted.trace(state, batch, self.variables)

  def _cache_size(self) -> int:
    return self.jitted._cache_size()  # pylint: disable=protected-access
