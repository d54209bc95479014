"""The recurrent memory core: one entry point for h_t = a_t * h_{t-1} + b_t.

`linear_scan(a, b, h0, reset, impl=...)` hides its backends:

- `sequential`: `lax.scan` over time, the reference (often the fastest on CPU);
- `associative`: `lax.associative_scan` with the combine
  (a1, b1) o (a2, b2) = (a1*a2, a2*b1 + b2), O(log T) depth;
- `chunked`: associative inside chunks of `chunk` steps, carried across chunks
  by a short sequential scan;
- `pallas`: a Pallas kernel with a hand-written backward (`scan_pallas.py`; on a
  CPU it runs in Pallas interpret mode, slowly, so the same config trains there);
  the MM-Rec block calls its fused form, gates inside the kernel;
- `auto`: chooses per backend (never `pallas` until it is measured faster there).

All accumulate in float32 whatever the input dtype. `reset[b, t]` drops the
carried state before step t (h_{t-1} := 0), so packed documents do not leak
into each other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "associative", "sequential", "chunked", "pallas")


def resolve_impl(impl: str, seq_len: int | None = None) -> str:
  """The implementation `auto` stands for on the current backend."""
  if impl not in IMPLS:
    raise ValueError(f"unknown scan implementation {impl!r}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "cpu":
    return "sequential"
  if backend == "gpu":
    # H200, base width, T = 1K..32K: 1.4-5.7x faster than chunked forward, 2.2-3.1x
    # forward+backward; small's bf16 train step 6% faster (docs/experiments/speed.md)
    return "associative"
  return "chunked" if (seq_len or 0) > 256 else "associative"


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _associative(a_BTD, b_BTD, h0_BD):
  b_BTD = b_BTD.at[:, 0].add(a_BTD[:, 0] * h0_BD)
  _, h_BTD = jax.lax.associative_scan(_combine, (a_BTD, b_BTD), axis=1)
  return h_BTD


def _sequential(a_BTD, b_BTD, h0_BD):
  def step(h_BD, ab):
    a_BD, b_BD = ab
    h_BD = a_BD * h_BD + b_BD
    return h_BD, h_BD

  _, h_TBD = jax.lax.scan(step, h0_BD, (jnp.swapaxes(a_BTD, 0, 1), jnp.swapaxes(b_BTD, 0, 1)))
  return jnp.swapaxes(h_TBD, 0, 1)


def _chunked(a_BTD, b_BTD, h0_BD, chunk):
  B, T, D = a_BTD.shape
  chunk = max(1, min(chunk, T))
  pad = (-T) % chunk
  if pad:  # identity steps (a=1, b=0) at the end leave the values before them unchanged
    a_BTD = jnp.concatenate([a_BTD, jnp.ones((B, pad, D), a_BTD.dtype)], axis=1)
    b_BTD = jnp.concatenate([b_BTD, jnp.zeros((B, pad, D), b_BTD.dtype)], axis=1)
  n = (T + pad) // chunk
  a_BNCD = a_BTD.reshape(B, n, chunk, D)
  b_BNCD = b_BTD.reshape(B, n, chunk, D)
  # Within each chunk, from a zero state: cumulative decay and local states.
  acum_BNCD, hloc_BNCD = jax.lax.associative_scan(_combine, (a_BNCD, b_BNCD), axis=2)

  def carry(h_BD, xs):
    acum_BCD, hloc_BCD = xs
    h_BCD = hloc_BCD + acum_BCD * h_BD[:, None]
    return h_BCD[:, -1], h_BCD

  _, h_NBCD = jax.lax.scan(carry, h0_BD,
                           (jnp.swapaxes(acum_BNCD, 0, 1), jnp.swapaxes(hloc_BNCD, 0, 1)))
  h_BTD = jnp.swapaxes(h_NBCD, 0, 1).reshape(B, n * chunk, D)
  return h_BTD[:, :T]


def linear_scan(a_BTD, b_BTD, h0_BD=None, reset_BT=None, *, impl="auto", chunk=64):
  """Returns h [B, T, D] float32 with h_t = a_t * h_{t-1} + b_t, h_{-1} = h0.

  Args:
    a_BTD: decays (any float dtype; float32 inside).
    b_BTD: inputs.
    h0_BD: the carried state (zeros if None).
    reset_BT: bool, True where the carried state is dropped before step t.
    impl: 'auto' | 'associative' | 'sequential' | 'chunked' | 'pallas'.
    chunk: chunk length of the chunked implementation.
  """
  a_BTD = a_BTD.astype(jnp.float32)
  b_BTD = b_BTD.astype(jnp.float32)
  B, T, D = a_BTD.shape
  h0_BD = jnp.zeros((B, D), jnp.float32) if h0_BD is None else h0_BD.astype(jnp.float32)
  if reset_BT is not None:
    a_BTD = jnp.where(reset_BT[:, :, None], 0.0, a_BTD)
  if T == 1:  # one step (decoding): the same arithmetic as every implementation, no loop
    return (a_BTD[:, 0] * h0_BD + b_BTD[:, 0])[:, None]
  impl = resolve_impl(impl, T)
  if impl == "pallas":
    from mmrec_jax.models.mmrec.scan_pallas import linear_scan_pallas  # pylint: disable=import-outside-toplevel
    return linear_scan_pallas(a_BTD, b_BTD, h0_BD)   # resets already folded into a
  if impl == "sequential":
    return _sequential(a_BTD, b_BTD, h0_BD)
  if impl == "associative":
    return _associative(a_BTD, b_BTD, h0_BD)
  return _chunked(a_BTD, b_BTD, h0_BD, chunk)
