"""One MM-Rec block: fused projection, MDI decay, linear scan, HDS memory, mixer, FFN."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmrec_jax.models import layers
from mmrec_jax.models.layers import MLP, dense, logical, rms_norm
from mmrec_jax.models.moe import MoE
from mmrec_jax.models.mmrec.config import GATE_BOUND, MMRecConfig
from mmrec_jax.models.mmrec.hds import HDSMemory, LayerState
from mmrec_jax.models.mmrec.scan import linear_scan
from mmrec_jax.models.mmrec.scan_pallas_gated import linear_scan_pallas_gated

KV = ("activation_batch", "activation_length", "activation_kv")   # the D-wide pieces of the fused projection and the recurrence


class LowRank(nn.Module):
  """DPG: the low-rank projection D -> r -> D replacing f_base."""
  rank: int
  out: int
  cfg: MMRecConfig

  @nn.compact
  def __call__(self, x):
    y = dense(self.rank, ("embed", "rank"), self.cfg, "down")(x)
    return dense(self.out, ("rank", "embed"), self.cfg, "up", use_bias=True)(y)


def log_decay(lam_D, base_BTD, ctx_BTD):
  """MDI in log space: log sig(lam + base) + log sig(ctx), float32.

  Each gate's pre-activation is bounded to [-GATE_BOUND, GATE_BOUND], so log a
  is in [-30.0, -6.1e-7] and the decay exp(log a) strictly in (0, 1) in float32.
  The bound passes gradients straight through: d log a / d lam is
  sig(-bounded) >= 3e-7, never exactly zero, so a saturated channel can recover.
  """
  f32 = jnp.float32
  u = layers.bound(lam_D.astype(f32) + base_BTD.astype(f32), GATE_BOUND)
  c = layers.bound(ctx_BTD.astype(f32), GATE_BOUND)
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
    x_BTD = layers.constrain(x_BTD, *layers.BTD)
    xn_BTD = rms_norm(cfg, "norm_mix")(x_BTD)
    # One fused projection: kernel [D, 5, D], slices q, k, v, z, i of its middle axis
    # ([D, 4, D] without q when there is no memory).
    n = cfg.n_slices
    fused_BTnD = nn.DenseGeneral(
        (n, D), use_bias=False, dtype=dt, param_dtype=cfg.params_dtype,
        kernel_init=logical(layers.scaled(), "embed", None, "fused"), dot_general=cfg.dot_general,
        name="fused")(xn_BTD)
    fused_BTnD = layers.saved(fused_BTnD, "fused")
    # One split (its gradient is one concatenation, not n padded copies summed).
    parts = [layers.constrain(p[..., 0, :], *KV)
             for p in jax.lax.split(fused_BTnD, [1] * n, axis=-2)]
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
    if cfg.scan_impl == "pallas" and x_BTD.shape[1] > 1:   # the gates inside the kernel
      h_BTD = linear_scan_pallas_gated(log_a, i_BTD, z_BTD, state.h, reset_BT)
    else:
      a_BTD = jnp.exp(log_a)
      b_BTD = -jnp.expm1(log_a) * jax.nn.sigmoid(i_BTD.astype(f32)) * z_BTD.astype(f32)
      h_BTD = linear_scan(layers.constrain(a_BTD, *KV), layers.constrain(b_BTD, *KV), state.h,
                          reset_BT, impl=cfg.scan_impl, chunk=cfg.scan_chunk)
    h_BTD = layers.saved(layers.constrain(h_BTD, *KV), "recurrence")

    if cfg.mem_levels:
      mem_BTD, (memory, pos, csum, cw, ksum, prev) = HDSMemory(cfg, name="memory")(
          h_BTD, parts[0], xn_BTD, reset_BT, state)
      mem_BTD = layers.saved(mem_BTD, "memory_read")
      gated_BTD = h_BTD.astype(dt) if cfg.mem_residual else h_BTD.astype(dt) + mem_BTD
    else:  # no long-term memory: nothing written, nothing read, no parameters
      memory, pos, csum, cw = state.memory, state.pos, state.chunk_sum, state.chunk_weight
      ksum, prev = state.key_sum, state.prev_x
      gated_BTD = h_BTD.astype(dt)
    y_BTD = dense(D, ("kv", "embed"), cfg, "mix_out", init_scale=out_scale)(
        gated_BTD * nn.gelu(v_BTD))
    y_BTD = layers.saved(y_BTD, "mix_out")
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
    f_BTD = layers.saved(f_BTD, "ffn_out")
    f_BTD = nn.Dropout(cfg.dropout)(f_BTD, deterministic=self.deterministic)
    x_BTD = layers.constrain(x_BTD + f_BTD, *layers.BTD)

    if cfg.use_uboo:  # predict sg(RMSNorm(h_{t+1})) from h_t, within a document
      pred_BTD = MLP(hid, D, cfg, name="uboo")(h_BTD[:, :-1].astype(dt)).astype(f32)
      nxt_BTD = h_BTD[:, 1:]
      target = jax.lax.stop_gradient(
          nxt_BTD * jax.lax.rsqrt(jnp.mean(jnp.square(nxt_BTD), -1, keepdims=True) + 1e-6))
      ok_BT = (~reset_BT[:, 1:]).astype(f32)
      err_BT = jnp.mean(jnp.square(pred_BTD - target), axis=-1)
      aux["uboo"] = jnp.sum(err_BT * ok_BT) / jnp.maximum(jnp.sum(ok_BT), 1.0)

    new_state = LayerState(h=h_BTD[:, -1], memory=memory, pos=pos, chunk_sum=csum,
                           chunk_weight=cw, key_sum=ksum, prev_x=prev)
    return x_BTD, (new_state, aux)
