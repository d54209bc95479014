"""MM-Rec in Flax linen: blocks with a gated linear recurrence and an HDS memory.

Usage (as any Flax model):

    model = MMRec(ModelConfig.from_config(config.model))
    params = init_params(model, jax.random.key(0))
    logits_BTV, state, aux = model.apply({'params': params}, tokens_BT)
    logits_BTV, state, aux = model.apply({'params': params}, next_BT, state=state)

`state` is the decoding state (per layer: recurrent state h, the memory slots
with their fill flags, the running summary of the current chunk, the position
in the document); its size never depends on how many tokens were seen.
`reset_BT` marks document starts: the state is dropped there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax import memory as mem_lib
from mmrec_jax.scan import linear_scan

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section of a config, as a hashable frozen dataclass."""
  name: str = "custom"
  vocab_size: int = 5000
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  max_seq_len: int = 1024
  ffn_mult: int = 4
  mdi_hidden_div: int = 4
  chunk_size: int = 32
  mem_slots: int = 8
  mem_levels: int = 3
  scan_impl: str = "auto"
  scan_chunk: int = 64
  dropout: float = 0.0
  use_dpg: bool = False
  dpg_rank: int = 8
  use_moe: bool = False
  moe_experts: int = 8
  moe_capacity_factor: float = 1.25
  moe_loss_weight: float = 0.01
  use_uboo: bool = False
  uboo_weight: float = 0.1
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"

  @classmethod
  def from_config(cls, c) -> "ModelConfig":
    """From a ConfigDict or dict (validated first); unknown fields are an error."""
    from mmrec_jax import config as config_lib
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise config_lib.ConfigError(f"unknown model field(s) {unknown}")
    config_lib.validate_model(config_lib.model_config_from_dict(d))
    return cls(**d)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def mem_readable_slots(self):
    return self.mem_levels * (self.mem_slots + 1)


def aux_weights(cfg: ModelConfig) -> dict[str, float]:
  """Weights of the auxiliary losses `apply` returns: total = ce + sum(w * aux)."""
  w = {}
  if cfg.use_moe:
    w["moe"] = cfg.moe_loss_weight
  if cfg.use_uboo:
    w["uboo"] = cfg.uboo_weight
  return w


def _init(init, *axes):
  return nn.with_logical_partitioning(init, axes)


def _scaled(scale=1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nn.Module):
  """A kernel [in, out] with logical axis names, optional bias."""
  features: int
  axes: tuple[str, str]
  cfg: ModelConfig
  use_bias: bool = False
  init_scale: float = 1.0
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    return nn.Dense(
        self.features, use_bias=self.use_bias, dtype=self.cfg.compute_dtype,
        param_dtype=self.cfg.params_dtype,
        kernel_init=_init(_scaled(self.init_scale), *self.axes),
        bias_init=_init(self.bias_init, self.axes[1]), name="dense")(x)


def rms_norm(cfg, name):
  return nn.RMSNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    scale_init=_init(nn.initializers.ones, "embed"), name=name)


class MLP(nn.Module):
  """in -> hidden GELU -> out, with biases."""
  hidden: int
  out: int
  cfg: ModelConfig
  hidden_axis: str = "mlp"
  out_init_scale: float = 1.0
  out_bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    y = Dense(self.hidden, ("embed", self.hidden_axis), self.cfg, use_bias=True, name="up")(x)
    y = nn.gelu(y)
    return Dense(self.out, (self.hidden_axis, "embed"), self.cfg, use_bias=True,
                 init_scale=self.out_init_scale, bias_init=self.out_bias_init, name="down")(y)


class LowRank(nn.Module):
  """DPG: the low-rank projection D -> r -> D replacing f_base."""
  rank: int
  out: int
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    y = Dense(self.rank, ("embed", "rank"), self.cfg, name="down")(x)
    return Dense(self.out, ("rank", "embed"), self.cfg, use_bias=True, name="up")(y)


