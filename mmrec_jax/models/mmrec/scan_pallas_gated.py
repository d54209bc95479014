"""The fused Pallas recurrence: the decay's and the input gate's elementwise math
inside the kernel, so neither `a` nor `b` is written to memory.

    h = linear_scan_pallas_gated(log_a, i, z, h0, reset)
    # the same as linear_scan(exp(log_a), -expm1(log_a) * sigmoid(i) * z, h0, reset)

Layout, grid, backward and what was checked where: `scan_pallas.py`.
"""
from __future__ import annotations
import functools
import math
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmrec_jax.models.mmrec.scan_pallas import (_F32, _Tiling, _tiling, _compiler_params, _time_loop, _initial_carry, _specs, _check_inputs, _to_blocks, _state_to_blocks, _from_blocks)


def _neg_expm1(x):
  """-expm1(x) = 1 - exp(x) for x <= 0, accurate near 0 without an expm1 primitive
  (Mosaic has none): Kahan's (u - 1) * x / log(u), u = exp(x), exact where u == 1."""
  u = jnp.exp(x)
  um1 = u - 1.0
  near = jnp.where(u == 1.0, x, um1 * x / jnp.log(jnp.where(u == 1.0, 0.5, u)))
  return -jnp.where(x < -1.0, um1, near)


def _gates(la_ref, i_ref, z_ref, keep, t):
  """The step-t decay and input from log a, the input gate's pre-activation and z."""
  la = la_ref[t].astype(_F32)
  e = jnp.exp(la)
  s = jax.nn.sigmoid(i_ref[t].astype(_F32))
  z = z_ref[t].astype(_F32)
  om = _neg_expm1(la)
  return la, e, keep * e, om, s, z


def _fused_fwd_kernel(keep_ref, la_ref, i_ref, z_ref, h0_ref, h_ref, hT_ref, *, tl: _Tiling):
  h = _initial_carry(h0_ref, hT_ref, tl)

  def step(t, h):
    _, _, a, om, s, z = _gates(la_ref, i_ref, z_ref, keep_ref[0, t], t)
    h = a * h + om * s * z
    h_ref[t] = h
    return h

  hT_ref[...] = _time_loop(tl.block_t, tl.unroll, step, h)


def _fused_bwd_kernel(keep_ref, la_ref, i_ref, z_ref, g_ref, h_ref, hb_ref,
                      dla_ref, di_ref, dz_ref, dh0_ref, *, tl: _Tiling):
  """dh as in `_bwd_kernel`; then through a = keep * e^la and b = (1 - e^la) s(i) z:
  dla = dh e^la (keep h_{t-1} - s z), di = dh (1 - e^la) z s (1 - s), dz = dh (1 - e^la) s."""
  bt = tl.block_t
  c = _initial_carry(None, dh0_ref, tl)

  def grads(t, c, h_prev):
    keep = keep_ref[0, t]
    _, e, a, om, s, z = _gates(la_ref, i_ref, z_ref, keep, t)
    dh = g_ref[t] + c
    dla_ref[t] = (dh * e * (keep * h_prev - s * z)).astype(dla_ref.dtype)
    dbs = dh * om
    di_ref[t] = (dbs * z * s * (1.0 - s)).astype(di_ref.dtype)
    dz_ref[t] = (dbs * s).astype(dz_ref.dtype)
    return a * dh

  def step(i, c):
    t = bt - 1 - i
    return grads(t, c, h_ref[t - 1])

  if bt > 1:
    c = _time_loop(bt - 1, math.gcd(tl.unroll, bt - 1), step, c)
  dh0_ref[...] = grads(0, c, hb_ref[...])


def _keep_spec(tl: _Tiling, reverse: bool):
  n_t = tl.n_t
  tb = (lambda t: n_t - 1 - t) if reverse else (lambda t: t)
  kw = {}
  if tl.target == "tpu":  # per-step scalars: scalar memory on TPU
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    kw["memory_space"] = pltpu.SMEM
  # keep is [B, n_t, 1, block_t]: the block's last two dimensions are the array's (TPU rule)
  return pl.BlockSpec((None, None, 1, tl.block_t), lambda b, d, t: (b, tb(t), 0, 0), **kw)


