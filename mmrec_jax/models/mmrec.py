"""MM-Rec in Flax linen: blocks with a gated linear recurrence and an HDS memory.

    from mmrec_jax import models
    model = models.build(config.model)          # model.kind = "mmrec"
    params = models.init_params(model, jax.random.key(0))
    logits_BTV, state, aux = model.apply({'params': params}, tokens_BT)
    logits_BTV, state, aux = model.apply({'params': params}, next_BT, state=state)

`state` is the decoding state, a `LayerState` stacked over layers: the
recurrent state `h` and the long-term memory (slots, and the unfinished chunk);
its size never depends on how many tokens were seen. `reset_BT` marks document
starts: the state is dropped there.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmrec_jax import memory as mem_lib
from mmrec_jax.models import base
from mmrec_jax.models import layers
from mmrec_jax.models.layers import MLP, dense, logical, rms_norm
from mmrec_jax.scan import IMPLS as SCAN_IMPLS
from mmrec_jax.scan import linear_scan


MOE_IMPLS = ("auto", "dense", "ragged")
# Each of the two gates of the decay is bounded to [sigma(-GATE_BOUND), sigma(GATE_BOUND)].
GATE_BOUND = 15.0
# `mem_pool="exp"`: a token's pooling score is bounded to [-POOL_BOUND, POOL_BOUND]
# (weights from 4.5e-5, far above the memory's MIN_MASS, to 2.2e4).
POOL_BOUND = 10.0
MEM_POOLS = ("sigmoid", "exp")
MAX_INIT_DECAY = 0.99999


@dataclasses.dataclass(frozen=True)
class MMRecConfig(base.BaseConfig):
  """The MM-Rec model section (`model.kind = "mmrec"`)."""
  kind: str = "mmrec"
  BEFORE_FIELDS: ClassVar[dict] = {"mem_lr_scale": 1.0}   # added 2026-11-28
  mdi_hidden_div: int = 4        # f_base / f_ctx hidden width = D / mdi_hidden_div
  # Long-term memory (HDS): chunks of `chunk_size` tokens; `mem_levels` levels of
  # `mem_slots` slots, level l holding means of 2**l chunk summaries.
  chunk_size: int = 64
  mem_slots: int = 8
  mem_levels: int = 4
  # The read's logits: False, q.k / sqrt(hd); True, queries and keys at unit RMS
  # per head times a learned per-head temperature (`read_scale`, init 1).
  mem_qk_norm: bool = False
  # A token's pooling weight: "sigmoid" of a learned score, in (0, 1); or "exp" of
  # it, bounded to [-POOL_BOUND, POOL_BOUND]: a softmax pooling over the chunk, and
  # (since merges weight by mass) over every chunk a coarse slot holds, so one
  # salient chunk can outweigh the many filler chunks it is merged with.
  mem_pool: str = "sigmoid"
  # The read's logits times log(number of slots it sees) (scalable softmax): a
  # margin learned among the few slots of a training window keeps its weight
  # among the many slots of a longer document.
  mem_read_logn: bool = False
  # A null slot every read also sees (an attention sink): a learned logit per head
  # and a learned value (both zero at init). A token that finds nothing relevant
  # reads the null value instead of a mixture of summaries, and an empty memory
  # (the first chunk of a document) reads it too, not zeros it never reads later.
  mem_sink: bool = False
  # Initialisation scale of the memory's read-out projection (`memory/out`): 0 starts
  # the memory as an exact no-op that training opens (only `out` gets a gradient at
  # step 0; every other memory weight follows once `out` is non-zero); 1, the usual
  # initialisation (the default until 2026-11-28).
  mem_out_init: float = 0.0
  # The memory's weights (every parameter under `memory`) step this factor times
  # the learning rate (their weight decay too); `train.lr_scales` overrides it.
  # AdamW steps every weight by about the learning rate however small its gradient,
  # and the memory's keys get ~200x less gradient than the rest (1 until 2026-11-28;
  # README, Quality, for what the two defaults changed).
  mem_lr_scale: float = 0.1
  # False: the memory writes the recurrence's output without passing gradient back
  # into it (a stop-gradient on what is pooled); the memory's own weights still
  # learn, and the function is the same. Reads still train the query.
  mem_write_grad: bool = True
  # Where the read enters: False, the mixer, W_o((h + m) * GELU(v)) (gated by v);
  # True, its own residual branch, x + W_o(h * GELU(v)) + m, its read-out then
  # initialised like the other residual outputs (times 1 / (2 n_layers)).
  mem_residual: bool = False
  scan_impl: str = "auto"        # auto | associative | sequential | chunked
  scan_chunk: int = 64           # chunk length of the `chunked` scan
  # MDI: the per-channel decays at init span [decay_min, decay_max] (timescales
  # 1/(1-a) spaced geometrically, 10 to 1000 tokens by default).
  decay_min: float = 0.9
  decay_max: float = 0.999
  use_dpg: bool = False
  dpg_rank: int = 0              # 0: max(d_model // 16, 8)
  use_moe: bool = False
  moe_experts: int = 8
  moe_capacity_factor: float = 1.25  # ignored: routing is dropless (kept so old configs load)
  moe_loss_weight: float = 0.01
  moe_impl: str = "auto"         # auto | dense | ragged (see `MoE`)
  use_uboo: bool = False
  uboo_weight: float = 0.1       # lambda_P

  def validate(self):
    super().validate()
    base.check(self.kind == "mmrec", f"MMRecConfig has kind {self.kind!r}")
    base.check(isinstance(self.mem_levels, int) and self.mem_levels >= 0,
               f"model.mem_levels must be an integer >= 0 (0: no long-term memory), got "
               f"{self.mem_levels!r}")
    base.check(self.mem_pool in MEM_POOLS, f"model.mem_pool={self.mem_pool!r} is unknown; use "
               f"one of {', '.join(MEM_POOLS)}")
    base.check(isinstance(self.mem_out_init, (int, float)) and self.mem_out_init >= 0,
               f"model.mem_out_init must be a number >= 0 (0: the memory's read-out starts at "
               f"zero), got {self.mem_out_init!r}")
    base.check(isinstance(self.mem_lr_scale, (int, float)) and self.mem_lr_scale >= 0,
               f"model.mem_lr_scale must be a number >= 0 (the memory's learning-rate "
               f"factor), got {self.mem_lr_scale!r}")
    base.positive_ints(self, ("chunk_size", "mem_slots", "scan_chunk",
                              "mdi_hidden_div"))
    base.check(self.d_model % self.mdi_hidden_div == 0,
               f"model.d_model={self.d_model} is not divisible by "
               f"model.mdi_hidden_div={self.mdi_hidden_div}")
    base.check(self.scan_impl in SCAN_IMPLS,
               f"model.scan_impl={self.scan_impl!r} is unknown; use one of "
               f"{', '.join(SCAN_IMPLS)}")
    base.check(isinstance(self.decay_min, (int, float)) and isinstance(self.decay_max, (int, float))
               and 0 < self.decay_min <= self.decay_max <= MAX_INIT_DECAY,
               f"model.decay_min={self.decay_min} and model.decay_max={self.decay_max} must "
               f"satisfy 0 < decay_min <= decay_max <= {MAX_INIT_DECAY}")
    if self.use_dpg:
      base.check(isinstance(self.dpg_rank, int) and 0 <= self.dpg_rank <= self.d_model,
                 f"model.dpg_rank={self.dpg_rank} must be in 0..d_model (0: automatic)")
    if self.use_moe:
      base.check(isinstance(self.moe_experts, int) and self.moe_experts >= 2,
                 f"model.moe_experts={self.moe_experts} must be an integer >= 2 (top-2 routing)")
      base.check(self.moe_capacity_factor > 0,
                 f"model.moe_capacity_factor={self.moe_capacity_factor} must be positive")
      base.check(self.moe_loss_weight >= 0, "model.moe_loss_weight must be >= 0")
      base.check(self.moe_impl in MOE_IMPLS,
                 f"model.moe_impl={self.moe_impl!r} is unknown; use one of {', '.join(MOE_IMPLS)}")
    if self.use_uboo:
      base.check(self.uboo_weight >= 0, "model.uboo_weight must be >= 0")

  @property
  def rank(self):
    return self.dpg_rank or max(self.d_model // 16, 8)

  @property
  def mem_readable_slots(self):
    return mem_lib.readable_slots(self.mem_levels, self.mem_slots) if self.mem_levels else 0

  @property
  def n_slices(self):
    """Slices of the fused projection: q (the memory query, only with a memory), k, v, z, i."""
    return 5 if self.mem_levels else 4


@struct.dataclass
class LayerState:
  """One layer's decoding state (a leading layers axis when stacked over the model)."""
  h: jax.Array                # [B, D] float32: the recurrence (short-term memory)
  memory: mem_lib.Memory      # [B, ...]: the HDS slots (long-term memory)
  pos: jax.Array              # [B] int32: position in the current document
  chunk_sum: jax.Array        # [B, D] float32: pooled sum of h over the unfinished chunk
  chunk_weight: jax.Array     # [B] float32: its pooling weight