class MoE(nn.Module):
  """Top-2 mixture of expert FFNs, routed per token, with a capacity.

  Buffer slots are given in token order (both choices of token t before any
  choice of token t+1), so whether a token is dropped depends only on earlier
  tokens: routing never leaks the future. Returns (y, load-balancing loss).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic):
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, F = cfg.moe_experts, cfg.ffn_mult * cfg.d_model
    logits_BTE = Dense(E, ("embed", "expert"), cfg, name="router")(x_BTD).astype(jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    gate_BTK, idx_BTK = jax.lax.top_k(probs_BTE, 2)
    gate_BTK = gate_BTK / jnp.sum(gate_BTK, axis=-1, keepdims=True)
    assign_BSE = jax.nn.one_hot(idx_BTK, E, dtype=jnp.int32).reshape(B, T * 2, E)
    cap = max(1, int(math.ceil(cfg.moe_capacity_factor * 2 * T / E)))
    slot_BSE = jnp.cumsum(assign_BSE, axis=1) - 1
    keep_BSE = (assign_BSE > 0) & (slot_BSE < cap)
    dispatch_BSEC = (keep_BSE[..., None] & (slot_BSE[..., None] == jnp.arange(cap))).astype(
        cfg.compute_dtype)
    combine_BSEC = dispatch_BSEC * gate_BTK.reshape(B, T * 2)[:, :, None, None].astype(
        cfg.compute_dtype)
    x_BSD = jnp.repeat(x_BTD, 2, axis=1)
    xin_BECD = jnp.einsum("bsec,bsd->becd", dispatch_BSEC, x_BSD)
    pd, dt = cfg.params_dtype, cfg.compute_dtype
    w1 = self.param("w_up", _init(nn.initializers.lecun_normal(batch_axis=(0,)), "expert", "embed",
                                  "mlp"), (E, D, F), pd)
    b1 = self.param("b_up", _init(nn.initializers.zeros, "expert", "mlp"), (E, F), pd)
    w2 = self.param("w_down", _init(nn.initializers.lecun_normal(batch_axis=(0,)), "expert", "mlp",
                                    "embed"), (E, F, D), pd)
    b2 = self.param("b_down", _init(nn.initializers.zeros, "expert", "embed"), (E, D), pd)
    h_BECF = nn.gelu(jnp.einsum("becd,edf->becf", xin_BECD, w1.astype(dt)) + b1.astype(dt)[:, None])
    y_BECD = jnp.einsum("becf,efd->becd", h_BECF, w2.astype(dt)) + b2.astype(dt)[:, None]
    y_BSD = jnp.einsum("bsec,becd->bsd", combine_BSEC, y_BECD)
    y_BTD = y_BSD.reshape(B, T, 2, D).sum(axis=2)
    frac_E = jnp.mean(assign_BSE.astype(jnp.float32), axis=(0, 1))
    prob_E = jnp.mean(probs_BTE, axis=(0, 1))
    lb = E * jnp.sum(frac_E * prob_E)
    return y_BTD, lb


class HDSMemory(nn.Module):
  """The layer's long-term memory: chunk summaries written, read by multi-head attention."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BTD, q_BTD, reset_BT, state):
    cfg = self.cfg
    B, T, D = h_BTD.shape
    H = cfg.n_heads
    dt = cfg.compute_dtype
    # Learned pooling: a per-token weight in (0, 1); the summary is the weighted mean.
    w_BT = jax.nn.sigmoid(
        Dense(1, ("embed", None), cfg, use_bias=True, name="pool")(h_BTD.astype(dt))[..., 0]
    ).astype(jnp.float32)

    pos_BT, last_reset_BT = jax.vmap(mem_lib.positions)(state["pos"], reset_BT)
    start_BT = pos_BT % cfg.chunk_size == 0
    ev = jax.vmap(lambda p, r: mem_lib.chunk_events(p, r, cfg.chunk_size))(pos_BT, last_reset_BT)
    end_BK, end_valid_BK, clear_BK, k_BT, cleared_BT, is_end_BT = ev
    # (sum w*h, sum w) of each ending chunk and of the unfinished last one, as
    # masked sums over the chunk's tokens; segment 0 continues the carried chunk.
    x_BTX = jnp.concatenate([w_BT[..., None] * h_BTD, w_BT[..., None]], axis=-1)
    carry_BX = jnp.concatenate([state["csum"], state["cw"][:, None]], axis=-1)
    seg_BT = jnp.cumsum(start_BT, axis=1)
    seg_BK = jnp.take_along_axis(seg_BT, end_BK, axis=1)
    sums = lambda sel, x: jnp.einsum("bkt,btx->bkx", sel.astype(jnp.float32), x,
                                     precision=jax.lax.Precision.HIGHEST)
    acc_BKX = (sums(seg_BT[:, None, :] == seg_BK[:, :, None], x_BTX)
               + jnp.where((seg_BK == 0)[..., None], carry_BX[:, None], 0.0))
    last_BX = (sums(seg_BT[:, None, :] == seg_BT[:, -1:, None], x_BTX)[:, 0]
               + jnp.where(seg_BT[:, -1:] == 0, carry_BX, 0.0))
    pooled_BKD = acc_BKX[..., :D] / jnp.maximum(acc_BKX[..., D:], 1e-6)
    summ_BKD = nn.gelu(Dense(D, ("embed", "kv"), cfg, name="summary")(pooled_BKD.astype(dt)))
    # The memory stores each summary's key and value: the projections are linear,
    # so pooling them in the coarser levels equals projecting pooled summaries,
    # and no slot is ever projected twice.
    kv_BKX = jnp.concatenate([Dense(D, ("kv", "kv"), cfg, name="key")(summ_BKD),
                              Dense(D, ("kv", "kv"), cfg, name="value")(summ_BKD)],
                             axis=-1).astype(jnp.float32)

    mem0 = {k: state[k] for k in ("slots", "valid", "pend", "pend_n")}
    snaps, final = jax.vmap(mem_lib.run_writes)(mem0, kv_BKX, end_valid_BK, clear_BK)
    m_BKMX, valid_BKM = jax.vmap(jax.vmap(mem_lib.readable))(snaps)
    K1, M = m_BKMX.shape[1:3]
    keys = m_BKMX[..., :D].astype(dt).reshape(B, K1, M, H, D // H)
    vals = m_BKMX[..., D:].astype(dt).reshape(B, K1, M, H, D // H)
    window = min(cfg.chunk_size, T)
    read_BTHd = jax.vmap(mem_lib.attend, in_axes=(0, 0, 0, 0, 0, 0, None))(
        q_BTD.reshape(B, T, H, D // H), keys, vals, valid_BKM, k_BT, cleared_BT, window)
    out_BTD = Dense(D, ("kv", "embed"), cfg, name="out")(read_BTHd.reshape(B, T, D).astype(dt))

    # The state after the last token.
    doc_cleared_B = last_reset_BT[:, -1] > jnp.max(jnp.where(is_end_BT, jnp.arange(T), -1), axis=1)
    final = jax.tree_util.tree_map(
        lambda m: jnp.where(doc_cleared_B.reshape((B,) + (1,) * (m.ndim - 1)), jnp.zeros_like(m), m),
        final)
    last_acc_BX = jnp.where(is_end_BT[:, -1:], 0.0, last_BX)
    new_state = dict(final, pos=pos_BT[:, -1] + 1, csum=last_acc_BX[:, :D], cw=last_acc_BX[:, D])
    return out_BTD, new_state


def log_decay(lam_D, base_BTD, ctx_BTD):
  """MDI in log space: log sig(lam + base) + log sig(ctx), float32, kept inside
  [-30, -1e-6] so that the decay exp(log a) is strictly in (0, 1) in float32."""
  f32 = jnp.float32
  log_a = (jax.nn.log_sigmoid(lam_D.astype(f32) + base_BTD.astype(f32))
           + jax.nn.log_sigmoid(ctx_BTD.astype(f32)))
  return jnp.clip(log_a, -30.0, -1e-6)


class Block(nn.Module):
  """One MM-Rec block: fused projection, MDI decay, linear scan, HDS memory, mixer, FFN."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, state, reset_BT):
    cfg = self.cfg
    D, dt = cfg.d_model, cfg.compute_dtype
    hid = D // cfg.mdi_hidden_div
    out_scale = 1.0 / (2 * cfg.n_layers)
    xn_BTD = rms_norm(cfg, "norm_mix")(x_BTD)
    fused = Dense(5 * D, ("embed", "fused"), cfg, name="fused")(xn_BTD)
    q_BTD, k_BTD, v_BTD, z_BTD, i_BTD = jnp.split(fused, 5, axis=-1)

    # MDI: log a = log sig(lam + f_base(z)) + log sig(f_ctx(k)), decay in (0, 1).
    lo, hi = 0.9, 0.999
    lam_init = lambda key, shape, dtype: jnp.asarray(
        np.log(np.linspace(lo, hi, shape[0]) / (1 - np.linspace(lo, hi, shape[0]))), dtype)
    lam_D = self.param("lam", _init(lam_init, "embed"), (D,), cfg.params_dtype)
    if cfg.use_dpg:
      base_BTD = LowRank(cfg.dpg_rank, D, cfg, name="mdi_base")(z_BTD)
    else:
      base_BTD = MLP(hid, D, cfg, name="mdi_base", out_init_scale=0.1)(z_BTD)
    ctx_bias = nn.initializers.constant(math.log(0.99 / 0.01))  # sigma(ctx) ~ 0.99 at init
    ctx_BTD = MLP(hid, D, cfg, name="mdi_ctx", out_init_scale=0.1, out_bias_init=ctx_bias)(k_BTD)
    f32 = jnp.float32
    log_a = log_decay(lam_D, base_BTD, ctx_BTD)
    a_BTD = jnp.exp(log_a)
    b_BTD = -jnp.expm1(log_a) * jax.nn.sigmoid(i_BTD.astype(f32)) * z_BTD.astype(f32)
    h_BTD = linear_scan(a_BTD, b_BTD, state["h"], reset_BT, impl=cfg.scan_impl,
                        chunk=cfg.scan_chunk)

    mem_BTD, mem_state = HDSMemory(cfg, name="memory")(h_BTD, q_BTD, reset_BT, state)
    y_BTD = (h_BTD.astype(dt) + mem_BTD) * nn.gelu(v_BTD)
    y_BTD = Dense(D, ("kv", "embed"), cfg, init_scale=out_scale, name="mix_out")(y_BTD)
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

    new_state = dict(mem_state, h=h_BTD[:, -1])
    return x_BTD, (new_state, aux)


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class MMRec(nn.Module):
  """The MM-Rec language model: embedding, L blocks, final RMSNorm, tied head."""
  cfg: ModelConfig

  def init_state(self, batch: int):
    """The decoding state at a document start: fixed size, stacked over layers."""
    c = self.cfg
    L, D = c.n_layers, c.d_model
    one = mem_lib.empty_memory(c.mem_levels, c.mem_slots, 2 * D)  # key and value per slot
    st = {k: jnp.broadcast_to(v, (L, batch) + v.shape) for k, v in one.items()}
    st.update(h=jnp.zeros((L, batch, D), jnp.float32), pos=jnp.zeros((L, batch), jnp.int32),
              csum=jnp.zeros((L, batch, D), jnp.float32), cw=jnp.zeros((L, batch), jnp.float32))
    return st

  @nn.compact
  def __call__(self, tokens_BT, state=None, reset=None, deterministic=True):
    cfg = self.cfg
    B, T = tokens_BT.shape
    D = cfg.d_model
    if state is None:
      state = self.init_state(B)
    reset_BT = jnp.zeros((B, T), bool) if reset is None else reset.astype(bool)
    embed = self.param("embed", _init(nn.initializers.normal(1.0 / math.sqrt(D)), "vocab", "embed"),
                       (cfg.vocab_size, D), cfg.params_dtype)
    x_BTD = jnp.take(embed, tokens_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, (new_state, aux) = stack(cfg, deterministic, name="blocks")(x_BTD, state, reset_BT)
    else:
      states, auxes = [], []
      for i in range(cfg.n_layers):
        st_i = jax.tree_util.tree_map(lambda s: s[i], state)
        x_BTD, (st_i, aux_i) = block(cfg, deterministic, name=f"block_{i}")(x_BTD, st_i, reset_BT)
        states.append(st_i)
        auxes.append(aux_i)
      new_state = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *states)
      aux = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *auxes)
    aux = {k: (jnp.mean(v) if k == "moe" else jnp.sum(v)) for k, v in aux.items()}

    x_BTD = rms_norm(cfg, "final_norm")(x_BTD)
    logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embed.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
    return logits_BTV, new_state, aux


def unstack_layers(model: MMRec, params):
  """The same function with the layers unrolled (scan_layers=False) and their
  parameters unstacked: decoding reads each layer's weights in place instead of
  slicing them out of the stacked array at every step."""
  if not model.cfg.scan_layers:
    return model, params
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(model.cfg.n_layers):
    out[f"block_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
  return MMRec(model.cfg.replace(scan_layers=False)), out


def init_params(model: MMRec, rng, batch: int = 1, seq_len: int | None = None):
  """Parameters (boxed with logical axis names) from a small dummy batch."""
  T = seq_len or model.cfg.chunk_size
  init = jax.jit(lambda r: model.init({"params": r}, jnp.zeros((batch, T), jnp.int32))["params"])
  return init(rng)


def param_shapes(model: MMRec):
  """Parameter shapes without allocating them (jax.eval_shape)."""
  return jax.eval_shape(lambda r: nn.unbox(init_params(model, r)), jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(tree))))


def state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
  """Forward matmul FLOPs per token, memory attention included (training: x3)."""
  D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
  hid = D // cfg.mdi_hidden_div
  F = cfg.ffn_mult * D
  M = cfg.mem_readable_slots
  per_layer = 2 * D * 5 * D                                  # fused projection
  per_layer += (2 * 2 * D * cfg.dpg_rank) if cfg.use_dpg else (2 * 2 * D * hid)  # f_base
  per_layer += 2 * 2 * D * hid                               # f_ctx
  per_layer += 2 * D                                         # pooling weight
  per_layer += 3 * 2 * D * D / cfg.chunk_size                # summary, key, value per chunk
  per_layer += 2 * 2 * D * M                                 # memory attention (scores + values)
  per_layer += 2 * D * D * 2                                 # memory out + mixer out
  per_layer += 10 * D                                        # scans and gates (elementwise)
  if cfg.use_moe:
    per_layer += 2 * D * cfg.moe_experts + 2 * (2 * 2 * D * F)
  else:
    per_layer += 2 * 2 * D * F
  if cfg.use_uboo:
    per_layer += 2 * 2 * D * hid
  return float(L * per_layer + 2 * D * V)
