"""The HDS memory's pure functions (`models/mmrec/memory.py`): writes follow their
level / pooling rules, training's closed form equals decoding's writes in order, a
salient chunk survives merging, and no dead slot is read."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax.models import mmrec as M
from mmrec_jax.models.mmrec import memory as mem_lib

# MM-Rec with a memory of 3 levels of 2 slots (and MoE, DPG, UBOO, the residual read)
CFG = M.MMRecConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4, mem_slots=2,
                    mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
                    use_uboo=True, mem_residual=True, mem_out_init=1.0)


def _reference_writes(xs, ms, levels, slots):
  """Plain-Python HDS: level 0 takes each summary; an item evicted from level l-1
  waits in level l's pending slot until a second arrives, then their mean weighted
  by their masses (mass: the sum of both) enters level l; the last level drops what
  it evicts. Yields (slots, masses, pending) per write."""
  lv = [[] for _ in range(levels)]        # newest first: (value, mass)
  pend = [None] * levels                  # pend[0] is never used
  for x, m in zip(xs, ms):
    item = (x, m)
    for l in range(levels):
      if item is None:
        break
      if l > 0:
        if pend[l] is None:
          pend[l], item = item, None
          break
        (a, ma), (b, mb) = pend[l], item
        item, pend[l] = ((ma * a + mb * b) / (ma + mb), ma + mb), None
      lv[l].insert(0, item)
      item = lv[l].pop() if len(lv[l]) > slots else None
    yield ([[v for v, _ in s] for s in lv], [[w for _, w in s] for s in lv],
           [None if p is None else p[0] for p in pend])


def test_memory_write_follows_the_level_and_pooling_rules():
  L, S, W = 3, 2, 5
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(40, W)).astype(np.float32)
  ms = rng.uniform(0.01, 10.0, size=40).astype(np.float32)   # masses: weighted merges
  mem = mem_lib.empty_memory(L, S, W)
  write = jax.jit(mem_lib.write)
  for x, m, (ref_slots, ref_mass, ref_pend) in zip(xs, ms, _reference_writes(xs, ms, L, S)):
    mem = write(mem, jnp.asarray(x), jnp.asarray(m))
    for l in range(L):
      n = len(ref_slots[l])
      np.testing.assert_array_equal(np.asarray(mem.valid[l]), [True] * n + [False] * (S - n))
      if n:
        np.testing.assert_allclose(np.asarray(mem.slots[l, :n]), np.stack(ref_slots[l]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(mem.mass[l, :n]), ref_mass[l], rtol=1e-5)
    m_MD, v_M = mem_lib.readable(mem)
    for l in range(1, L):
      assert int(mem.pend_n[l - 1]) == (ref_pend[l] is not None)
      if ref_pend[l] is not None:   # readable as the waiting item itself
        np.testing.assert_allclose(np.asarray(m_MD[L * S + l - 1]), ref_pend[l],
                                   rtol=1e-5, atol=1e-5)
    assert m_MD.shape == (mem_lib.readable_slots(L, S), W)
    assert int(v_M.sum()) == (sum(len(s) for s in ref_slots)
                              + sum(p is not None for p in ref_pend))
  assert int(np.asarray(mem.valid).sum()) == L * S   # 40 writes fill every level


@pytest.mark.parametrize("levels,slots,group", [(3, 2, None), (1, 3, None), (4, 1, None),
                                                (3, 2, 2), (4, 1, 4)])
def test_all_writes_at_once_equal_the_writes_in_order(levels, slots, group):
  """Training's closed form (every snapshot from the write count) gives what
  `write` (decoding) gives applied chunk by chunk: from a carried memory, across
  a document start inside the window, with trailing writes that do not happen;
  in one closed-form step, or (`group`) in steps of a few writes."""
  W, K, n0 = 6, 9, 11
  rng = np.random.default_rng(levels)
  write = jax.jit(mem_lib.write)
  mem0 = mem_lib.empty_memory(levels, slots, W)
  for _ in range(n0):   # the carried document's first n0 chunks
    mem0 = write(mem0, jnp.asarray(rng.normal(size=W), jnp.float32),
                 jnp.float32(rng.uniform(0.01, 5.0)))
  kv = rng.normal(size=(K, W)).astype(np.float32)
  mass = rng.uniform(0.01, 5.0, size=K).astype(np.float32)
  mass[2] = 0.0                                         # clamped to MIN_MASS, as `write` does
  valid = np.arange(K) < 7                              # the last two do not happen
  doc = np.array([-1, -1, -1, 40, 40, 40, 40, 40, 40])  # a document starts before write 3
  chunk = np.array([n0, n0 + 1, n0 + 2, 0, 1, 2, 3, 4, 5])
  fn = mem_lib.write_chunks if group is None else functools.partial(mem_lib.write_groups,
                                                                    group=group)
  m_KMX, valid_KM, final = jax.jit(fn)(
      mem0, jnp.int32(n0), jnp.asarray(kv), jnp.asarray(mass), jnp.asarray(valid),
      jnp.asarray(doc), jnp.asarray(chunk))
  mem, snaps = mem0, [mem_lib.readable(mem0)]
  for k in range(K):
    if valid[k]:
      if k == 3:
        mem = mem_lib.empty_memory(levels, slots, W)
      mem = write(mem, jnp.asarray(kv[k]), jnp.float32(mass[k]))
    snaps.append(mem_lib.readable(mem))
  for k, (ref_m, ref_v) in enumerate(snaps):
    np.testing.assert_array_equal(np.asarray(valid_KM[k]), np.asarray(ref_v), err_msg=f"{k}")
    np.testing.assert_allclose(np.where(ref_v[:, None], m_KMX[k], 0), np.asarray(ref_m),
                               rtol=1e-5, atol=1e-5, err_msg=f"snapshot {k}")
  for field in ("slots", "valid", "mass", "pend", "pend_mass", "pend_n"):
    np.testing.assert_allclose(np.asarray(getattr(final, field), np.float32),
                               np.asarray(getattr(mem, field), np.float32),
                               rtol=1e-5, atol=1e-5, err_msg=field)


def test_writes_into_a_memory_known_empty_equal_the_general_form():
  """`fresh=True` (the model's call without a state) skips the empty memory's
  entries and gives the same snapshots and final memory, past every level's
  capacity and across a document start."""
  levels, slots, W, K = 3, 2, 5, 12
  rng = np.random.default_rng(0)
  args = (mem_lib.empty_memory(levels, slots, W), jnp.int32(0),
          jnp.asarray(rng.normal(size=(K, W)), jnp.float32),
          jnp.asarray(rng.uniform(0.01, 5.0, size=K), jnp.float32),
          jnp.asarray(np.arange(K) < 11), jnp.asarray([0] * 8 + [64] * 4),
          jnp.asarray(list(range(8)) + list(range(4))))
  m_KMX, valid_KM, final = jax.jit(mem_lib.write_chunks)(*args)
  f_KRX, fvalid_KR, ffinal = jax.jit(functools.partial(mem_lib.write_chunks, fresh=True))(*args)
  keep = mem_lib.reachable(K, levels, slots)
  assert bool(np.asarray(valid_KM).any(axis=0)[slots:levels * slots].any())  # coarse levels used
  # the snapshots hold the reachable entries only; no other entry is ever valid
  assert f_KRX.shape[1] == len(keep)
  assert not np.delete(np.asarray(valid_KM), keep, axis=1).any()
  np.testing.assert_array_equal(np.asarray(fvalid_KR), np.asarray(valid_KM)[:, keep])
  np.testing.assert_allclose(np.asarray(f_KRX), np.asarray(m_KMX)[:, keep], rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(ffinal)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-6, atol=1e-6)
  assert len(mem_lib.reachable(3, 3, 64)) == 3   # 3 writes into 64 slots: 3 entries
  # 12 writes into 3 levels of 2: every entry but level 2's last slot (it needs 14)
  assert len(keep) == mem_lib.readable_slots(levels, slots) - 1


def test_a_salient_chunk_survives_merging_with_filler():
  """A chunk of high mass keeps its summary through merges with low-mass chunks."""
  L, S, W = 4, 1, 3
  mem = mem_lib.empty_memory(L, S, W)
  key = np.array([1.0, -2.0, 3.0], np.float32)
  mem = mem_lib.write(mem, jnp.asarray(key), jnp.float32(50.0))
  for _ in range(7):   # 7 filler chunks of mass 0.05: the key ends up in level 3 (8 chunks)
    mem = mem_lib.write(mem, jnp.zeros(W), jnp.float32(0.05))
  m_MD, v_M = mem_lib.readable(mem)
  rows = np.asarray(m_MD)[np.asarray(v_M)]
  assert np.abs(rows - key).max(axis=1).min() < 0.01   # an unweighted mean would give key / 8


def test_readable_slots_have_no_level_zero_pending_slot():
  cfg = CFG
  assert cfg.mem_readable_slots == cfg.mem_levels * (cfg.mem_slots + 1) - 1
  mem = M.MMRec(cfg).init_state(1).memory
  assert mem.pend.shape[2] == cfg.mem_levels - 1 and mem.pend_n.shape[2] == cfg.mem_levels - 1
  one = mem_lib.empty_memory(1, 3, 4)   # one level: no pending slot at all
  m, v = mem_lib.readable(mem_lib.write(one, jnp.ones(4), jnp.float32(1.0)))
  assert m.shape == (3, 4) and v.tolist() == [True, False, False]
