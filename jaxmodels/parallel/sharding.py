"""Device meshes and shardings: how the train state and batches are laid out over devices.

The mesh always has the axes `stage`, `data`, `fsdp`, `context`, `tensor` and `expert`
(unused ones of size 1), so one set of rules serves every strategy (`stage`, pipeline parallelism:
`jaxmodels.parallel.pipeline`; `context`, context parallelism: `jaxmodels.parallel.context`; `expert`, expert
parallelism: `jaxmodels.parallel.experts`):

- modules name each parameter dimension's logical axis (`embed`, `mlp`,
  `heads`, `vocab`, `conv_out`, `layers`, ...; see `jaxmodels.models.layers.axes`);
- `parallel.rules` maps logical names to mesh axes (`embed -> fsdp`,
  `heads -> tensor`, ...);
- a parameter nobody named falls back to `parallel.fallback_rules`: the first
  regex that matches its path picks a mesh axis, and the parameter's largest
  dimension divisible by that axis is split over it (big_vision-style), so CNN,
  MLP and LSTM weights can be FSDP-sharded too;
- batches split their leading axis over `data` x `fsdp`; each process loads
  exactly the rows its devices hold (`process_rows`), so replicas of a row on
  different processes always hold the same data;
- activations are pinned too: modules call `constrain(x, ("activation_batch",
  ...))` on their activations, and `parallel.activation_rules` maps those
  logical names to mesh axes inside `activation_sharding(mesh, rules)`, the
  context the train and eval steps are traced in. Without the pins XLA may
  settle a clash (batch split over `fsdp`, weights' `embed` split over `fsdp`)
  by gathering the batch instead of the weights. Outside that context (research
  code, pmap) `constrain` returns its input;
- sequence parallelism (Megatron-LM's, Korthikanti et al. 2022) is a rule too:
  the residual stream, norms, dropout and logits between the tensor-parallel
  regions name their token axis `activation_norm_length` (MaxText's name),
  which `parallel.activation_rules` maps to `tensor`. Pinning the
  tensor-parallel regions' inputs whole and their outputs split makes XLA
  all-gather the tokens before QKV and the MLP and reduce-scatter after the
  output projections (on the CPU: an all-reduce and a slice); under `dp` or
  `fsdp` the `tensor` axis has size 1 and the rule does nothing;
- context parallelism is a rule too: `activation_length` -> `context` splits
  each sequence's tokens over `context`; attention alone needs a collective
  (`jaxmodels.parallel.context`).

Meshes come from `jax.make_mesh` (which orders TPU devices by their ICI
topology); `parallel.dcn_mesh` splits axes across slices (or, on platforms
without slices, processes) through `mesh_utils.create_hybrid_device_mesh`.
"""

import contextvars
import dataclasses
import functools
import math
import re

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels.runtime.errors import UserError

__all__ = ["ACTIVATION_AXES", "active_mesh", "active_sharding", "activation_rules", "activation_sharding",
           "activation_spec", "BATCH_AXES", "constrain", "DEFAULT_MESH", "fetch", "Layout", "make_mesh", "MESH_AXES",
           "opt_state_shardings", "param_shardings", "parse_mesh", "partition_specs", "per_device_bytes", "per_shard",
           "PmapLayout", "process_rows", "STRATEGIES"]

