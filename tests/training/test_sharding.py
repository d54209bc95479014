"""Meshes and shardings (`training/sharding.py`): logical axes onto the mesh, FSDP,
the hybrid (ICI x DCN) mesh and its errors."""
import jax
import numpy as np
import pytest
from flax import linen as nn

from mmrec_jax import config as config_lib
from mmrec_jax.errors import ConfigError
from mmrec_jax.training import sharding as shard_lib
from tests.support import TINY
from tests import support


def test_logical_axes_onto_the_mesh():
  tree = support.boxed_param_tree()
  mesh = shard_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": -1}, jax.devices()[:1])
  sh = shard_lib.logical_shardings(tree, mesh)
  assert sh["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert sh["blocks"]["mem"]["kernel"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
  if jax.device_count() >= 8:
    mesh8 = shard_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    sh8 = shard_lib.logical_shardings(tree, mesh8)   # 30 is not divisible by... it is (2)
    assert sh8["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    odd = shard_lib.logical_shardings(
        {"x": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 32), np.float32),
                                      ("vocab", "embed"))}, mesh8)
    assert odd["x"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  with pytest.raises(ValueError, match="devices"):
    shard_lib.make_mesh({"data": 3, "fsdp": 1, "tensor": 1}, jax.devices()[:1])



def test_hybrid_mesh_shape_and_errors():
  cfg = {"data": 1, "fsdp": 4, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}
  assert shard_lib.hybrid_shape(cfg, 8) == ((1, 4, 1), (2, 1, 1))
  mesh = shard_lib.make_mesh(cfg, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # each data row (a "node") is one contiguous group of devices
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
  assert shard_lib.mesh_shape({**cfg, "data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  with pytest.raises(ConfigError, match="slices do not divide"):
    shard_lib.make_mesh({**cfg, "dcn_data": 3}, jax.devices()[:8])
  with pytest.raises(ConfigError, match="needs 8 devices but 4"):
    shard_lib.make_mesh({**cfg, "fsdp": 8}, jax.devices()[:8])
  with pytest.raises(ConfigError, match="mesh.dcn_data"):
    config_lib.load(TINY, {"mesh.dcn_data": 0})


def test_fsdp_shards_every_large_array():
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32),
                                                     names)
  tree = {"mem": box((2, 1024, 1024), ("layers", "kv", "kv_out")),
          "small": box((2, 64, 64), ("layers", "kv", "kv_out")),
          "mlp": box((2, 1024, 512), ("layers", "embed", "mlp"))}
  mesh = shard_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8])
  sh = shard_lib.logical_shardings(tree, mesh)
  P = jax.sharding.PartitionSpec
  assert sh["mem"].spec == P(None, "tensor", "fsdp")   # no logical axis maps to fsdp
  assert sh["small"].spec == P(None, "tensor", None)   # small: stays replicated
  assert sh["mlp"].spec == P(None, "fsdp", "tensor")
  one = shard_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
  assert shard_lib.logical_shardings(tree, one)["mem"].spec == P(None, "tensor", None)
