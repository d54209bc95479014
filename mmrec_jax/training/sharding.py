"""Device mesh, logical-axis rules and shardings for params, optimizer state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism
with parameters sharded along `embed`) and `tensor` (model parallelism along the
vocab / hidden / fused / memory widths). Batches are sharded over (data, fsdp).
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmrec_jax.config.sections import MeshConfig
from mmrec_jax.models import layers
from mmrec_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis; anything not listed is replicated.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("fused", "tensor"),
    ("kv", "tensor"),
    ("layers", None),
    ("expert", None),
    ("rank", None),
)


# Activations' logical axes -> mesh axes: the batch over data x fsdp, heads, the FFN's
# hidden and the vocabulary over tensor, the sequence unsharded (a sequence axis can
# be mapped later). The model constrains its activations by these names
# (`models.layers.constrain`) while the train and eval steps trace under
# `activation_sharding`, so the partitioner never has to guess an activation's layout.
ACTIVATION_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_kv", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


@contextlib.contextmanager
def activation_sharding(mesh):
  """Within: the model's activation constraints apply on `mesh` (outside, they are no-ops)."""
  with layers.activation_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
    yield


def under_activation_sharding(fn, mesh):
  """`fn` traced within `activation_sharding(mesh)` (wrap a step before jitting it)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh):
      return fn(*args, **kwargs)
  return wrapped


def maybe_initialize_distributed():
  """Calls jax.distributed.initialize() when the environment says multi-process.

  Explicit setup (`mmrec_jax.launch.local`, `launch/multinode.sh`): JAX_COORDINATOR_ADDRESS
  (host:port of process 0), MMREC_NUM_PROCESSES and MMREC_PROCESS_ID; otherwise JAX
  detects the cluster itself (SLURM, Cloud TPU, ...). MMREC_DISTRIBUTED=0 turns it off.
  """
  env = os.environ
  multi = (env.get("MMREC_DISTRIBUTED") == "1" or "JAX_COORDINATOR_ADDRESS" in env
           or int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if not multi or env.get("MMREC_DISTRIBUTED") == "0":
    return False
  kw = {}
  if "MMREC_NUM_PROCESSES" in env:
    kw = {"coordinator_address": env.get("JAX_COORDINATOR_ADDRESS"),
          "num_processes": int(env["MMREC_NUM_PROCESSES"]),
          "process_id": int(env["MMREC_PROCESS_ID"])}
    if not kw["coordinator_address"]:
      raise ConfigError("MMREC_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS (host:port of "
                        "process 0) is not")
  if env.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation",
                      env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))
  jax.distributed.initialize(**kw)
  return True


DCN_AXES = ("dcn_data", "dcn_fsdp")   # config fields: slices / nodes per data, fsdp axis


def _resolve(sizes, n_devices, what):
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError(f"mesh {what}: {n_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ConfigError(f"mesh {what} needs {int(np.prod(sizes))} devices but {n_devices} are "
                      "available; set --config.mesh.data=-1")
  return tuple(sizes)


def mesh_config(mesh_cfg) -> MeshConfig:
  """The validated mesh section of a MeshConfig, a dict or a ConfigDict."""
  return mesh_cfg if isinstance(mesh_cfg, MeshConfig) else MeshConfig.from_dict(mesh_cfg)


def hybrid_shape(mesh_cfg, n_devices):
  """(ici, dcn): per-slice (data, fsdp, tensor) sizes and how many slices / nodes each
  axis spans over the data-center network; the mesh is their product."""
  mesh_cfg = mesh_config(mesh_cfg)
  dcn = (int(mesh_cfg.dcn_data), int(mesh_cfg.dcn_fsdp), 1)
  n_slices = int(np.prod(dcn))
  if n_devices % n_slices:
    raise ConfigError(f"mesh.dcn_data*mesh.dcn_fsdp={n_slices} slices do not divide the "
                      f"{n_devices} devices")
  sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
  what = dict(zip(MESH_AXES, sizes))
  if n_slices > 1:
    what = f"{what} per slice (x {dict(zip(DCN_AXES, dcn[:2]))})"
  return _resolve(sizes, n_devices // n_slices, what), dcn


def mesh_shape(mesh_cfg, n_devices):
  """The (data, fsdp, tensor) sizes; -1 takes the rest of the devices (of a slice)."""
  ici, dcn = hybrid_shape(mesh_cfg, n_devices)
  return tuple(i * d for i, d in zip(ici, dcn))


def _granules(devices, n):
  """The devices in `n` equal groups in (process, id) order: consecutive processes (hosts)
  form one node when the nodes run several processes (e.g. one per GPU)."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  k = len(devices) // n
  return [devices[i * k:(i + 1) * k] for i in range(n)]