def _fused_fwd_call(keep4, la4, i4, z4, h03, tl: _Tiling):
  B = la4.shape[0]
  seq, state, _ = _specs(tl, reverse=False)
  return pl.pallas_call(
      functools.partial(_fused_fwd_kernel, tl=tl),
      grid=(B, tl.n_d, tl.n_t),
      in_specs=[_keep_spec(tl, False), seq, seq, seq, state],
      out_specs=[seq, state],
      out_shape=[jax.ShapeDtypeStruct(la4.shape, _F32), jax.ShapeDtypeStruct(h03.shape, _F32)],
      interpret=tl.interpret,
      compiler_params=_compiler_params(tl),
      name="linear_scan_gated_fwd",
  )(keep4, la4, i4, z4, h03)


def _fused_bwd_call(keep4, la4, i4, z4, g4, h4, hb4, tl: _Tiling):
  B = la4.shape[0]
  seq, state, per_block = _specs(tl, reverse=True)
  return pl.pallas_call(
      functools.partial(_fused_bwd_kernel, tl=tl),
      grid=(B, tl.n_d, tl.n_t),
      in_specs=[_keep_spec(tl, True), seq, seq, seq, seq, seq, per_block],
      out_specs=[seq, seq, seq, state],
      out_shape=[*(jax.ShapeDtypeStruct(la4.shape, dt) for dt in tl.dtypes),
                 jax.ShapeDtypeStruct((B, tl.d_rows, tl.lanes), _F32)],
      interpret=tl.interpret,
      compiler_params=_compiler_params(tl),
      name="linear_scan_gated_bwd",
  )(keep4, la4, i4, z4, g4, h4, hb4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_scan(keep4, la4, i4, z4, h03, tl):
  return _fused_fwd_call(keep4, la4, i4, z4, h03, tl)[0]


def _gated_scan_fwd(keep4, la4, i4, z4, h03, tl):
  h4, _ = _fused_fwd_call(keep4, la4, i4, z4, h03, tl)
  return h4, (keep4, la4, i4, z4, h4, h03)


def _gated_scan_bwd(tl, res, g4):
  keep4, la4, i4, z4, h4, h03 = res
  hb4 = jnp.concatenate([h03[:, None], h4[:, tl.block_t - 1::tl.block_t][:, :tl.n_t - 1]],
                        axis=1)
  dla4, di4, dz4, dh03 = _fused_bwd_call(keep4, la4, i4, z4, g4.astype(_F32), h4, hb4, tl)
  return jnp.zeros_like(keep4), dla4, di4, dz4, dh03


_gated_scan.defvjp(_gated_scan_fwd, _gated_scan_bwd)


def linear_scan_pallas_gated(log_a_BTD, i_BTD, z_BTD, h0_BD=None, reset_BT=None, *,
                             block_t=None, block_d=None, interpret=None, target=None):
  """The MM-Rec layer's scan with its gates fused into the kernels:

    a = exp(log_a),  b = -expm1(log_a) * sigmoid(i) * z,
    h = linear_scan(a, b, h0, reset)   (float32),

  without writing a and b to memory; gradients w.r.t. log_a, i, z and h0.
  `reset` zeroes only the decay (b is unchanged), as `linear_scan` does. log_a
  should be <= 0 (a decay in (0, 1]); -expm1 is computed with Kahan's formula
  (no expm1 primitive in Mosaic), within a few float32 ulps of jnp.expm1.
  Inputs float32 or bfloat16; the blocks and modes as for `linear_scan_pallas`.
  """
  log_a_BTD, i_BTD, z_BTD = _check_inputs(log_a=log_a_BTD, i=i_BTD, z=z_BTD)
  B, T, D = log_a_BTD.shape
  tl = _tiling(T, D, (log_a_BTD.dtype, i_BTD.dtype, z_BTD.dtype), block_t, block_d,
               interpret, target)
  keep_BT = jnp.ones((B, T), _F32) if reset_BT is None else 1.0 - reset_BT.astype(_F32)
  keep4 = jnp.pad(keep_BT, ((0, 0), (0, tl.t_pad - T)), constant_values=1.0)
  keep4 = keep4.reshape(B, tl.n_t, 1, tl.block_t)
  # padded steps: log a = 0 gives a = 1 and b = 0 whatever i and z are
  h4 = _gated_scan(keep4, _to_blocks(log_a_BTD, tl, 0), _to_blocks(i_BTD, tl, 0),
                   _to_blocks(z_BTD, tl, 0), _state_to_blocks(h0_BD, B, tl), tl)
  return _from_blocks(h4, T, D)
