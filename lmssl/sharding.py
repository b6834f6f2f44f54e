"""The device mesh, the one table of logical-axis rules, and shardings derived from it.

Model code names axes logically (`embed`, `mlp`, ...); only this table says where they go. A
logical axis may appear in several rules: flax takes the first whose mesh axes are still free in
that array, so activations (batch on data+fsdp) keep `embed` replicated while weights shard it.
Key/value heads are few by design (8 in Llama 3, 1 with multi-query attention): where their
mesh axes do not divide them, they are replicated instead (`REPLICATED_WHEN_UNEVEN`).
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lmssl import errors

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("pos", None),
    ("types", None),
    ("norm", None),
    ("lora", None),
    ("classes", None),
)
# Logical axes that are replicated, not split, where their mesh axes do not divide them.
REPLICATED_WHEN_UNEVEN = ("kv_heads",)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the config's (data, fsdp, tensor), where one may be -1, against the devices."""
  shape = [mesh_cfg[a] for a in MESH_AXES]
  named = f"mesh {dict(zip(MESH_AXES, shape))}"
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise errors.UserError(f"{named} is invalid: sizes must be positive and at most one may be "
                           "-1 (it takes the remaining devices)")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise errors.UserError(f"{named} does not divide {num_devices} devices; choose axis sizes "
                           f"whose product divides {num_devices}")
  if -1 not in shape and known != num_devices:
    raise errors.UserError(f"{named} uses {known} devices but {num_devices} are present; set "
                           "one axis to -1 to take the rest")
  return tuple(num_devices // known if s == -1 else s for s in shape)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all, of every process)."""
  devices = jax.devices() if devices is None else devices
  grid = device_grid(mesh_shape(mesh_cfg, len(devices)), devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: tuple[int, ...], devices) -> np.ndarray:
  """`devices` laid out in a `shape` array that respects the interconnect.

  One TPU slice is one fast (ICI) network, hosts included: the whole slice is laid out by its
  topology. Between TPU slices (`slice_index`), and between the hosts of other platforms,
  the network is slower (DCN, Ethernet/InfiniBand), so only the data axis crosses it, then
  fsdp if data is smaller than the number of slices or hosts; tensor parallelism never does.
  """
  slices = {getattr(d, "slice_index", 0) for d in devices}
  hosts = {d.process_index for d in devices}
  if len(slices) > 1:
    granules, what = len(slices), "slices"
  elif len(hosts) > 1 and devices[0].platform != "tpu":
    granules, what = len(hosts), "hosts"
  else:
    return jax.make_mesh(shape, MESH_AXES, devices=devices).devices
  outer = across_hosts(shape, granules, what)
  inner = tuple(s // o for s, o in zip(shape, outer))
  return mesh_utils.create_hybrid_device_mesh(inner, outer, devices,
                                              process_is_granule=what == "hosts")


def across_hosts(shape: tuple[int, ...], hosts: int, what: str = "hosts") -> tuple[int, ...]:
  """How many of each mesh axis's positions lie across `hosts`: data first, then fsdp."""
  data, fsdp, tensor = shape
  named = f"mesh {dict(zip(MESH_AXES, shape))}"
  if data % hosts == 0:
    return hosts, 1, 1
  if hosts % data == 0 and fsdp % (hosts // data) == 0:
    return data, hosts // data, 1
  raise errors.UserError(
      f"{named} cannot span {hosts} {what}: the data axis (then fsdp) is what crosses "
      f"{what}, so data must be a multiple of {hosts}, or divide it with fsdp taking the rest; "
      f"e.g. --config.mesh.data=-1 --config.mesh.tensor={tensor} keeps tensor within a host")


def host_rows(mesh, global_batch: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, ascending: what it reads."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = set()
  for (index,) in index_map.values():
    rows.update(range(*index.indices(global_batch)))
  return np.array(sorted(rows), dtype=np.int64)


def mesh_axes(names: tuple, shape: tuple, mesh) -> P:
  """The mesh axes of an array of `shape` whose dims are named `names`, by the rules table."""
  spec = nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)
  out = []
  for name, size, axes in zip(names, shape, spec):
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    out.append(None if name in REPLICATED_WHEN_UNEVEN and size % ways else axes)
  return P(*out)


def logical_shardings(abstract_tree, mesh):
  """NamedShardings for a tree whose leaves are boxed with logical names (others replicate)."""
  def sharding_of(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, mesh_axes(x.names, x.value.shape, mesh))
    return replicated(mesh)
  return jax.tree.map(sharding_of, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh) -> NamedSharding:
  axes = nn.logical_to_mesh_axes(("batch",), LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, P(*axes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles each host's rows (`host_rows`, in order) into global arrays sharded over the
  batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