# stage: pipeline parallelism (jaxmodels.parallel.pipeline); context: context parallelism (jaxmodels.parallel.context);
# expert: expert parallelism (jaxmodels.parallel.experts)
MESH_AXES = ("stage", "data", "fsdp", "context", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # `expert` splits the batch too: its devices hold different experts
STRATEGIES = ("single", "dp", "fsdp", "tp", "pmap")
DEFAULT_MESH = {"single": "", "dp": "data=-1", "fsdp": "fsdp=-1", "tp": "tensor=-1", "pmap": "data=-1"}


def parse_mesh(spec: str, strategy: str, key: str = "parallel.mesh") -> dict[str, int]:
  """`"data=2,tensor=4"` -> {'data': 2, 'fsdp': 1, 'tensor': 4}; empty: the strategy's default."""
  sizes, seen = dict.fromkeys(MESH_AXES, 1), set()
  for part in filter(None, (spec or DEFAULT_MESH[strategy]).replace(" ", "").split(",")):
    name, _, value = part.partition("=")
    if name not in MESH_AXES:
      raise UserError(f"{key}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
    if name in seen:
      raise UserError(f"{key}: axis {name!r} is given twice")
    seen.add(name)
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"{key}: {part!r} is not AXIS=SIZE") from None
  return sizes


def make_mesh(parallel_config=None, devices=None, *, strategy: str | None = None, mesh: str = "",
              dcn_mesh: str = "") -> Mesh:
  """The (stage, data, fsdp, context, tensor, expert) mesh over `devices` (default: all global devices); one size
  may be -1 (the rest).

  Plain arguments: `strategy` (one of STRATEGIES), `mesh` (`"data=2,fsdp=-1"`; empty: the strategy's
  default, `DEFAULT_MESH`) and `dcn_mesh` (the sizes of the axes that cross TPU slices or processes; empty: none),
  e.g. `make_mesh(strategy="fsdp")` for every device on `fsdp`. `parallel_config` instead: the `parallel.*`
  config group (a ConfigDict or a dict with those keys). Raises UserError for a bad strategy or mesh, naming
  the `parallel.*` key; TypeError when both forms or neither are given.
  """
  if parallel_config is not None:
    if strategy is not None or mesh or dcn_mesh:
      raise TypeError("make_mesh takes a parallel config or strategy=/mesh=/dcn_mesh=, not both")
    get = parallel_config.get
    return make_mesh(devices=devices, strategy=get("strategy"), mesh=get("mesh", "") or "",
                     dcn_mesh=get("dcn_mesh", "") or "")
  if strategy is None:
    raise TypeError("make_mesh needs strategy= (one of " + ", ".join(STRATEGIES) + ") or a parallel config")
  if strategy not in STRATEGIES:
    raise UserError(f"parallel.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
  devices = list(jax.devices() if devices is None else devices)
  if strategy == "single":
    if mesh:
      raise UserError("parallel.strategy=single runs on one device: leave parallel.mesh empty")
    if jax.process_count() > 1:
      raise UserError(f"parallel.strategy=single runs on one device, but this job has {jax.process_count()} "
                      f"processes, each of which must feed devices of the mesh: choose dp, fsdp or tp")
    devices = devices[:1]
  sizes = parse_mesh(mesh, strategy)
  fill = [a for a, n in sizes.items() if n == -1]
  if len(fill) > 1:
    raise UserError(f"parallel.mesh: only one axis may be -1, got {', '.join(fill)}")
  known = math.prod(n for n in sizes.values() if n != -1)
  if fill:
    if len(devices) % known:
      raise UserError(f"parallel.mesh={mesh or DEFAULT_MESH[strategy]!r}: the fixed axes "
                      f"({known} devices) do not divide the {len(devices)} devices")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise UserError(f"parallel.mesh {sizes} needs {math.prod(sizes.values())} devices, "
                    f"but {len(devices)} are available")
  if strategy == "pmap" and any(sizes[a] > 1 for a in ("stage", "fsdp", "context", "tensor", "expert")):
    raise UserError("parallel.strategy=pmap is data-parallel only: use dp, fsdp or tp for other axes")
  shape = tuple(sizes[a] for a in MESH_AXES)
  dcn_spec = dcn_mesh
  dcn = parse_mesh(dcn_spec, "single", "parallel.dcn_mesh")
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if math.prod(dcn.values()) == 1:
    if len(slices) > 1:
      raise UserError(f"the devices span {len(slices)} TPU slices: set parallel.dcn_mesh (e.g. "
                      f"data={len(slices)}) to say which mesh axis crosses them")
    # Auto axes: shardings stay hints that XLA propagates (jax.make_mesh's default is Explicit).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
  bad = [a for a in MESH_AXES if sizes[a] % dcn[a]]
  if bad:
    raise UserError(f"parallel.dcn_mesh={dcn_spec!r}: mesh axis {bad[0]!r} of size "
                    f"{sizes[bad[0]]} cannot be split {dcn[bad[0]]} ways across slices")
  ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
  try:
    # Devices without slice_index (CPU, GPU) or a single slice: each process is a granule.
    grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                process_is_granule=len(slices) == 1)
  except ValueError as e:
    raise UserError(f"parallel.dcn_mesh={dcn_spec!r} does not fit the devices: "
                    f"{str(e).splitlines()[0]}") from None
  return Mesh(grid, MESH_AXES)


def process_rows(sharding: NamedSharding, batch_size: int, devices) -> np.ndarray:
  """Sorted indices of the global batch rows that `devices` hold under `sharding` (int64, (R,)).

  A pure function of the sharding and a device list (a process's devices), so
  it can be checked for any pretended split of devices over processes. Rows of
  a replicated or partly replicated batch appear once however many of the
  devices hold them, and every process that holds a row loads it.
  """
  index_map = sharding.devices_indices_map((batch_size,))
  return np.unique(np.concatenate([np.arange(batch_size)[index_map[d][0]] for d in devices]))


def _names(variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def partition_specs(abstract_state: nnx.State, mesh: Mesh, rules, fallback_rules) -> dict:
  """A pure dict of PartitionSpecs, shaped like `nnx.to_pure_dict(abstract_state)`."""
  rules = dict(rules)
  unknown = [a for a in rules.values() if a is not None and a not in MESH_AXES]
  if unknown:
    raise UserError(f"parallel.rules map to unknown mesh axes {unknown} (axes: {', '.join(MESH_AXES)})")
  specs = {}
  for path, variable in nnx.to_flat_state(abstract_state):
    shape = variable.get_value().shape
    name = "/".join(map(str, path))
    names = _names(variable)
    if names is not None:
      spec = tuple(rules.get(n) if mesh.shape.get(rules.get(n), 1) > 1 else None for n in names)
      for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
          raise UserError(f"parameter {name} of shape {shape}: dimension {dim} ({names[spec.index(axis)]}) "
                          f"cannot be split over mesh axis {axis!r} of size {mesh.shape[axis]}")
      spec = P(*spec)
    else:
      spec = _fallback_spec(name, shape, mesh, fallback_rules)
    _set(specs, path, spec)
  return specs


def _fallback_spec(name: str, shape: tuple, mesh: Mesh, fallback_rules) -> P:
  """A parameter without logical names: the first `fallback_rules` regex matching `name` picks a mesh axis, which
  splits the largest dimension it divides (unsplit when none matches or none divides)."""
  spec = (None,) * len(shape)
  axis = next((a for pattern, a in fallback_rules if re.search(pattern, name)), None)
  if axis is not None and mesh.shape[axis] > 1:
    divisible = [i for i, d in enumerate(shape) if d % mesh.shape[axis] == 0]
    if divisible:
      largest = max(divisible, key=lambda i: shape[i])
      spec = tuple(axis if i == largest else None for i in range(len(shape)))
  return P(*spec)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_shardings(params, mesh: Mesh, rules=(), fallback_rules=()):
  """NamedShardings over `mesh` for a parameter pytree, by the logical-axis `rules` (`parallel.rules`).

  `params` is either an `nnx.State` of parameter variables (`nnx.state(model, nnx.Param)`, of arrays or
  abstract values from `nnx.eval_shape`), whose logical axis names (`embed`, `mlp`, ...) `rules` maps to mesh
  axes: the result is shaped like `nnx.to_pure_dict(params)`, the parameters `runs.state.split_model` gives;
  or any pytree of arrays or ShapeDtypeStructs (no logical names): the result has its structure. A parameter
  without names is split by `fallback_rules` ((regex over its "a/b/kernel" path, mesh axis) pairs: the first
  match splits its largest dimension that axis divides) or replicated. Raises UserError for a rule naming an
  unknown mesh axis or a dimension that does not divide its axis.
  """
  if isinstance(params, nnx.State):
    specs = partition_specs(params, mesh, rules, fallback_rules)
  else:
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: _fallback_spec(_path_name(path), x.shape, mesh, fallback_rules), params)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, params, shardings, opt_state=None):
  """NamedShardings for `tx.init(params)`'s state: each per-parameter leaf (Adam's moments, ...) like its
  parameter in `shardings` (a pytree of NamedShardings shaped like `params`, e.g. `param_shardings`'s), every
  other leaf (step counts, a loss scale) replicated over their mesh.

  `params`: the parameter pytree (arrays or ShapeDtypeStructs); `opt_state`: the (abstract) state if already
  built, else `jax.eval_shape(tx.init, params)`. Works for any optax transformation whose state optax can map
  to parameters (`optax.tree_map_params`). Returns a pytree shaped like the optimizer state.
  """
  opt_state = jax.eval_shape(tx.init, params) if opt_state is None else opt_state
  replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, P())
  # A frozen parameter's place in a partitioned (optax.partition, masked) state is an empty MaskedNode: kept.
  masked = lambda v: isinstance(v, optax.MaskedNode)
  return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_state, shardings,
                               transform_non_params=lambda _: replicated, is_leaf=masked)


ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_norm_length", "activation_embed",
                   "activation_heads", "activation_mlp", "activation_vocab")
