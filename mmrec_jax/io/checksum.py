"""Checksums of a checkpoint's values, computed on the devices where they live.

Orbax stores arrays (compressed) without a checksum of the values, so a flipped
bit in a stored chunk can restore silently as a wrong value. Every checkpoint
records, in its `meta` item, one 32-bit checksum per saved tree (parameters,
optimizer state); restoring recomputes it and a mismatch makes the checkpoint
unreadable (resume then falls back to the one before).

The checksum of a tree is a position-weighted sum of its values' bits, modulo
2^32: each leaf's elements, read as unsigned integers of their width, are
multiplied by odd weights (so a change of any single bit changes the sum) and
added, and the leaves are combined in tree order. It is one jitted, memory-bound
pass over the state, sharded like it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(2654435761)   # Knuth's multiplicative hash constant (odd)
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sum(x):
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:   # 64-bit values: both halves
    x = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size in _UINT:
    x = jax.lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)
  flat = x.reshape(-1).astype(jnp.uint32)
  idx = jnp.arange(flat.shape[0], dtype=jnp.uint32)
  weights = (idx * _GOLDEN) | jnp.uint32(1)
  return jnp.sum(flat * weights, dtype=jnp.uint32)


@functools.partial(jax.jit)
def _tree_sum(tree):
  total = jnp.uint32(0)
  for i, leaf in enumerate(jax.tree.leaves(tree)):
    total = total * jnp.uint32(31) + _leaf_sum(leaf) + jnp.uint32(i)
  return total


def checksum(tree) -> int:
  """The tree's 32-bit checksum (an int; the same on every process)."""
  if not jax.tree.leaves(tree):
    return 0
  return int(jax.device_get(_tree_sum(tree)))