class LowRank(nn.Module):
  """DPG: the low-rank projection D -> r -> D replacing f_base."""
  rank: int
  out: int
  cfg: MMRecConfig

  @nn.compact
  def __call__(self, x):
    y = dense(self.rank, ("embed", "rank"), self.cfg, "down")(x)
    return dense(self.out, ("rank", "embed"), self.cfg, "up", use_bias=True)(y)


def moe_impl(cfg) -> str:
  """The MoE implementation that runs: `auto` is `ragged` on TPU (a native grouped
  matmul), `dense` elsewhere (on CPU `ragged_dot` falls back to a masked dense
  product over all experts for every assignment, 2x the cost of `dense`; on GPU
  `ragged` is available by name, not yet measured against `dense`)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  return "ragged" if jax.default_backend() == "tpu" else "dense"


def moe_experts_run(cfg) -> int:
  """Expert FFNs computed per token by the implementation that runs."""
  impl = moe_impl(cfg)
  if impl == "dense":
    return cfg.moe_experts
  return 2 if jax.default_backend() in ("gpu", "tpu") else 2 * cfg.moe_experts


class MoE(nn.Module):
  """Top-2 mixture of expert FFNs, routed per token, dropless.

  Every token goes to its two most probable experts, weighted by their
  renormalised probabilities; there is no capacity and no router noise, so a
  token's output depends on that token alone: the same in one pass, in pieces,
  token by token, in a batch or alone, whatever shares its row, in training and
  at inference (`deterministic` changes nothing here). Cost is linear in T:
  - `ragged`: the B*T*2 (token, expert) assignments sorted by expert, two
    grouped matmuls (`jax.lax.ragged_dot`), combined back in token order;
  - `dense`: every expert on every token, combined with the gates (zero for the
    experts not chosen): E/2 x the FLOPs of `ragged`, exact, no sort.
  Returns (y, load-balancing loss E * sum_e frac_routed_e * mean_prob_e).
  """
  cfg: MMRecConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic):
    del deterministic  # routing is deterministic and dropless in training and inference
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, F = cfg.moe_experts, cfg.ffn_mult * cfg.d_model
    N = B * T
    logits_BTE = dense(E, ("embed", "expert"), cfg, "router")(x_BTD).astype(jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    gate_BTK, idx_BTK = jax.lax.top_k(probs_BTE, 2)
    gate_BTK = gate_BTK / jnp.sum(gate_BTK, axis=-1, keepdims=True)
    pd, dt = cfg.params_dtype, cfg.compute_dtype
    w1 = self.param("w_up", logical(nn.initializers.lecun_normal(batch_axis=(0,)), "expert",
                                    "embed", "mlp"), (E, D, F), pd).astype(dt)
    b1 = self.param("b_up", logical(nn.initializers.zeros, "expert", "mlp"), (E, F), pd).astype(dt)
    w2 = self.param("w_down", logical(nn.initializers.lecun_normal(batch_axis=(0,)), "expert",
                                      "mlp", "embed"), (E, F, D), pd).astype(dt)
    b2 = self.param("b_down", logical(nn.initializers.zeros, "expert", "embed"), (E, D),
                    pd).astype(dt)
    x_ND = x_BTD.reshape(N, D).astype(dt)
    onehot_NKE = jax.nn.one_hot(idx_BTK.reshape(N, 2), E, dtype=jnp.float32)
    if moe_impl(cfg) == "dense":
      comb_NE = jnp.einsum("nke,nk->ne", onehot_NKE, gate_BTK.reshape(N, 2)).astype(dt)
      h_NEF = nn.gelu(jnp.einsum("nd,edf->nef", x_ND, w1) + b1)
      y_ND = (jnp.einsum("nef,efd->nd", h_NEF * comb_NE[..., None], w2)
              + jnp.einsum("ne,ed->nd", comb_NE, b2))
    else:
      e_S = idx_BTK.reshape(N * 2)                       # assignment s = 2 * token + choice
      order_S = jnp.argsort(e_S, stable=True)
      inv_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(N * 2, dtype=order_S.dtype))
      es_S = e_S[order_S]
      sizes_E = jnp.bincount(e_S, length=E).astype(jnp.int32)
      xs_SD = x_ND[order_S // 2]
      h_SF = nn.gelu(jax.lax.ragged_dot(xs_SD, w1, sizes_E) + b1[es_S])
      ys_SD = jax.lax.ragged_dot(h_SF, w2, sizes_E) + b2[es_S]
      ys_SD = ys_SD * gate_BTK.reshape(N * 2)[order_S][:, None].astype(dt)
      y_ND = ys_SD[inv_S].reshape(N, 2, D).sum(axis=1)
    frac_E = jnp.mean(onehot_NKE, axis=(0, 1))
    prob_E = jnp.mean(probs_BTE, axis=(0, 1))
    lb = E * jnp.sum(frac_E * prob_E)
    return y_ND.reshape(B, T, D), lb


class HDSMemory(nn.Module):
  """The layer's long-term memory: chunk summaries written, read by multi-head attention."""
  cfg: MMRecConfig

  @nn.compact
  def __call__(self, h_BTD, q_BTD, reset_BT, state: LayerState):
    cfg = self.cfg
    B, T, D = h_BTD.shape
    H = cfg.n_heads
    dt = cfg.compute_dtype
    if not cfg.mem_write_grad:
      h_BTD = jax.lax.stop_gradient(h_BTD)
    summary = dense(D, ("embed", "kv"), cfg, "summary")
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
    w_BT = (jnp.exp(_bound(score_BT, POOL_BOUND)) if cfg.mem_pool == "exp"
            else jax.nn.sigmoid(score_BT))

    def summarise_kv(acc_BKX):
      """Key and value of the chunks' pooled summaries, float32 [..., 2D]."""
      pooled_BKD = acc_BKX[..., :D] / jnp.maximum(acc_BKX[..., D:], 1e-6)
      summ_BKD = nn.gelu(summary(pooled_BKD.astype(dt)))
      return jnp.concatenate([key(summ_BKD), value(summ_BKD)], axis=-1).astype(jnp.float32)

    if T == 1 and not self.is_initializing():
      return _decode_one(cfg, h_BTD[:, 0], q_BTD[:, 0], w_BT[:, 0], reset_BT[:, 0], state,
                         summarise_kv, out, scale_H, sink)

    pos_BT, last_reset_BT = jax.vmap(mem_lib.positions)(state.pos, reset_BT)
    start_BT = pos_BT % cfg.chunk_size == 0
    ev = jax.vmap(lambda p, r: mem_lib.chunk_events(p, r, cfg.chunk_size))(pos_BT, last_reset_BT)
    end_BK, end_valid_BK, k_BT, cleared_BT, is_end_BT = ev
    # (sum w*h, sum w) of each ending chunk and of the unfinished last one, as
    # masked sums over the chunk's tokens; segment 0 continues the carried chunk.
    x_BTX = jnp.concatenate([w_BT[..., None] * h_BTD, w_BT[..., None]], axis=-1)
    carry_BX = jnp.concatenate([state.chunk_sum, state.chunk_weight[:, None]], axis=-1)
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
    kv_BKX = summarise_kv(acc_BKX)

    # A chunk's mass (its tokens' total pooling weight) weights it when levels merge.
    # Each write's document (-1: the carried one) and chunk index in it.
    doc_BK = jnp.take_along_axis(last_reset_BT, end_BK, axis=1)
    chunk_BK = jnp.take_along_axis(pos_BT, end_BK, axis=1) // cfg.chunk_size
    m_BKMX, valid_BKM, final = jax.vmap(mem_lib.write_groups)(
        state.memory, state.pos // cfg.chunk_size, kv_BKX, acc_BKX[..., D], end_valid_BK,
        doc_BK, chunk_BK)
    K1, M = m_BKMX.shape[1:3]
    keys = m_BKMX[..., :D].astype(dt).reshape(B, K1, M, H, D // H)
    vals = m_BKMX[..., D:].astype(dt).reshape(B, K1, M, H, D // H)
    window = min(cfg.chunk_size, T)
    read_BTHd = jax.vmap(mem_lib.attend, in_axes=(0, 0, 0, 0, 0, 0, None, None, None, None))(
        q_BTD.reshape(B, T, H, D // H), keys, vals, valid_BKM, k_BT, cleared_BT, window, scale_H,
        cfg.mem_read_logn, sink)
    out_BTD = out(read_BTHd.reshape(B, T, D).astype(dt))

    # The state after the last token.
    doc_cleared_B = last_reset_BT[:, -1] > jnp.max(jnp.where(is_end_BT, jnp.arange(T), -1), axis=1)
    final = jax.tree_util.tree_map(
        lambda m: jnp.where(doc_cleared_B.reshape((B,) + (1,) * (m.ndim - 1)), jnp.zeros_like(m), m),
        final)
    last_acc_BX = jnp.where(is_end_BT[:, -1:], 0.0, last_BX)
    return out_BTD, (final, pos_BT[:, -1] + 1, last_acc_BX[:, :D], last_acc_BX[:, D])


def _decode_one(cfg, h_BD, q_BD, w_B, reset_B, state, summarise_kv, out, scale_H, sink):
  """`HDSMemory` for one token (T = 1): the same numbers as the general path,
  without its chunk bookkeeping; a chunk's summary is computed and written
  (`lax.cond`) only at steps where some row ends a chunk, once every C tokens."""
  B, D = h_BD.shape
  H = cfg.n_heads
  pos_B = jnp.where(reset_B, 0, state.pos)
  # (sum w*h, sum w) of the chunk so far; a document start begins a new chunk
  carry_BX = jnp.concatenate([state.chunk_sum, state.chunk_weight[:, None]], axis=-1)
  acc_BX = (jnp.concatenate([w_B[:, None] * h_BD, w_B[:, None]], axis=-1)
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
    new = jax.vmap(mem_lib.write)(memory, summarise_kv(acc_BX), acc_BX[:, D])
    return jax.tree_util.tree_map(lambda n, m: jnp.where(rows(end_B, m), n, m), new, memory)

  memory = jax.lax.cond(jnp.any(end_B | reset_B), update, lambda m: m, state.memory)
  acc_BX = jnp.where(end_B[:, None], 0.0, acc_BX)
  return out_BD[:, None], (memory, pos_B + 1, acc_BX[:, :D], acc_BX[:, D])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _bound(x, r):
  """clip(x, -r, r) with derivative 1 everywhere (a straight-through bound)."""
  return jnp.clip(x, -r, r)


@_bound.defjvp
def _bound_jvp(r, primals, tangents):
  (x,), (dx,) = primals, tangents
  return _bound(x, r), dx


def log_decay(lam_D, base_BTD, ctx_BTD):
  """MDI in log space: log sig(lam + base) + log sig(ctx), float32.

  Each gate's pre-activation is bounded to [-GATE_BOUND, GATE_BOUND], so log a
  is in [-30.0, -6.1e-7] and the decay exp(log a) strictly in (0, 1) in float32.
  The bound passes gradients straight through: d log a / d lam is
  sig(-bounded) >= 3e-7, never exactly zero, so a saturated channel can recover.
  """
  f32 = jnp.float32
  u = _bound(lam_D.astype(f32) + base_BTD.astype(f32), GATE_BOUND)
  c = _bound(ctx_BTD.astype(f32), GATE_BOUND)
  return jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(c)


def init_decays(lo, hi, n):
  """n decays from lo to hi with geometrically spaced timescales 1 / (1 - a)."""
  return 1.0 - np.geomspace(1.0 - lo, 1.0 - hi, n)


def _half_decay_logit(lo, hi):
  """Init of lam and of the context gate's bias: each gate is sqrt(a) at init, so
  that with f_base, f_ctx ~ 0 the decay sig(lam) * sig(ctx) spans [lo, hi]."""
  def init(key, shape, dtype):
    del key
    g = np.sqrt(init_decays(lo, hi, shape[0]))
    return jnp.asarray(np.log(g / (1 - g)), dtype)
  return init


class Block(nn.Module):
  """One MM-Rec block: fused projection, MDI decay, linear scan, HDS memory, mixer, FFN."""
  cfg: MMRecConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, state: LayerState, reset_BT):
    cfg = self.cfg
    D, dt = cfg.d_model, cfg.compute_dtype
    hid = D // cfg.mdi_hidden_div
    out_scale = 1.0 / (2 * cfg.n_layers)
    xn_BTD = rms_norm(cfg, "norm_mix")(x_BTD)
    # One fused projection: kernel [D, 5, D], slices q, k, v, z, i of its middle axis
    # ([D, 4, D] without q when there is no memory).
    n = cfg.n_slices
    fused_BTnD = nn.DenseGeneral(
        (n, D), use_bias=False, dtype=dt, param_dtype=cfg.params_dtype,
        kernel_init=logical(layers.scaled(), "embed", None, "fused"), dot_general=cfg.dot_general,
        name="fused")(xn_BTD)
    # One split (its gradient is one concatenation, not n padded copies summed).
    parts = [p[..., 0, :] for p in jax.lax.split(fused_BTnD, [1] * n, axis=-2)]
    k_BTD, v_BTD, z_BTD, i_BTD = parts[n - 4:]

    # MDI: log a = log sig(lam + f_base(z)) + log sig(f_ctx(k)), decay in (0, 1).
    half = _half_decay_logit(cfg.decay_min, cfg.decay_max)
    lam_D = self.param("lam", logical(half, "embed"), (D,), cfg.params_dtype)
    if cfg.use_dpg:
      base_BTD = LowRank(cfg.rank, D, cfg, name="mdi_base")(z_BTD)
    else:
      base_BTD = MLP(hid, D, cfg, name="mdi_base", out_init_scale=0.1)(z_BTD)
    ctx_BTD = MLP(hid, D, cfg, name="mdi_ctx", out_init_scale=0.1, out_bias_init=half)(k_BTD)
    f32 = jnp.float32
    log_a = log_decay(lam_D, base_BTD, ctx_BTD)
    a_BTD = jnp.exp(log_a)
    b_BTD = -jnp.expm1(log_a) * jax.nn.sigmoid(i_BTD.astype(f32)) * z_BTD.astype(f32)
    h_BTD = linear_scan(a_BTD, b_BTD, state.h, reset_BT, impl=cfg.scan_impl,
                        chunk=cfg.scan_chunk)

    if cfg.mem_levels:
      mem_BTD, (memory, pos, csum, cw) = HDSMemory(cfg, name="memory")(
          h_BTD, parts[0], reset_BT, state)
      gated_BTD = h_BTD.astype(dt) if cfg.mem_residual else h_BTD.astype(dt) + mem_BTD
    else:  # no long-term memory: nothing written, nothing read, no parameters
      memory, pos, csum, cw = state.memory, state.pos, state.chunk_sum, state.chunk_weight
      gated_BTD = h_BTD.astype(dt)
    y_BTD = dense(D, ("kv", "embed"), cfg, "mix_out", init_scale=out_scale)(
        gated_BTD * nn.gelu(v_BTD))
    if cfg.mem_levels and cfg.mem_residual:
      y_BTD = y_BTD + mem_BTD
    y_BTD = nn.Dropout(cfg.dropout)(y_BTD, deterministic=self.deterministic)
    x_BTD = x_BTD + y_BTD

    aux = {}
    xn_BTD = rms_norm(cfg, "norm_ffn")(x_BTD)
    if cfg.use_moe:
      f_BTD, aux["moe"] = MoE(cfg, name="moe")(xn_BTD, self.deterministic)
    else:
      f_BTD = MLP(cfg.ffn_mult * D, D, cfg, name="ffn", out_init_scale=out_scale)(xn_BTD)
    f_BTD = nn.Dropout(cfg.dropout)(f_BTD, deterministic=self.deterministic)
    x_BTD = x_BTD + f_BTD

    if cfg.use_uboo:  # predict sg(RMSNorm(h_{t+1})) from h_t, within a document
      pred_BTD = MLP(hid, D, cfg, name="uboo")(h_BTD[:, :-1].astype(dt)).astype(f32)
      nxt_BTD = h_BTD[:, 1:]
      target = jax.lax.stop_gradient(
          nxt_BTD * jax.lax.rsqrt(jnp.mean(jnp.square(nxt_BTD), -1, keepdims=True) + 1e-6))
      ok_BT = (~reset_BT[:, 1:]).astype(f32)
      err_BT = jnp.mean(jnp.square(pred_BTD - target), axis=-1)
      aux["uboo"] = jnp.sum(err_BT * ok_BT) / jnp.maximum(jnp.sum(ok_BT), 1.0)

    new_state = LayerState(h=h_BTD[:, -1], memory=memory, pos=pos, chunk_sum=csum,
                           chunk_weight=cw)
    return x_BTD, (new_state, aux)


class MMRec(nn.Module):
  """The MM-Rec language model: embedding, L blocks, final RMSNorm, tied head.

  `unstacked` is the decoding form (`unstack`): per-layer parameters read in
  place; training, checkpoints and exports always use the stacked layout.
  """
  cfg: MMRecConfig
  unstacked: bool = False

  def init_state(self, batch: int) -> LayerState:
    """The decoding state at a document start: fixed size, stacked over layers."""
    c = self.cfg
    L, D = c.n_layers, c.d_model
    memory = None   # no long-term memory (mem_levels=0)
    if c.mem_levels:
      one = mem_lib.empty_memory(c.mem_levels, c.mem_slots, 2 * D)  # key and value per slot
      memory = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (L, batch) + v.shape), one)
    return LayerState(h=jnp.zeros((L, batch, D), jnp.float32), memory=memory,
                      pos=jnp.zeros((L, batch), jnp.int32),
                      chunk_sum=jnp.zeros((L, batch, D), jnp.float32),
                      chunk_weight=jnp.zeros((L, batch), jnp.float32))

  def aux_weights(self) -> dict[str, float]:
    """Weights of the auxiliary losses `apply` returns: total = ce + sum(w * aux)."""
    w = {}
    if self.cfg.use_moe:
      w["moe"] = self.cfg.moe_loss_weight
    if self.cfg.use_uboo:
      w["uboo"] = self.cfg.uboo_weight
    return w

  def lr_scales(self) -> dict[str, float]:
    """The model's own per-module learning-rate factors ({module name: factor})."""
    return {"memory": float(self.cfg.mem_lr_scale)} if self.cfg.mem_levels else {}

  def flops_per_token(self, seq_len: int | None = None) -> float:
    """Forward matmul FLOPs per token, memory attention included (training: x3)."""
    del seq_len  # the cost per token does not depend on the sequence length
    cfg = self.cfg
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    hid = D // cfg.mdi_hidden_div
    F = cfg.ffn_mult * D
    M = cfg.mem_readable_slots
    per_layer = 2 * D * cfg.n_slices * D                       # fused projection
    per_layer += (2 * 2 * D * cfg.rank) if cfg.use_dpg else (2 * 2 * D * hid)  # f_base
    per_layer += 2 * 2 * D * hid                               # f_ctx
    if cfg.mem_levels:
      per_layer += 2 * D                                       # pooling weight
      per_layer += 3 * 2 * D * D / cfg.chunk_size              # summary, key, value per chunk
      per_layer += 2 * 2 * D * M                               # memory attention
      per_layer += 2 * D * D                                   # memory out
    per_layer += 2 * D * D                                     # mixer out
    per_layer += 10 * D                                        # scans and gates (elementwise)
    if cfg.use_moe:  # router, and the expert FFNs the implementation computes per token
      per_layer += 2 * D * cfg.moe_experts + moe_experts_run(cfg) * (2 * 2 * D * F)
    else:
      per_layer += 2 * 2 * D * F
    if cfg.use_uboo:
      per_layer += 2 * 2 * D * hid
    return float(L * per_layer + 2 * D * V)

  def unstack(self, params=None):
    """(decoding model, its params): layers unrolled, weights read in place."""
    if self.unstacked:
      return self, params
    model = MMRec(self.cfg, unstacked=True, parent=None)
    return model, None if params is None else layers.unstack_params(params, self.cfg.n_layers)

  @nn.compact
  def __call__(self, tokens_BT, state=None, reset=None, deterministic=True, last_only=False,
               head=True):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if state is None:
      state = self.init_state(B)
    reset_BT = jnp.zeros((B, T), bool) if reset is None else reset.astype(bool)
    embed_VD = layers.embedding(self, cfg)
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD, new_state, aux = layers.run_layers(Block, cfg, x_BTD, state, reset_BT,
                                              unstacked=self.unstacked,
                                              deterministic=deterministic)
    aux = {k: (jnp.mean(v) if k == "moe" else jnp.sum(v)) for k, v in aux.items()}
    if last_only:  # logits of the last position only (a prefill needs no others)
      x_BTD = x_BTD[:, -1:]
    x_BTD = rms_norm(cfg, "final_norm")(x_BTD)
    if not head:  # the final hidden states; the caller applies the head (`loss.head_cross_entropy`)
      return x_BTD, new_state, aux
    return layers.tied_head(x_BTD, embed_VD, cfg), new_state, aux