def make_mesh(mesh_cfg, devices=None):
  """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all).

  One slice (dcn_* = 1): laid out by `jax.make_mesh` for the devices' topology. Several
  slices / nodes: a hybrid mesh, each slice's devices laid out for its fast interconnect
  (ICI / NVLink) and the data / fsdp axes extended across slices over the data-center
  network (`mesh_utils.create_hybrid_device_mesh`). No silent fallback: a layout that
  cannot be built is a ConfigError.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = hybrid_shape(mesh_cfg, len(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if int(np.prod(dcn)) == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
    except (ValueError, NotImplementedError, AssertionError) as e:
      raise ConfigError(f"no device layout for mesh {dict(zip(MESH_AXES, shape))} on "
                        f"{len(devices)} {devices[0].device_kind} devices: {e}") from None
  n_slices = int(np.prod(dcn))
  n_proc = len({d.process_index for d in devices})
  slices = {getattr(d, "slice_index", None) for d in devices}
  try:
    if len(slices) == n_slices and None not in slices or n_proc == n_slices:
      # TPU slices, or one process per node: JAX's own grouping
      arr = mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices, allow_split_physical_axes=True,
          process_is_granule=not (len(slices) == n_slices and None not in slices))
    else:   # several processes per node (e.g. one per GPU), or one process (tests)
      sub = [mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True)
             for g in _granules(devices, n_slices)]
      blocks = np.empty(len(sub), object)
      blocks[:] = sub
      arr = np.block(blocks.reshape(dcn).tolist())
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise ConfigError(f"no hybrid device layout for mesh {dict(zip(MESH_AXES, ici))} per "
                      f"slice x {dict(zip(DCN_AXES, dcn[:2]))}: {e}") from None
  return jax.sharding.Mesh(arr, MESH_AXES, axis_types=axis_types)


def _fit_spec(spec, shape, mesh):
  """Drops mesh axes from dims they do not divide evenly (replicates those dims):
  what flax's logical-axis sharding lacks."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (ax,) if isinstance(ax, str) else tuple(ax or ())
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(ax if axes and dim % size == 0 else None)
  return P(*out)


def logical_shardings(abstract_boxed, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of (abstract) nn.LogicallyPartitioned-boxed params, by
  flax's logical-axis rules (each mesh axis used once per array), with mesh axes that
  do not divide a dimension dropped."""
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(
      lambda s, x, names: NamedSharding(mesh, _fsdp_fallback(
          _fit_spec(s.spec, x.shape, mesh), x.shape, tuple(names), mesh)),
      shardings, nn.unbox(abstract_boxed), specs)


FSDP_MIN_SIZE = 1 << 18   # smaller arrays stay replicated when no logical axis maps to fsdp


def _fsdp_fallback(spec, shape, names, mesh):
  """FSDP shards every large array: one whose logical axes give it no `fsdp` dimension
  (e.g. a [layers, kv, kv] kernel) gets its largest free dimension that `fsdp` divides
  (never the stacked `layers` axis, which the layer scan slices)."""
  n = mesh.shape.get("fsdp", 1)
  used = {a for ax in spec for a in ((ax,) if isinstance(ax, str) else tuple(ax or ()))}
  if n == 1 or "fsdp" in used or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return spec
  full = tuple(spec) + (None,) * (len(shape) - len(spec))
  names = names + (None,) * (len(shape) - len(names))
  free = [i for i, (ax, dim) in enumerate(zip(full, shape))
          if ax is None and names[i] != "layers" and dim % n == 0]
  if not free:
    return spec
  i = max(free, key=lambda i: shape[i])
  return P(*(full[:i] + ("fsdp",) + full[i + 1:]))


def mirror_shardings(abstract_tree, param_shardings, param_shapes, mesh):
  """Shardings for e.g. an optimizer state: a leaf whose path ends with a param path
  (and has its shape) gets that param's sharding; everything else is replicated."""
  by_path = {}
  for path, s in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[tuple(path)] = s
  shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(param_shapes)}
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    path = tuple(path)
    for k in range(len(path)):
      if path[k:] in by_path and shapes[path[k:]] == getattr(leaf, "shape", None):
        return by_path[path[k:]]
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh):
  """Batches: leading (batch) axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def put_batch(batch, mesh):
  """Numpy batch dict (this process's rows) -> global jax arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  n_proc = jax.process_count()

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return {k: one(v) for k, v in batch.items()}
