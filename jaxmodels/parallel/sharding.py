"""Device meshes and shardings: how the train state and batches are laid out over devices.

The mesh always has the three axes `data`, `fsdp` and `tensor` (unused ones of
size 1), so one set of rules serves every strategy:

- modules name each parameter dimension's logical axis (`embed`, `mlp`,
  `heads`, `vocab`, `conv_out`, `layers`, ...; see `jaxmodels.models.layers.axes`);
- `parallel.rules` maps logical names to mesh axes (`embed -> fsdp`,
  `heads -> tensor`, ...);
- a parameter nobody named falls back to `parallel.fallback_rules`: the first
  regex that matches its path picks a mesh axis, and the parameter's largest
  dimension divisible by that axis is split over it (big_vision-style), so CNN,
  MLP and LSTM weights can be FSDP-sharded too;
- batches split their leading axis over `data` x `fsdp`.
"""

import dataclasses
import math
import re

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodels.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("single", "dp", "fsdp", "tp", "pmap")
DEFAULT_MESH = {"single": "", "dp": "data=-1", "fsdp": "fsdp=-1", "tp": "tensor=-1", "pmap": "data=-1"}


def parse_mesh(spec: str, strategy: str) -> dict[str, int]:
  """`"data=2,tensor=4"` -> {'data': 2, 'fsdp': 1, 'tensor': 4}; empty: the strategy's default."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, (spec or DEFAULT_MESH[strategy]).replace(" ", "").split(",")):
    name, _, value = part.partition("=")
    if name not in MESH_AXES:
      raise UserError(f"parallel.mesh: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"parallel.mesh: {part!r} is not AXIS=SIZE") from None
  return sizes


def make_mesh(parallel_config, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all global devices; one size may be -1 (the rest)."""
  strategy = parallel_config.strategy
  if strategy not in STRATEGIES:
    raise UserError(f"parallel.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
  devices = list(jax.devices() if devices is None else devices)
  if strategy == "single":
    if parallel_config.mesh:
      raise UserError("parallel.strategy=single runs on one device: leave parallel.mesh empty")
    devices = devices[:1]
  sizes = parse_mesh(parallel_config.mesh, strategy)
  fill = [a for a, n in sizes.items() if n == -1]
  if len(fill) > 1:
    raise UserError(f"parallel.mesh: only one axis may be -1, got {', '.join(fill)}")
  known = math.prod(n for n in sizes.values() if n != -1)
  if fill:
    if len(devices) % known:
      raise UserError(f"parallel.mesh={parallel_config.mesh or DEFAULT_MESH[strategy]!r}: the fixed axes "
                      f"({known} devices) do not divide the {len(devices)} devices")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise UserError(f"parallel.mesh {sizes} needs {math.prod(sizes.values())} devices, "
                    f"but {len(devices)} are available")
  if strategy == "pmap" and (sizes["fsdp"] > 1 or sizes["tensor"] > 1):
    raise UserError("parallel.strategy=pmap is data-parallel only: use dp, fsdp or tp for other axes")
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


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
    else:
      spec = (None,) * len(shape)
      axis = next((a for pattern, a in fallback_rules if re.search(pattern, name)), None)
      if axis is not None and mesh.shape[axis] > 1:
        divisible = [i for i, d in enumerate(shape) if d % mesh.shape[axis] == 0]
        if divisible:
          largest = max(divisible, key=lambda i: shape[i])
          spec = tuple(axis if i == largest else None for i in range(len(shape)))
    _set(specs, path, P(*spec))
  return specs


def fetch(tree):
  """Host copies of replicated (or pmap-replicated) arrays: the first local copy of each, explicitly."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))


class _Share:
  """What both layouts share: which rows of a global batch this process loads."""

  data_parallel_size: int

  def local_share(self, global_batch_size: int) -> tuple[int, int]:
    """(index, count): this process loads rows [index*B/count, (index+1)*B/count) of each batch."""
    if global_batch_size % self.data_parallel_size:
      raise UserError(f"batch size {global_batch_size} is not divisible by the data-parallel size "
                      f"{self.data_parallel_size}")
    return jax.process_index(), jax.process_count()

  fetch = staticmethod(fetch)


@dataclasses.dataclass
class Layout(_Share):
  """jit strategies: the train state sharded by the rules over a mesh, batches over data x fsdp."""

  mesh: Mesh
  param_specs: dict

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
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def device_count(self) -> int:
    """Devices the step runs on, over all processes."""
    return self.mesh.size

  def state_shardings(self, state_cls, abstract_state, tx):
    """Shardings for a TrainState: params by the rules, optimizer moments like their params."""
    params = jax.tree.map(self.named, self.param_specs, is_leaf=lambda x: isinstance(x, P))
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                      transform_non_params=lambda _: self.replicated)
    return state_cls(step=self.replicated, params=params,
                     model_state=jax.tree.map(lambda _: self.replicated, abstract_state.model_state),
                     opt_state=opt_state)

  def abstract_batch(self, local_batch: dict) -> dict:
    """ShapeDtypeStructs of `global_batch(local_batch)` (single process), for lowering without data."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in local_batch.items()}

  def global_batch(self, local_batch: dict) -> dict:
    """Global arrays sharded over data x fsdp, each process contributing its own rows."""
    with jax.transfer_guard("allow"):  # an explicit transfer, which the guard cannot tell from an implicit one
      return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}

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

  def global_batch(self, local_batch: dict) -> dict:
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
