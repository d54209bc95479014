"""Invariant 1: the scan implementations agree in values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.models.mmrec import scan as scan_lib
from mmrec_jax.models.mmrec.scan import resolve_impl

linear_scan = jax.jit(scan_lib.linear_scan, static_argnames=("impl", "chunk"))

IMPLS = ("sequential", "associative", "chunked")


def _inputs(T, B=2, D=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  a = jax.nn.sigmoid(jax.random.normal(k1, (B, T, D)) + 3.0)
  b = jax.random.normal(k2, (B, T, D))
  h0 = jax.random.normal(k3, (B, D))
  reset = jnp.zeros((B, T), bool).at[0, T // 3].set(True).at[1, 1].set(True)
  return a, b, h0, reset


def _reference(a, b, h0, reset):
  a, b, h0, reset = map(np.asarray, (a, b, h0, reset))
  h = h0.astype(np.float64).copy()
  out = np.zeros(a.shape)
  for t in range(a.shape[1]):
    h = np.where(reset[:, t, None], 0.0, a[:, t] * h) + b[:, t]
    out[:, t] = h
  return out


@pytest.mark.parametrize("T", [1, 7, 64, 1000, 4096])
def test_implementations_agree_with_reference(T):
  a, b, h0, reset = _inputs(T)
  ref = _reference(a, b, h0, reset)
  for impl in IMPLS:
    h = linear_scan(a, b, h0, reset, impl=impl, chunk=64)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h), ref, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("T", [33, 4096])
def test_gradients_agree(T):
  a, b, h0, reset = _inputs(T, seed=1)
  w = jax.random.normal(jax.random.key(5), (2, T, 8))

  def loss(a, b, h0, impl):
    return jnp.sum(w * linear_scan(a, b, h0, reset, impl=impl, chunk=32))

  grads = {i: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(a, b, h0, i)
           for i in IMPLS}
  for impl in IMPLS[1:]:
    for g_ref, g in zip(grads["sequential"], grads[impl]):
      np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5,
                                 err_msg=impl)


def test_reset_drops_state_and_initial_state_is_used():
  a, b, h0, reset = _inputs(16)
  h = linear_scan(a, b, h0, reset, impl="associative")
  h_fresh = linear_scan(a[:1, 5:], b[:1, 5:], None, None, impl="sequential")
  r = int(jnp.argmax(reset[0]))
  # Document starting at r: identical to a fresh run from r.
  h_doc = linear_scan(a[:1, r:], b[:1, r:], None, None, impl="sequential")
  np.testing.assert_allclose(h[0, r:], h_doc[0], rtol=1e-6, atol=1e-6)
  # Without the reset the initial state matters.
  h_nores = linear_scan(a, b, h0, None, impl="chunked", chunk=4)
  assert float(jnp.abs(h_nores[0, 0] - b[0, 0]).max()) > 1e-3
  assert h_fresh.shape == (1, 11, 8)


def test_bfloat16_inputs_accumulate_in_float32():
  a, b, h0, _ = _inputs(512)
  h = linear_scan(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), h0, impl="chunked")
  assert h.dtype == jnp.float32
  ref = _reference(a.astype(jnp.bfloat16).astype(jnp.float32),
                   b.astype(jnp.bfloat16).astype(jnp.float32), h0, jnp.zeros((2, 512), bool))
  np.testing.assert_allclose(np.asarray(h), ref, rtol=1e-4, atol=1e-4)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown scan implementation"):
    resolve_impl("fast")
  assert resolve_impl("auto") in IMPLS
