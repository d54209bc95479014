"""The jitted train step's body: the loss with its auxiliary terms, gradient
accumulation equal to the full-batch update, the carried model state
(`train.carry_state`), AdamW, and the step's metrics."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import sharding as shard_lib


def _microbatches(batch, n, mesh):
  """[B, ...] -> [n, B/n, ...]; microbatch i takes rows i, i+n, ... (keeps the sharding)."""
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shard_lib.BATCH_AXES))

  def one(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sh)
  return {k: one(v) for k, v in batch.items()}


def make_train_step(model, tx, schedule, grad_accum, mesh, loss_chunk=0):
  """train_step(state, batch) -> (state, metrics): CE with aux losses, AdamW, clipping,
  gradient accumulation equal to the full-batch update, a fresh dropout key per step.
  `loss_chunk` > 0: the head and the loss `loss_chunk` tokens at a time
  (`loss.head_cross_entropy`)."""
  aux_weights = model.aux_weights()

  def loss_fn(params, mb, key, denom, carry=None):
    out, new_carry, aux = model.apply(
        {"params": params}, mb["inputs"], state=carry, reset=mb["reset"],
        deterministic=False, rngs={"dropout": key}, head=not loss_chunk)
    if loss_chunk:
      ce_sum = loss_lib.head_cross_entropy(out, functools.partial(model.logits, params),
                                           mb["targets"], mb["mask"], loss_chunk)
    else:
      ce_sum, _, _ = loss_lib.cross_entropy(out, mb["targets"], mb["mask"])
    loss = ce_sum / denom
    for k, w in aux_weights.items():
      loss = loss + w * aux[k] / grad_accum
    return loss, (ce_sum, {k: aux[k] for k in aux_weights}, new_carry)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    denom = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    carry = state.carry
    if grad_accum == 1:
      # a carried state is an input: no gradient flows into the previous step
      (_, (ce_sum, aux, carry)), grads = grad_fn(
          state.params, batch, jax.random.fold_in(key, 0), denom,
          None if carry is None else jax.lax.stop_gradient(carry))
      carry = None if state.carry is None else jax.tree.map(
          lambda n, o: n.astype(o.dtype), carry, state.carry)
    else:   # (train.carry_state needs grad_accum 1: config.validate)
      def body(carry, xs):
        g_acc, ce_acc, aux_acc = carry
        mb, i = xs
        (_, (ce, aux, _)), g = grad_fn(state.params, mb, jax.random.fold_in(key, i), denom)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        aux_acc = {k: aux_acc[k] + aux[k] / grad_accum for k in aux_acc}
        return (g_acc, ce_acc + ce, aux_acc), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      aux0 = {k: jnp.zeros((), jnp.float32) for k in aux_weights}
      (grads, ce_sum, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), aux0),
          (_microbatches(batch, grad_accum, mesh), jnp.arange(grad_accum)))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ce = ce_sum / denom
    loss = ce + sum(w * aux[k] for k, w in aux_weights.items())
    out = {"loss": loss, "ce": ce, "grad_norm": optax.tree.norm(grads),
           "lr": schedule(state.step), "tokens": denom}
    out.update({f"aux_{k}": v for k, v in aux.items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         carry=carry), out

  return train_step
