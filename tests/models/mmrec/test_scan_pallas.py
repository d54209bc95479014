"""The Pallas scan (interpret mode on CPU) equals the sequential scan in values and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mmrec_jax.models.mmrec.scan import linear_scan
from mmrec_jax.models.mmrec.scan_pallas import _tiling, linear_scan_pallas
from mmrec_jax.models.mmrec.scan_pallas_gated import _neg_expm1, linear_scan_pallas_gated

B = 2


def _inputs(T, D, seed=0, dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  a = jax.nn.sigmoid(jax.random.normal(k1, (B, T, D)) + 2.0).astype(dtype)
  b = jax.random.normal(k2, (B, T, D)).astype(dtype)
  h0 = jax.random.normal(k3, (B, D))
  w = jax.random.normal(k4, (B, T, D))  # the loss weights: a cotangent that differs per step
  # resets at t=0 (sequence 0), mid-sequence and on a time-block boundary (sequence 1)
  reset = jnp.zeros((B, T), bool).at[0, 0].set(True)
  if T > 17:
    reset = reset.at[1, T // 2 + 1].set(True).at[1, 16].set(True)
  return a, b, h0, reset, w


@functools.partial(jax.jit, static_argnames="kw")
def _pallas_value_and_grad(a, b, h0, reset, w, kw):
  def loss(a, b, h0):
    h = linear_scan_pallas(a, b, h0, reset, **dict(kw))
    return jnp.sum(w * h), h
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(a, b, h0)


@jax.jit
def _reference_value_and_grad(a, b, h0, reset, w):
  def loss(a, b, h0):
    h = linear_scan(a, b, h0, reset, impl="sequential")
    return jnp.sum(w * h), h
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(a, b, h0)


def _assert_matches(a, b, h0, reset, w, kw, rtol=1e-5, atol=1e-5):
  (_, h_ref), g_ref = _reference_value_and_grad(a, b, h0, reset, w)
  (_, h), g = _pallas_value_and_grad(a, b, h0, reset, w, tuple(sorted(kw.items())))
  assert h.dtype == jnp.float32 and h.shape == a.shape
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)
  for name, x, x_ref in zip(("da", "db", "dh0"), g, g_ref):
    assert x.dtype == x_ref.dtype and x.shape == x_ref.shape, name
    # bfloat16 gradients: the same float32 value may round to neighbouring bfloat16s
    tol = (rtol, atol) if x.dtype == jnp.float32 else (1e-2, 1e-2)
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(x_ref, np.float32),
                               *tol, err_msg=name)
  return h


# T and D are not multiples of the blocks; each layout runs through the kernels' paths:
# cpu: several time and channel blocks; tpu: several time blocks, unrolled loop;
# gpu: one time block (the whole sequence), unrolled loop, several channel blocks.
LAYOUTS = {
    "cpu": {"target": "cpu", "block_t": 8, "block_d": 128},
    "tpu": {"target": "tpu", "interpret": True, "block_t": 16},
    "gpu": {"target": "gpu", "interpret": True, "block_d": 128},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_and_gradients_match_sequential(layout):
  kw = LAYOUTS[layout]
  T, D = 37, 200
  tl = _tiling(T, D, (jnp.float32, jnp.float32), kw.get("block_t"), kw.get("block_d"),
               kw.get("interpret"), kw["target"])
  assert tl.t_pad > T and tl.d_rows * tl.lanes > D  # both paddings are exercised
  assert (tl.n_t > 1) == (layout != "gpu")
  assert (tl.n_d > 1) == (layout != "tpu")  # TPU keeps 8-row tiles: one block at D=200
  _assert_matches(*_inputs(T, D), kw)


def test_small_channels_and_single_steps():
  """D below one lane tile; T=1 (decoding) in every layout (no loop in the backward
  kernel), with a reset at t=0 in one sequence; T=2 without resets."""
  a, b, h0, reset, w = _inputs(1, 5, seed=1)
  for kw in ({}, LAYOUTS["tpu"], LAYOUTS["gpu"]):
    _assert_matches(a, b, h0, reset, w, kw)
  a, b, h0, _, w = _inputs(2, 5, seed=2)
  _assert_matches(a, b, h0, None, w, {})


def test_bfloat16_inputs_accumulate_in_float32():
  a, b, h0, reset, w = _inputs(37, 40, seed=4, dtype=jnp.bfloat16)
  # float32 output equal (1e-5) to the sequential scan of the same bfloat16 inputs, which
  # accumulates in float32; bfloat16 gradients for a and b
  _assert_matches(a, b, h0, reset, w, {"block_t": 8})


def test_no_initial_state_jit_and_vmap():
  a, b, _h0, reset, _w = _inputs(19, 24, seed=5)
  ref = linear_scan(a, b, None, reset, impl="sequential")
  f = jax.jit(linear_scan_pallas, static_argnames=("block_t", "block_d"))
  np.testing.assert_allclose(np.asarray(f(a, b, None, reset, block_t=4)), np.asarray(ref),
                             rtol=1e-5, atol=1e-5)
  # vmap over a leading axis (e.g. layers): the pallas_call batches into its grid
  hv = jax.vmap(lambda a, b: linear_scan_pallas(a, b, None, reset, block_t=4))(
      jnp.stack([a, 0.5 * a]), jnp.stack([b, b]))
  np.testing.assert_allclose(np.asarray(hv[0]), np.asarray(ref), rtol=1e-5, atol=1e-5)
  ref_half = linear_scan(0.5 * a, b, None, reset, impl="sequential")
  np.testing.assert_allclose(np.asarray(hv[1]), np.asarray(ref_half), rtol=1e-5, atol=1e-5)


def test_tpu_interpreter():
  """The TPU interpreter simulates the VMEM pipeline (uninitialized memory is NaN): the
  state carried between time blocks in the resident output block must survive it.
  (One simulated core: with two, its threads deadlock on a process pinned to one CPU,
  even for a copy kernel.)"""
  a, b, h0, reset, w = _inputs(20, 24, seed=6)
  _assert_matches(a, b, h0, reset, w, {"interpret": pltpu.InterpretParams(), "block_t": 8})


# --- the gated variant: a = exp(log_a), b = -expm1(log_a) * sigmoid(i) * z in the kernel ---


def test_neg_expm1_matches_jnp():
  x = jnp.concatenate([-jnp.logspace(-12, 3, 4000), jnp.zeros(1)])
  np.testing.assert_allclose(np.asarray(jax.jit(_neg_expm1)(x)), np.asarray(-jnp.expm1(x)),
                             rtol=1e-6, atol=0)


@jax.jit
def _gated_reference_value_and_grad(la, i, z, h0, reset, w):
  def loss(la, i, z, h0):
    b = -jnp.expm1(la) * jax.nn.sigmoid(i.astype(jnp.float32)) * z.astype(jnp.float32)
    h = linear_scan(jnp.exp(la), b, h0, reset, impl="sequential")
    return jnp.sum(w * h), h
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(la, i, z, h0)


@functools.partial(jax.jit, static_argnames="kw")
def _gated_value_and_grad(la, i, z, h0, reset, w, kw):
  def loss(la, i, z, h0):
    h = linear_scan_pallas_gated(la, i, z, h0, reset, **dict(kw))
    return jnp.sum(w * h), h
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(la, i, z, h0)


GATED = {
    "gpu": ({"target": "gpu", "interpret": True, "block_d": 128}, jnp.float32),
    "tpu-interpreter": ({"interpret": pltpu.InterpretParams(), "block_t": 16}, jnp.float32),
    "cpu-bf16": ({"target": "cpu", "block_t": 8, "block_d": 128}, jnp.bfloat16),
}


@pytest.mark.parametrize("layout", GATED)
def test_gated_matches_sequential(layout):
  kw, dtype = GATED[layout]
  T, D = 37, 200
  a, z, h0, reset, w = _inputs(T, D, seed=7)
  la = jnp.log(a)  # decays in (0, 1)
  i = (z * 2.0 + 0.5).astype(dtype)
  z = z.astype(dtype)
  (_, h_ref), g_ref = _gated_reference_value_and_grad(la, i, z, h0, reset, w)
  (_, h), g = _gated_value_and_grad(la, i, z, h0, reset, w, tuple(sorted(kw.items())))
  assert h.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-5)
  for name, x, x_ref in zip(("dlog_a", "di", "dz", "dh0"), g, g_ref):
    assert x.dtype == x_ref.dtype, name
    # bfloat16 gradients: the same float32 value may round to neighbouring bfloat16s
    tol = 1e-5 if x.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(x_ref, np.float32),
                               rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_tpu_and_gpu(platform):
  """The Pallas -> Mosaic (TPU) and Pallas -> Triton (GPU) lowerings run on CPU (nothing is
  compiled for, or run on, the accelerator): block shapes obey the backend's rules and
  every primitive in the kernels has a lowering."""
  target = "tpu" if platform == "tpu" else "gpu"
  x = jax.ShapeDtypeStruct((2, 37, 200), jnp.bfloat16)
  h0 = jax.ShapeDtypeStruct((2, 200), jnp.float32)
  reset = jax.ShapeDtypeStruct((2, 37), jnp.bool_)
  log_a = jax.ShapeDtypeStruct((2, 37, 200), jnp.float32)
  kw = {"target": target, "interpret": False}

  def both(log_a, a, b, h0, reset):
    plain = lambda a, b, h0: jnp.sum(linear_scan_pallas(a, b, h0, reset, **kw))
    gated = lambda *x: jnp.sum(linear_scan_pallas_gated(*x, h0, reset, **kw))
    return (jax.value_and_grad(plain, argnums=(0, 1, 2))(a, b, h0),
            jax.value_and_grad(gated, argnums=(0, 1, 2))(log_a, a, b))

  text = jax.jit(both).trace(log_a, x, x, h0, reset).lower(
      lowering_platforms=(platform,)).as_text()
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(f"@{call}") == 4  # forward and backward of both variants


@pytest.mark.slow
def test_the_model_with_scan_impl_pallas_equals_sequential():
  """`model.scan_impl=pallas` (the gated kernel inside the block) gives the
  sequential model's logits, carried state and parameter gradients, with a
  document start inside a row and a state carried in."""
  from mmrec_jax import models  # pylint: disable=import-outside-toplevel
  base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, chunk_size=4, mem_slots=2,
              mem_levels=2, mem_out_init=1.0)
  seq = models.build(dict(base, scan_impl="sequential"))
  pal = models.build(dict(base, scan_impl="pallas"))
  params = models.init_params(seq, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 12), 1, 32).at[1, 5].set(0)
  reset = toks == 0

  def loss(p, model, state):
    logits, new_state, _ = model.apply({"params": p}, toks, state=state, reset=reset)
    return jnp.sum(jnp.sin(logits)), (logits, new_state)

  state = jax.jit(lambda p, x: seq.apply({"params": p}, x, state=seq.init_state(2))[1])(
      params, toks[:, :7])
  grad = lambda model: jax.jit(jax.value_and_grad(lambda p, s: loss(p, model, s),
                                                   has_aux=True))
  (ls, (lo_s, st_s)), g_s = grad(seq)(params, state)
  (lp, (lo_p, st_p)), g_p = grad(pal)(params, state)
  np.testing.assert_allclose(lo_p, lo_s, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(st_p.h, st_s.h, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_s)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  assert abs(float(lp) - float(ls)) < 1e-3
