"""Device mesh, logical-axis rules and shardings for params, optimizer state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism
with parameters sharded along `embed`) and `tensor` (model parallelism along the
vocab / hidden / fused / memory widths). Batches are sharded over (data, fsdp).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

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


def maybe_initialize_distributed():
  """Calls jax.distributed.initialize() when the environment says multi-process."""
  env = os.environ
  multi = (env.get("MMREC_DISTRIBUTED") == "1" or "JAX_COORDINATOR_ADDRESS" in env
           or int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if multi and env.get("MMREC_DISTRIBUTED") != "0":
    jax.distributed.initialize()
  return multi


def mesh_shape(mesh_cfg, n_devices):
  """Resolves the (data, fsdp, tensor) sizes; -1 takes the rest of the devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices "
                     f"but {n_devices} are available; set --config.mesh.data=-1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
  """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all), laid out by
  `jax.make_mesh` for the devices' topology (no silent fallback)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s.spec, x.shape, mesh)),
                      shardings, nn.unbox(abstract_boxed))


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