# (mesh, {logical activation axis: mesh axes}) while a step is traced; None outside.
_ACTIVATIONS = contextvars.ContextVar("jaxmodels_activation_sharding", default=None)


def activation_rules(rules) -> dict[str, tuple[str, ...]]:
  """`parallel.activation_rules` pairs -> {logical activation axis: mesh axes}; UserError for unknown axes."""
  if bad := [r for r in rules if not (isinstance(r, (tuple, list)) and len(r) == 2)]:
    raise UserError(f"parallel.activation_rules: {bad[0]!r} is not a pair (activation axis, mesh axis, "
                    f"tuple of mesh axes, or None)")
  rules = {name: (axes,) if isinstance(axes, str) else tuple(axes or ()) for name, axes in rules}
  for name, axes in rules.items():
    if name not in ACTIVATION_AXES:
      raise UserError(f"parallel.activation_rules: unknown axis {name!r} (axes: {', '.join(ACTIVATION_AXES)})")
    if unknown := [a for a in axes if a not in MESH_AXES]:
      raise UserError(f"parallel.activation_rules: {name} maps to unknown mesh axes {unknown} "
                      f"(axes: {', '.join(MESH_AXES)})")
  return rules


class activation_sharding:  # pylint: disable=invalid-name  (a function in use: `with activation_sharding(...)`)
  """`activation_sharding(mesh, rules)`: a context, and a function decorator, within which `constrain` pins
  activations to `mesh` by `rules`.

  `rules` (`parallel.activation_rules`) maps each logical activation axis to a
  mesh axis, a tuple of mesh axes (split over their product) or None. Raises
  UserError at once for an unknown logical or mesh axis. The train and eval
  steps are traced inside it, so the pins land in the compiled program. One
  object may be entered any number of times, nested or in turn (e.g. inside a
  jitted function traced once per input shape), and `@activation_sharding(mesh,
  rules)` on a function traces each call inside the context.
  """

  def __init__(self, mesh: Mesh, rules):
    self.mesh, self.rules = mesh, activation_rules(rules)
    self._tokens = []

  def __enter__(self):
    self._tokens.append(_ACTIVATIONS.set((self.mesh, self.rules)))
    return self

  def __exit__(self, *exc):
    _ACTIVATIONS.reset(self._tokens.pop())

  def __call__(self, fn):
    @functools.wraps(fn)
    def pinned(*args, **kwargs):
      with self:
        return fn(*args, **kwargs)
    return pinned


