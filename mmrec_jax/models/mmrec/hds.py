"""The HDS long-term memory layer: chunk summaries written, read by multi-head
attention (the Flax module; the memory's math is `memory.py`)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmrec_jax.models import layers
from mmrec_jax.models.layers import dense, logical
from mmrec_jax.models.mmrec import memory as mem_lib
from mmrec_jax.models.mmrec.config import POOL_BOUND, MMRecConfig


@struct.dataclass
class LayerState:
  """One layer's decoding state (a leading layers axis when stacked over the model)."""
  h: jax.Array                # [B, D] float32: the recurrence (short-term memory)
  memory: mem_lib.Memory      # [B, ...]: the HDS slots (long-term memory)
  pos: jax.Array              # [B] int32: position in the current document
  chunk_sum: jax.Array        # [B, D] float32: pooled sum of h over the unfinished chunk
  chunk_weight: jax.Array     # [B] float32: its pooling weight
  # `mem_key="previous"` only (None otherwise):
  key_sum: jax.Array | None = None   # [B, D] float32: pooled sum of the previous tokens' inputs
  prev_x: jax.Array | None = None    # [B, D] float32: the last token's block input


class HDSMemory(nn.Module):
  """The layer's long-term memory: chunk summaries written, read by multi-head attention."""
  cfg: MMRecConfig

  @nn.compact
  def __call__(self, h_BTD, q_BTD, x_BTD, reset_BT, state: LayerState):
    """h: the recurrence's output (pooled into values, and keys with mem_key="state");
    q: the read's queries; x: the block's normalised input (keys with "previous").
    Returns the read [B, T, D] and the state's new (memory, pos, chunk_sum,
    chunk_weight, key_sum, prev_x)."""
    cfg = self.cfg
    B, T, D = h_BTD.shape
    H = cfg.n_heads
    dt = cfg.compute_dtype
    shifted = cfg.mem_key == "previous"
    if not cfg.mem_write_grad:
      h_BTD, x_BTD = jax.lax.stop_gradient(h_BTD), jax.lax.stop_gradient(x_BTD)
    summary = dense(D, ("embed", "kv"), cfg, "summary")
    summary_key = dense(D, ("embed", "kv"), cfg, "summary_key") if shifted else summary
    key = dense(D, ("kv", "kv_out"), cfg, "key")
    value = dense(D, ("kv", "kv_out"), cfg, "value")
    out = dense(D, ("kv", "embed"), cfg, "out", init_scale=cfg.mem_out_init * (
        1.0 / (2 * cfg.n_layers) if cfg.mem_residual else 1.0))
    scale_H = (self.param("read_scale", logical(nn.initializers.ones, "heads"), (H,),
                          cfg.params_dtype).astype(jnp.float32) if cfg.mem_qk_norm else None)
    sink = None
    if cfg.mem_sink:
      logit_H = self.param("read_sink", logical(nn.initializers.zeros, "heads"), (H,),
                           cfg.params_dtype)
      value_D = self.param("read_null", logical(nn.initializers.zeros, "kv_out"), (D,),
                           cfg.params_dtype)
      sink = (logit_H.astype(jnp.float32), value_D.astype(jnp.float32).reshape(H, D // H))
    # Learned pooling: a per-token weight (see `mem_pool`); the summary is the weighted mean.
    score_BT = dense(1, ("embed", None), cfg, "pool", use_bias=True)(
        h_BTD.astype(dt))[..., 0].astype(jnp.float32)
    w_BT = (jnp.exp(layers.bound(score_BT, POOL_BOUND)) if cfg.mem_pool == "exp"
            else jax.nn.sigmoid(score_BT))

    def summarise_kv(acc_BKX):
      """Key and value of the chunks' pooled summaries, float32 [..., 2D]; `acc` holds
      (sum w h, [sum w x_prev,] sum w)."""
      weight_BK1 = jnp.maximum(acc_BKX[..., -1:], 1e-6)
      summ_BKD = nn.gelu(summary((acc_BKX[..., :D] / weight_BK1).astype(dt)))
      ksumm_BKD = (nn.gelu(summary_key((acc_BKX[..., D:2 * D] / weight_BK1).astype(dt)))
                   if shifted else summ_BKD)
      return jnp.concatenate([key(ksumm_BKD), value(summ_BKD)], axis=-1).astype(jnp.float32)

    # No memory in the state: the call starts every row at a document start with
    # an empty memory, known when tracing (the model's call without a state), so
    # the closed-form writes skip the empty memory's entries.
    fresh = state.memory is None
    memory0 = state.memory
    if fresh:
      one = mem_lib.empty_memory(cfg.mem_levels, cfg.mem_slots, 2 * D)
      memory0 = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (B,) + v.shape), one)
      state = state.replace(memory=memory0)
    if T == 1 and not self.is_initializing():
      return _decode_one(cfg, h_BTD[:, 0], q_BTD[:, 0], x_BTD[:, 0], w_BT[:, 0], reset_BT[:, 0],
                         state, summarise_kv, out, scale_H, sink)

    pos_BT, last_reset_BT = jax.vmap(layers.positions)(state.pos, reset_BT)
    start_BT = pos_BT % cfg.chunk_size == 0
    ev = jax.vmap(lambda p, r: mem_lib.chunk_events(p, r, cfg.chunk_size))(pos_BT, last_reset_BT)
    end_BK, end_valid_BK, k_BT, cleared_BT, is_end_BT = ev
    # (sum w*h, sum w) of each ending chunk and of the unfinished last one, as
    # masked sums over the chunk's tokens; segment 0 continues the carried chunk.
    pooled = [h_BTD]
    carried = [state.chunk_sum]
    if shifted:  # each token's previous input in its document (zeros at its start)
      prev_BTD = jnp.concatenate([state.prev_x[:, None].astype(x_BTD.dtype), x_BTD[:, :-1]], 1)
      pooled.append(jnp.where((pos_BT == 0)[..., None], 0.0, prev_BTD.astype(jnp.float32)))
      carried.append(state.key_sum)
    x_BTX = jnp.concatenate([w_BT[..., None] * p for p in pooled] + [w_BT[..., None]], axis=-1)
    carry_BX = jnp.concatenate(carried + [state.chunk_weight[:, None]], axis=-1)
    seg_BT = jnp.cumsum(start_BT, axis=1)
    seg_BK = jnp.take_along_axis(seg_BT, end_BK, axis=1)
    sums = lambda sel, x: jnp.einsum("bkt,btx->bkx", sel.astype(jnp.float32), x,
                                     precision=jax.lax.Precision.HIGHEST)
    acc_BKX = (sums(seg_BT[:, None, :] == seg_BK[:, :, None], x_BTX)
               + jnp.where((seg_BK == 0)[..., None], carry_BX[:, None], 0.0))
    last_BX = (sums(seg_BT[:, None, :] == seg_BT[:, -1:, None], x_BTX)[:, 0]
               + jnp.where(seg_BT[:, -1:] == 0, carry_BX, 0.0))
    # The memory stores each summary's key and value: the projections are linear,
    # so pooling them in the coarser levels equals projecting pooled summaries,
    # and no slot is ever projected twice.
    kv_BKX = layers.constrain(summarise_kv(acc_BKX), "activation_batch", None, "activation_kv")

    # A chunk's mass (its tokens' total pooling weight) weights it when levels merge.
    # Each write's document (-1: the carried one) and chunk index in it.
    doc_BK = jnp.take_along_axis(last_reset_BT, end_BK, axis=1)
    chunk_BK = jnp.take_along_axis(pos_BT, end_BK, axis=1) // cfg.chunk_size
    m_BKMX, valid_BKM, final = jax.vmap(functools.partial(mem_lib.write_groups, fresh=fresh))(
        memory0, state.pos // cfg.chunk_size, kv_BKX, acc_BKX[..., -1], end_valid_BK,
        doc_BK, chunk_BK)
    K1, M = m_BKMX.shape[1:3]
    heads = lambda x: layers.constrain(x.astype(dt).reshape(B, K1, M, H, D // H),
                                       "activation_batch", None, None, "activation_heads", None)
    keys, vals = heads(m_BKMX[..., :D]), heads(m_BKMX[..., D:])
    window = min(cfg.chunk_size, T)
    read_BTHd = jax.vmap(mem_lib.attend, in_axes=(0, 0, 0, 0, 0, 0, None, None, None, None))(
        layers.constrain(q_BTD.reshape(B, T, H, D // H), "activation_batch", "activation_length",
                         "activation_heads", None), keys, vals, valid_BKM, k_BT, cleared_BT, window, scale_H,
        cfg.mem_read_logn, sink)
    read_BTHd = layers.constrain(read_BTHd, "activation_batch", "activation_length",
                                 "activation_heads", None)
    out_BTD = out(read_BTHd.reshape(B, T, D).astype(dt))

    # The state after the last token.
    doc_cleared_B = last_reset_BT[:, -1] > jnp.max(jnp.where(is_end_BT, jnp.arange(T), -1), axis=1)
    final = jax.tree_util.tree_map(
        lambda m: jnp.where(doc_cleared_B.reshape((B,) + (1,) * (m.ndim - 1)), jnp.zeros_like(m), m),
        final)
    last_acc_BX = jnp.where(is_end_BT[:, -1:], 0.0, last_BX)
    return out_BTD, _new_state(final, pos_BT[:, -1] + 1, last_acc_BX, x_BTD[:, -1], shifted, D)


def _new_state(memory, pos_B, acc_BX, x_BD, shifted, D):
  """(memory, pos, chunk_sum, chunk_weight, key_sum, prev_x) after a call."""
  return (memory, pos_B, acc_BX[:, :D], acc_BX[:, -1],
          acc_BX[:, D:2 * D] if shifted else None,
          x_BD.astype(jnp.float32) if shifted else None)


def _decode_one(cfg, h_BD, q_BD, x_BD, w_B, reset_B, state, summarise_kv, out, scale_H, sink):
  """`HDSMemory` for one token (T = 1): the same numbers as the general path,
  without its chunk bookkeeping; a chunk's summary is computed and written
  (`lax.cond`) only at steps where some row ends a chunk, once every C tokens."""
  B, D = h_BD.shape
  H = cfg.n_heads
  pos_B = jnp.where(reset_B, 0, state.pos)
  shifted = cfg.mem_key == "previous"
  # (sum w*h, [sum w*x_prev,] sum w) of the chunk so far; a document start begins a new chunk
  pooled, carried = [h_BD], [state.chunk_sum]
  if shifted:
    pooled.append(jnp.where((pos_B == 0)[:, None], 0.0, state.prev_x))
    carried.append(state.key_sum)
  carry_BX = jnp.concatenate(carried + [state.chunk_weight[:, None]], axis=-1)
  acc_BX = (jnp.concatenate([w_B[:, None] * p for p in pooled] + [w_B[:, None]], axis=-1)
            + jnp.where((pos_B % cfg.chunk_size == 0)[:, None], 0.0, carry_BX))
  # The token reads the memory as it was before it (nothing after a document start).
  read_BHd = jax.vmap(mem_lib.read, in_axes=(0, 0, 0, None, None, None))(
      state.memory, q_BD.reshape(B, H, D // H), reset_B, scale_H, cfg.mem_read_logn, sink)
  out_BD = out(read_BHd.reshape(B, D).astype(cfg.compute_dtype))

  # A document start empties the memory; a chunk end writes the chunk's summary.
  end_B = pos_B % cfg.chunk_size == cfg.chunk_size - 1
  rows = lambda x_B, m: x_B.reshape((B,) + (1,) * (m.ndim - 1))

  def update(memory):
    memory = jax.tree_util.tree_map(
        lambda m: jnp.where(rows(reset_B, m), jnp.zeros_like(m), m), memory)
    new = jax.vmap(mem_lib.write)(memory, summarise_kv(acc_BX), acc_BX[:, -1])
    return jax.tree_util.tree_map(lambda n, m: jnp.where(rows(end_B, m), n, m), new, memory)

  memory = jax.lax.cond(jnp.any(end_B | reset_B), update, lambda m: m, state.memory)
  acc_BX = jnp.where(end_B[:, None], 0.0, acc_BX)
  return out_BD[:, None], _new_state(memory, pos_B + 1, acc_BX, x_BD, shifted, D)
