"""The train state and everything that runs on the devices: mesh, shardings, the
jitted train and eval steps, and a sharded initialiser that can start from given
parameters (`init_from`: grown, or trained elsewhere).

    s = train_state.setup(config)                 # nothing allocated yet
    state = train_state.create(s)                 # or create(s, init_from=params)
    state, metrics = s.train_step(state, batch)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from mmrec_jax.training import loss as loss_lib
from mmrec_jax import models
from mmrec_jax.training import optimizer as opt_lib
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.training.step import make_train_step
from mmrec_jax.errors import ConfigError


class TrainState(struct.PyTreeNode):
  """Everything a step changes, as one pytree (what a checkpoint holds, with the data
  iterator's position)."""
  step: jax.Array          # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data; the step's key is fold_in(rng, step)
  carry: Any = None        # train.carry_state: the model state each batch row ended with


@dataclasses.dataclass
class Setup:
  """Model, optimizer, mesh, shardings and jitted steps of one run."""
  model: nn.Module
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: Any
  state_sharding: TrainState     # NamedShardings, leaf for leaf
  abstract_state: TrainState     # ShapeDtypeStructs with their shardings
  train_step: Any                # (state, batch) -> (state, metrics)
  eval_step: Any                 # (params, batch) -> sums
  init_key: jax.Array
  train_key: jax.Array


def setup(config, devices=None):
  """Builds everything that touches neither data nor disk; allocates nothing."""
  t = config.train
  model = models.build(config.model)
  mesh = shard_lib.make_mesh(config.mesh, devices)
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = t.batch_size // t.grad_accum
  if micro % n_batch:
    raise ConfigError(
        f"train.batch_size/train.grad_accum={micro} is not divisible by mesh data*fsdp="
        f"{n_batch}; change the batch size or the mesh")
  init_key, train_key = jax.random.split(jax.random.PRNGKey(t.seed))
  abstract_boxed = jax.eval_shape(lambda k: models.init_params(model, k), init_key)
  param_sh = shard_lib.logical_shardings(abstract_boxed, mesh)
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(abstract_boxed), param_sh)
  schedule = opt_lib.lr_schedule(t)
  tx = opt_lib.make(t, opt_lib.decay_mask(abstract_boxed),
                    opt_lib.lr_scale_tree(abstract_boxed, t.lr_scales,
                                         model.lr_scales()))
  opt_shapes = jax.eval_shape(tx.init, abstract_params)
  opt_sh = shard_lib.mirror_shardings(opt_shapes, param_sh, abstract_params, mesh)
  repl = shard_lib.replicated(mesh)
  carry_shapes = carry_sh = None
  if t.carry_state:   # [L, B, ...] leaves: rows sharded like the batch
    carry_shapes = jax.eval_shape(lambda: model.init_state(t.batch_size))
    carry_sh = jax.tree.map(lambda a: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, shard_lib.BATCH_AXES)), carry_shapes)
  state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl, carry=carry_sh)
  key_data = jax.random.key_data(train_key)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=opt_shapes, rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype),
      carry=carry_shapes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  batch_sh = {k: shard_lib.batch_sharding(mesh) for k in loss_lib.BATCH_KEYS}
  train_step = jax.jit(shard_lib.under_activation_sharding(
      make_train_step(model, tx, schedule, t.grad_accum, mesh, t.loss_chunk), mesh),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                       donate_argnums=(0,))
  eval_step = jax.jit(shard_lib.under_activation_sharding(loss_lib.make_eval_step(model), mesh),
                      in_shardings=(param_sh, batch_sh),
                      out_shardings=repl)
  return Setup(model, mesh, tx, schedule, state_sh, abstract, train_step, eval_step,
               init_key, train_key)


def create(s: Setup, init_from=None) -> TrainState:
  """A fresh train state at step 0, created directly with its shardings.

  `init_from`: parameters to start from (a pytree of arrays with exactly the
  model's structure and shapes, e.g. grown from a smaller model); default: the
  model's random init. The optimizer state always starts fresh.
  """
  if init_from is None:
    params = jax.jit(lambda k: nn.unbox(models.init_params(s.model, k)),
                     out_shardings=s.state_sharding.params)(s.init_key)
  else:
    want = jax.tree.structure(s.abstract_state.params)
    if jax.tree.structure(init_from) != want:
      raise ConfigError("init_from parameters do not have the model's structure")
    for a, x in zip(jax.tree.leaves(s.abstract_state.params), jax.tree.leaves(init_from)):
      if tuple(a.shape) != tuple(x.shape):
        raise ConfigError(f"init_from parameter of shape {tuple(x.shape)} where the model has "
                          f"{tuple(a.shape)}")
    # A copy: the train step donates its state, the caller keeps `init_from`.
    params = jax.tree.map(
        lambda x, a: jax.device_put(x, a.sharding, may_alias=False).astype(a.dtype),
        init_from, s.abstract_state.params)
  opt_state = jax.jit(s.tx.init, out_shardings=s.state_sharding.opt_state)(params)
  repl = s.state_sharding.step
  return TrainState(step=jax.device_put(jnp.int32(0), repl), params=params, opt_state=opt_state,
                    rng=jax.device_put(jax.random.key_data(s.train_key), repl),
                    carry=initial_carry(s))


def initial_carry(s: Setup):
  """The carried model state at a stream's start (None without train.carry_state)."""
  if s.abstract_state.carry is None:
    return None
  batch = jax.tree.leaves(s.abstract_state.carry)[0].shape[1]
  return jax.jit(lambda: s.model.init_state(batch), out_shardings=s.state_sharding.carry)()


def flops_per_token_train(s: Setup, seq_len):
  """Training FLOPs per token (3 x the forward pass)."""
  return 3 * s.model.flops_per_token(seq_len)