def active_sharding() -> tuple[Mesh, dict] | None:
  """(mesh, {logical activation axis: mesh axes}) of the `activation_sharding` being traced in; None outside."""
  return _ACTIVATIONS.get()


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `activation_sharding` context, None outside one."""
  active = _ACTIVATIONS.get()
  return None if active is None else active[0]


def activation_spec(shape, names, mesh: Mesh, rules: dict) -> P:
  """The PartitionSpec of an activation of `shape` whose leading dimensions have logical `names`.

  `rules` as `activation_rules` returns them. A name may be a tuple of logical
  names for a flattened dimension (token rows M = B x T: `("activation_batch",
  "activation_norm_length")`), which takes their mesh axes in order.
  Dimensions past `names`, names mapped to None, mesh axes of size 1 and mesh
  axes an earlier dimension already took are unsplit; a dimension takes its
  mesh axes in order while their product still divides it (a batch of 4 on
  data=2 x fsdp=4 is split over `data` only).
  """
  spec, used = [], set()
  for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
    axes, size = [], 1
    for logical in (name if isinstance(name, tuple) else (name,)):
      for axis in rules.get(logical, ()) if logical is not None else ():
        if mesh.shape[axis] > 1 and axis not in used and dim % (size * mesh.shape[axis]) == 0:
          axes.append(axis)
          used.add(axis)
          size *= mesh.shape[axis]
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """`x` pinned to the sharding its logical axis `names` (`activation_batch`, ...; None: unsplit) map to.

  `names` covers the leading dimensions (the rest are unsplit); see `activation_spec`. A no-op outside
  `activation_sharding`, so modules work unchanged without a mesh.
  """
  active = _ACTIVATIONS.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.shape, names, mesh, rules)))


def per_shard(fn, names):
  """`fn(*arrays)`, run on each device's shard (jax.shard_map) under `activation_sharding`; `fn` itself outside.

  For kernels XLA cannot partition (Pallas's Mosaic custom calls). `names` gives each argument's logical
  axes, as `constrain` takes them; the output is laid out as the first argument. A dimension split for one
  argument but not alike for another (heads that K key/value heads cannot share) is left whole for all.
  """
  active = _ACTIVATIONS.get()
  if active is None:
    return fn
  mesh, rules = active

  def sharded(*arrays):
    specs = [(*activation_spec(a.shape, n, mesh, rules), *(None,) * a.ndim)[:a.ndim] for a, n in zip(arrays, names)]
    for d in range(min(len(s) for s in specs)):
      if len({s[d] for s in specs}) > 1:
        specs = [s[:d] + (None,) + s[d + 1:] for s in specs]
    specs = [P(*s) for s in specs]
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*arrays)

  return sharded


def fetch(tree):
  """Host copies of replicated (or pmap-replicated) arrays: the first local copy of each, explicitly."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))


class _Share:
  """What both layouts share: which rows of a global batch this process loads."""

  data_parallel_size: int

  def check_batch_size(self, global_batch_size: int) -> None:
    """Raises UserError unless the batch splits evenly over the data-parallel devices."""
    if global_batch_size % self.data_parallel_size:
      raise UserError(f"batch size {global_batch_size} is not divisible by the data-parallel size "
                      f"{self.data_parallel_size}")

  fetch = staticmethod(fetch)


@dataclasses.dataclass
class Layout(_Share):
  """jit strategies: the train state sharded by the rules over a mesh, batches over data x fsdp."""

  mesh: Mesh
  param_specs: dict
  _rows: dict = dataclasses.field(default_factory=dict, repr=False)  # batch size -> local_rows

  def named(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> NamedSharding:
    return self.named(P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return self.named(P(BATCH_AXES))

  @property
  def data_parallel_size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

  @property
  def device_count(self) -> int:
    """Devices the step runs on, over all processes."""
    return self.mesh.size

  def describe(self) -> str:
    """The mesh's axis sizes and the process holding each of its devices, as a (stage, data, fsdp, context, tensor,
    expert) grid.

    Shows which axes cross processes (hosts; slices under `parallel.dcn_mesh`).
    """
    processes = np.vectorize(lambda d: d.process_index, otypes=[int])(self.mesh.devices)
    return f"mesh {dict(self.mesh.shape)}: process of each device {processes.tolist()}"

  def state_shardings(self, state_cls, abstract_state, tx):
    """Shardings for a TrainState: params by the rules, optimizer moments and the params' EMA like their params
    (`opt_state_shardings`), the rest replicated."""
    params = jax.tree.map(self.named, self.param_specs, is_leaf=lambda x: isinstance(x, P))
    opt_state = opt_state_shardings(tx, abstract_state.params, params, abstract_state.opt_state)
    return state_cls(step=self.replicated, params=params,
                     model_state=jax.tree.map(lambda _: self.replicated, abstract_state.model_state),
                     opt_state=opt_state, ema_params=None if abstract_state.ema_params is None else params,
                     loss_scale=jax.tree.map(lambda _: self.replicated, abstract_state.loss_scale))

  def abstract_batch(self, local_batch: dict) -> dict:
    """ShapeDtypeStructs of `global_batch(local_batch)` (single process), for lowering without data."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in local_batch.items()}

  def local_rows(self, global_batch_size: int) -> np.ndarray:
    """Indices of the rows of each global batch this process loads: those its devices hold (sorted)."""
    if global_batch_size not in self._rows:
      self.check_batch_size(global_batch_size)
      self._rows[global_batch_size] = process_rows(self.batch_sharding, global_batch_size, self.mesh.local_devices)
    return self._rows[global_batch_size]

  def global_batch(self, local_batch: dict, global_batch_size: int | None = None) -> dict:
    """Global arrays of `global_batch_size` rows (default: the local rows are the whole batch).

    `local_batch` holds rows `local_rows(global_batch_size)` in that order.
    """
    def put(v):
      shape = (global_batch_size or len(v), *v.shape[1:])
      return jax.make_array_from_process_local_data(self.batch_sharding, v, shape)

    with jax.transfer_guard("allow"):  # an explicit transfer, which the guard cannot tell from an implicit one
      return {k: put(v) for k, v in local_batch.items()}

  def for_checkpoint(self, state):
    return state

  def from_checkpoint(self, state):
    return state


@dataclasses.dataclass
class PmapLayout(_Share):
  """The pmap strategy: the state replicated on every local device, batches split on a leading device axis."""

  devices: list
  axis_name: str = "data"  # the step's jax.pmap axis_name

  @property
  def data_parallel_size(self) -> int:
    return len(self.devices) * jax.process_count()

  device_count = data_parallel_size

  @property
  def sharding(self) -> NamedSharding:
    """A leading device axis, one slice per local device (what pmap takes).

    Over a mesh like the one jax.pmap builds (same devices, its axis name), so
    inputs and the step's outputs have one sharding and the step compiles once.
    """
    return NamedSharding(Mesh(np.asarray(self.devices), (self.axis_name,)), P(self.axis_name))

  def _put(self, x):
    return jax.device_put(x, self.sharding)

  def _split(self, shape) -> tuple:
    n = len(self.devices)
    return (n, shape[0] // n, *shape[1:])

  def local_rows(self, global_batch_size: int) -> np.ndarray:
    """pmap's devices are process-major: process i loads the i-th contiguous slice of each batch."""
    self.check_batch_size(global_batch_size)
    n = global_batch_size // jax.process_count()
    return np.arange(jax.process_index() * n, (jax.process_index() + 1) * n)

  def global_batch(self, local_batch: dict, global_batch_size: int | None = None) -> dict:
    """Each process's rows, split over its local devices; pmap's inputs are per process (no global shape)."""
    del global_batch_size
    return {k: self._put(v.reshape(self._split(v.shape))) for k, v in local_batch.items()}

  def abstract_batch(self, local_batch: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(self._split(v.shape), v.dtype, sharding=self.sharding)
            for k, v in local_batch.items()}

  def replicate(self, state):
    """One copy per local device of a single-copy state, each put straight on its device.

    A device that already holds a copy of a leaf (a replicated restored array)
    keeps it; no device ever holds more than its own copy.
    """
    def copies(x):
      held = {s.device: s.data for s in getattr(x, "addressable_shards", ()) if s.data.shape == x.shape}
      per_device = [jax.device_put(held.get(d, x), d).reshape(1, *x.shape) for d in self.devices]
      return jax.make_array_from_single_device_arrays((len(self.devices), *x.shape), self.sharding, per_device)
    return jax.tree.map(copies, state)

  def for_checkpoint(self, state):
    """The first device's copy; with several processes, as arrays replicated over all of them.

    pmap's outputs are host-local arrays in a multi-process job, which Orbax
    cannot save; the copies on each process's devices are rewrapped (no data
    moves) as one global array over every device, in pmap's process-major order.
    """
    local = _first_copy(state)
    if jax.process_count() == 1:
      return local
    devices = [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]
    return multihost_utils.host_local_array_to_global_array(local, Mesh(np.asarray(devices), (self.axis_name,)),
                                                            P())

  def from_checkpoint(self, state):
    """Restored arrays (replicated over every process's devices, see `checkpoint_sharding`) in pmap's layout."""
    return self.replicate(state)

  def checkpoint_sharding(self) -> NamedSharding:
    """Where a restored leaf goes: replicated over every device, so each device reads its own copy."""
    devices = [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]
    return NamedSharding(Mesh(np.asarray(devices), (self.axis_name,)), P())


@jax.jit
def _first_copy(tree):
  """Each leaf's first device copy (all are equal), compiled: an eager x[0] would send its index to the device."""
  return jax.tree.map(lambda x: x[0], tree)


def per_device_bytes(tree) -> int:
  """Bytes of `tree` held on the first device (what FSDP/TP shrink)."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)
