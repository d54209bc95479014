"""HDS: the bounded, hierarchical long-term memory of one layer (pure functions).

The sequence is cut into chunks of C tokens, aligned to the document start (a
reset starts a new chunk and empties the memory). When a chunk ends, its
summary is written into the memory (the layer stores the summary's attention
key and value, concatenated: both are linear in it, so the pooling below gives
the key and value of pooled summaries):

- level 0 keeps the last S summaries at full resolution;
- a summary evicted from level l-1 waits in level l's pending slot until a
  second one arrives; their mean, weighted by their masses, is pushed into
  level l, whose slots therefore hold pooled summaries of 2**l chunks;
- the last level drops what it evicts.

A chunk's mass is the sum of its tokens' pooling weights, and a pooled slot's
mass the sum of its parts' masses: a slot of level l is the pooling-weighted
mean over all the tokens of its 2**l chunks, as if they were one chunk. So a
chunk the model marked as salient (high pooling weights) keeps its summary
when it is merged with chunks it marked as filler, however coarse the level:
an unweighted mean would dilute it 2**l times.

So L levels of S slots cover S * (2**L - 1) chunks with L * (S + 1) - 1
readable slots (the pending slots of levels >= 1 are readable too; level 0 has
no pending slot: a summary enters it directly). A token reads only memory written by
chunks before its own (block-causal).

Training computes every chunk's summary in parallel, then every snapshot of the
memory in closed form (`write_chunks`: which chunks an entry pools depends only
on how many were written, so each entry is a masked sum over the chunks; long
windows in groups of 32 writes, `write_groups`), and lets each token attend to
the snapshot it may see. Decoding one token at a time applies `write` when a
chunk ends and `read` (the same attention over the readable slots), so both give
the same numbers up to rounding.

Everything here is for ONE sequence; the layer vmaps it over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Memory:
  """The slots of one sequence (leading batch / layer axes may be added by callers)."""
  slots: jax.Array    # [levels, slots, width] float32: key and value of each summary
  valid: jax.Array    # [levels, slots] bool
  mass: jax.Array     # [levels, slots] float32: pooling mass of each slot
  pend: jax.Array     # [levels - 1, width] float32: level l+1's evicted item waiting for a partner
  pend_mass: jax.Array  # [levels - 1] float32: its mass
  pend_n: jax.Array   # [levels - 1] int32: 0 or 1 items waiting


def readable_slots(levels, slots):
  """How many slots `readable` returns: all slots, and the pending ones of levels >= 1."""
  return levels * slots + levels - 1


def empty_memory(levels, slots, width):
  """The memory of one sequence at a document start (`width` per slot: key and value)."""
  return Memory(slots=jnp.zeros((levels, slots, width), jnp.float32),
                valid=jnp.zeros((levels, slots), bool),
                mass=jnp.zeros((levels, slots), jnp.float32),
                pend=jnp.zeros((levels - 1, width), jnp.float32),
                pend_mass=jnp.zeros((levels - 1,), jnp.float32),
                pend_n=jnp.zeros((levels - 1,), jnp.int32))


MIN_MASS = 1e-6


def write(mem, s_D, m):
  """Writes one chunk's key+value vector `s_D` of mass `m` (> 0); cascades
  evictions into coarser levels, merging pairs by their mass-weighted mean."""
  slots, valid, mass = mem.slots, mem.valid, mem.mass
  levels = slots.shape[0]
  new_slots, new_valid, new_mass, new_pend, new_pend_mass, new_pend_n = [], [], [], [], [], []
  x_D, x_m, has = s_D, jnp.maximum(m, MIN_MASS), jnp.array(True)
  for l in range(levels):
    if l > 0:  # the item evicted from level l-1 waits for a partner (stored as mass * value)
      p_D = mem.pend[l - 1] + jnp.where(has, x_m * x_D, 0.0)
      p_m = mem.pend_mass[l - 1] + jnp.where(has, x_m, 0.0)
      n = mem.pend_n[l - 1] + has.astype(jnp.int32)
      full = n == 2
      x_D, x_m, has = p_D / jnp.maximum(p_m, MIN_MASS), p_m, full
      new_pend.append(jnp.where(full, 0.0, p_D))
      new_pend_mass.append(jnp.where(full, 0.0, p_m))
      new_pend_n.append(jnp.where(full, 0, n))
    evicted_D, evicted_m, evicted_valid = slots[l, -1], mass[l, -1], valid[l, -1]
    pushed_SD = jnp.concatenate([x_D[None], slots[l, :-1]], axis=0)
    pushed_m = jnp.concatenate([x_m[None], mass[l, :-1]], axis=0)
    pushed_S = jnp.concatenate([jnp.ones((1,), bool), valid[l, :-1]], axis=0)
    new_slots.append(jnp.where(has, pushed_SD, slots[l]))
    new_mass.append(jnp.where(has, pushed_m, mass[l]))
    new_valid.append(jnp.where(has, pushed_S, valid[l]))
    x_D, x_m, has = evicted_D, evicted_m, has & evicted_valid
  stack = lambda xs, like: jnp.stack(xs) if xs else jnp.zeros_like(like)
  return Memory(slots=jnp.stack(new_slots), valid=jnp.stack(new_valid),
                mass=jnp.stack(new_mass), pend=stack(new_pend, mem.pend),
                pend_mass=stack(new_pend_mass, mem.pend_mass),
                pend_n=stack(new_pend_n, mem.pend_n))


def readable(mem):
  """The readable slots [M, D] and their mask [M], M = readable_slots(levels, slots)."""
  levels, slots, width = mem.slots.shape
  pend_D = mem.pend / jnp.maximum(mem.pend_mass, MIN_MASS)[:, None]
  m_MD = jnp.concatenate([mem.slots.reshape(levels * slots, width), pend_D], axis=0)
  v_M = jnp.concatenate([mem.valid.reshape(-1), mem.pend_n > 0], axis=0)
  return m_MD, v_M


def chunk_events(pos_T, last_reset_T, chunk):
  """Where chunks end, and for every token which memory snapshot it reads.

  Returns:
    end_K: token index of each of the first K chunk ends (K = T // C + 1 bound).
    end_valid_K: which of those are real.
    k_T: how many chunk ends come strictly before each token.
    cleared_T: the token's document started after the last chunk end before it.
    end_T: whether each token ends a chunk.
  """
  T = pos_T.shape[0]
  t_T = jnp.arange(T)
  end_T = pos_T % chunk == chunk - 1
  K = T // chunk + 1
  (end_K,) = jnp.nonzero(end_T, size=K, fill_value=T - 1)
  n_end = jnp.sum(end_T)
  end_valid_K = jnp.arange(K) < n_end
  k_T = jnp.cumsum(end_T) - end_T
  last_end_T = jax.lax.cummax(jnp.where(end_T, t_T, -1))
  last_end_before_T = jnp.concatenate([jnp.array([-1]), last_end_T[:-1]])
  cleared_T = last_reset_T > last_end_before_T
  return end_K, end_valid_K, k_T, cleared_T, end_T


def entry_blocks(n, levels, slots, xp=jnp):
  """Which chunks each readable entry holds after `n` writes into an empty memory.

  The structure is a function of the count alone: level 0 holds the last S
  chunks; the items evicted from level l-1 pair up in order, so level l's item
  i is the (mass-weighted) pool of chunks [i 2**l, (i+1) 2**l). With E_l items
  ever entered into level l (E_0 = n) and V_l = max(E_l - S, 0) evicted from it,
  E_{l+1} = V_l // 2, level l's slot s holds item E_l - 1 - s (if >= 0), and
  level l's pending slot holds level l-1's last evicted item when V_{l-1} is odd.
  `n`: int array of any shape; returns (lo, hi, valid), each [..., M] in the
  order of `readable` (all slots level by level, then the pending slots of
  levels 1..L-1): entry m pools chunks [lo, hi) when valid. `xp`: jnp, or np
  for a count known when tracing.
  """
  n = xp.asarray(n, xp.int32)[..., None]
  s_S = xp.arange(slots, dtype=xp.int32)
  los, his, oks, plos, phis, poks = [], [], [], [], [], []
  entered = n
  for l in range(levels):
    i = entered - 1 - s_S
    los.append(i << l)
    his.append((i + 1) << l)
    oks.append(i >= 0)
    evicted = xp.maximum(entered - slots, 0)
    if l + 1 < levels:   # level l+1's pending slot: level l's last evicted item, if unpaired
      plos.append((evicted - 1) << l)
      phis.append(evicted << l)
      poks.append(evicted % 2 == 1)
    entered = evicted // 2
  cat = lambda xs: xp.concatenate(xs, axis=-1)
  return cat(los + plos), cat(his + phis), cat(oks + poks)


def reachable(k, levels, slots):
  """Indices (numpy, in `readable`'s order) of the entries that up to `k` writes
  into an empty memory can fill: the level-0 slots up to k, and the coarser
  entries only once level 0 has evicted."""
  _, _, ok = entry_blocks(np.arange(k + 1), levels, slots, xp=np)
  return np.flatnonzero(ok.any(axis=0))


def _after_writes(k, valid_K, chunk_K, doc_K, n0, doc0):
  """(write count, document) of the memory after the first `k` writes (the
  valid ones come first): those of the last valid write, else (n0, doc0)."""
  last = jnp.minimum(k, jnp.sum(valid_K)) - 1
  at = jnp.maximum(last, 0)
  return (jnp.where(last >= 0, chunk_K[at] + 1, n0),
          jnp.where(last >= 0, doc_K[at], doc0))


def write_chunks(mem0, n0, kv_KX, mass_K, valid_K, doc_K, chunk_K, doc0=-1, fresh=False):
  """The memory after each of K chunk writes, in closed form (no loop over writes).

  `mem0` holds the memory of document `doc0` (-1: the carried one) after `n0`
  writes (its position // C); write k stores chunk `chunk_K[k]` (its index in
  its document) of document `doc_K[k]` (a new document starts from an empty
  memory), its key+value `kv_KX[k]` and mass `mass_K[k]`, if `valid_K[k]` (the
  valid writes come first). Every entry of every snapshot is the mass-weighted
  mean of the chunks `entry_blocks` gives it, summed from the sources that hold
  them: the entries of `mem0` (each a whole block of document `doc0`) and the
  new chunks, as one matmul. The same numbers as `write` applied in order, up
  to rounding. The cost grows with K^2: `write_groups` bounds it.
  Returns the readable entries [K+1, M, X] and their mask [K+1, M] of every
  snapshot (snapshot 0 is `mem0`; snapshot k follows write k, or the last valid
  write), and the memory after the last valid write.

  `fresh` (a Python bool): `mem0` is known to be empty at write count 0 (a call
  without a carried state). Its entries are then not summed, and the snapshots
  hold only the R <= M entries that K writes can fill (`reachable`): training
  windows of a few chunks cost the same whatever the memory's size. The final
  memory keeps the full layout.
  """
  levels, slots, width = mem0.slots.shape
  K = kv_KX.shape[0]
  # Sources: the new chunks, and (unless `fresh`) mem0's entries (mass * value, mass).
  mass_K = jnp.maximum(mass_K, MIN_MASS)
  src_lo, src_hi, src_ok = chunk_K, chunk_K + 1, valid_K
  src_doc, src_mv, src_m = doc_K, mass_K[:, None] * kv_KX, mass_K
  if not fresh:
    lo0, hi0, ok0 = entry_blocks(n0, levels, slots)
    alive0 = ok0 & jnp.concatenate([mem0.valid.reshape(-1), mem0.pend_n > 0])
    mv0 = jnp.concatenate([(mem0.slots * mem0.mass[..., None]).reshape(-1, width), mem0.pend])
    m0 = jnp.concatenate([mem0.mass.reshape(-1), mem0.pend_mass])
    src_lo, src_hi = jnp.concatenate([lo0, src_lo]), jnp.concatenate([hi0, src_hi])
    src_ok = jnp.concatenate([alive0, src_ok])
    src_doc = jnp.concatenate([jnp.full(lo0.shape, doc0, doc_K.dtype), src_doc])
    src_mv, src_m = jnp.concatenate([mv0, src_mv]), jnp.concatenate([m0, src_m])
  # Snapshots: 0 is mem0; k >= 1 follows the last valid write up to k.
  n_K1, doc_K1 = _after_writes(jnp.arange(K + 1), valid_K, chunk_K, doc_K, n0, doc0)
  lo, hi, ok = entry_blocks(n_K1, levels, slots)                        # [K+1, M]
  if fresh:  # only the entries K writes can fill, of an empty memory (R of M)
    keep = reachable(K, levels, slots)
    lo, hi, ok = lo[:, keep], hi[:, keep], ok[:, keep]
  member = (ok[..., None] & src_ok & (src_doc == doc_K1[:, None, None])
            & (lo[..., None] <= src_lo) & (src_hi <= hi[..., None])).astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  mv_KMX = jnp.einsum("kms,sx->kmx", member, src_mv, precision=hp)
  m_KM = jnp.einsum("kms,s->km", member, src_m, precision=hp)
  valid_KM = ok & (m_KM > 0)
  m_KMX = mv_KMX / jnp.maximum(m_KM, MIN_MASS)[..., None]
  # The memory after the last write, in the layout `write` keeps.
  n_slots = levels * slots
  mv_MX, m_M, valid_M = mv_KMX[-1], m_KM[-1], valid_KM[-1]
  if fresh:   # the entries no write reached stay empty
    full = lambda x, like: jnp.zeros((readable_slots(levels, slots),) + like.shape[1:],
                                     like.dtype).at[keep].set(x)
    mv_MX, m_M, valid_M = full(mv_MX, mv_MX), full(m_M, m_M), full(valid_M, valid_M)
  m_MX = mv_MX / jnp.maximum(m_M, MIN_MASS)[:, None]
  final = Memory(
      slots=m_MX[:n_slots].reshape(levels, slots, width),
      valid=valid_M[:n_slots].reshape(levels, slots),
      mass=m_M[:n_slots].reshape(levels, slots),
      pend=mv_MX[n_slots:], pend_mass=m_M[n_slots:],
      pend_n=valid_M[n_slots:].astype(jnp.int32))
  return m_KMX, valid_KM, final


WRITE_GROUP = 32     # writes per closed-form step of `write_groups`
PICK_BY_MATMUL = 33  # `attend` picks each window's snapshots by matmul up to this many


def write_groups(mem0, n0, kv_KX, mass_K, valid_K, doc_K, chunk_K, group=WRITE_GROUP,
                 fresh=False):
  """`write_chunks` for any number of writes: a scan over groups of `group`
  writes, each in closed form from the memory the previous group left. The
  closed form's cost grows with (writes)^2 (every snapshot against every
  source); in groups it is linear, and a window of up to `group` writes (2,048
  tokens in chunks of 64) takes one step, no loop. Same returns as
  `write_chunks` (`fresh` saves work when the writes fit one group)."""
  K = kv_KX.shape[0]
  if K <= group:
    return write_chunks(mem0, n0, kv_KX, mass_K, valid_K, doc_K, chunk_K, fresh=fresh)
  pad = (-K) % group
  padded = lambda x, v: jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], v, x.dtype)])
  xs = (padded(kv_KX, 0), padded(mass_K, 1), padded(valid_K, False), padded(doc_K, -1),
        padded(chunk_K, 0))
  xs = jax.tree_util.tree_map(lambda x: x.reshape((-1, group) + x.shape[1:]), xs)

  def step(carry, g):
    mem, n, doc = carry
    kv, mass, valid, docs, chunks = g
    m_KMX, valid_KM, final = write_chunks(mem, n, kv, mass, valid, docs, chunks, doc)
    n, doc = _after_writes(group, valid, chunks, docs, n, doc)
    return (final, n, doc), (m_KMX[1:], valid_KM[1:])

  doc0 = jnp.array(-1, doc_K.dtype)
  (final, _, _), (m_GKMX, valid_GKM) = jax.lax.scan(step, (mem0, jnp.asarray(n0, jnp.int32),
                                                           doc0), xs)
  first_m, first_v = readable(mem0)
  m_KMX = jnp.concatenate([first_m[None], m_GKMX.reshape((-1,) + m_GKMX.shape[2:])])[:K + 1]
  valid_KM = jnp.concatenate([first_v[None], valid_GKM.reshape((-1,) + valid_GKM.shape[2:])])
  return m_KMX, valid_KM[:K + 1], final


def _masked_softmax(logits, mask, axes, logn=False, sink=None):
  """(weights, sink weight): softmax over `axes` of the entries `mask` keeps; all
  zeros where it keeps none. With `logn`, the logits are first multiplied by
  log(n), n the number of entries kept (scalable softmax): the weight a fixed
  logit margin gives the best entry then does not fall as more entries compete,
  so a read trained on a few slots still finds its slot among many. `sink`
  (broadcastable to the logits reduced over `axes`, dims kept): the logit of
  one more entry, always there; its weight is returned beside the others' (None
  without a sink), and it takes all the weight when `mask` keeps nothing."""
  if logn:
    n = jnp.sum(mask, axis=axes, keepdims=True).astype(jnp.float32)
    factor = jnp.log(jnp.maximum(n, 1.0))
    logits = logits * factor
    sink = None if sink is None else sink * factor
  logits = jnp.where(mask, logits, -1e30)
  mx = jnp.max(logits, axis=axes, keepdims=True)
  if sink is not None:
    mx = jnp.maximum(mx, sink)
  p = jnp.where(mask, jnp.exp(logits - mx), 0.0)
  denom = jnp.sum(p, axis=axes, keepdims=True)
  if sink is None:
    return p / jnp.maximum(denom, 1e-30), None
  p_sink = jnp.exp(sink - mx)
  denom = denom + p_sink
  return p / denom, p_sink / denom


def _unit(x_Hd):
  """x scaled to unit root mean square over its last axis (computed in float32)."""
  x = x_Hd.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)).astype(x_Hd.dtype)


def _normalise(q_Hd, keys_Hd, scale_H):
  """With `scale_H` (per-head read temperature), queries and keys at unit RMS and
  the query times its head's scale: the logits are scale * cos(q, k) * sqrt(hd),
  whatever the size of the pooled keys; without it, both unchanged."""
  if scale_H is None:
    return q_Hd, keys_Hd
  return _unit(q_Hd) * scale_H.astype(q_Hd.dtype)[:, None], _unit(keys_Hd)


def read(mem, q_Hd, cleared, scale_H=None, logn=False, sink=None):
  """One token's read (decoding): multi-head attention over the readable slots of
  `mem`, the memory before the token; nothing if `cleared` (its document starts
  here). `scale_H`: see `_normalise`; `logn`: see `_masked_softmax`. `sink`:
  None, or (logit [H], value [H, hd]) of a null slot every read also sees (an
  attention sink with a learned value): an empty memory then reads its value.
  Returns [H, hd] float32; without a sink, zeros from an empty memory."""
  H, hd = q_Hd.shape
  m_MX, valid_M = readable(mem)
  keys_MHd = m_MX[:, :H * hd].astype(q_Hd.dtype).reshape(-1, H, hd)
  vals_MHd = m_MX[:, H * hd:].astype(q_Hd.dtype).reshape(-1, H, hd)
  q_Hd, keys_MHd = _normalise(q_Hd, keys_MHd, scale_H)
  logits_HM = jnp.einsum("hd,mhd->hm", q_Hd, keys_MHd,
                         preferred_element_type=jnp.float32) / jnp.sqrt(hd).astype(jnp.float32)
  p_HM, ps_H1 = _masked_softmax(logits_HM, (valid_M & ~cleared)[None, :], -1, logn,
                                None if sink is None else sink[0][:, None])
  out_Hd = jnp.einsum("hm,mhd->hd", p_HM.astype(vals_MHd.dtype), vals_MHd,
                      preferred_element_type=jnp.float32)
  return out_Hd if sink is None else out_Hd + ps_H1 * sink[1]


def attend(q_THd, keys_KMHd, values_KMHd, valid_KM, k_T, cleared_T, window, scale_H=None,
           logn=False, sink=None):
  """Each token attends to the memory snapshot it may see (multi-head).

  Tokens are taken in windows of at most C consecutive positions; a window
  holds at most one chunk end, so its tokens see one of two snapshots: the
  window's 2M slots are attended as one batched matmul per (window, head),
  each token's other snapshot masked out. `scale_H`: see `_normalise`; `logn`,
  `sink`: see `read`. Returns [T, H, hd] float32; without a sink, an empty
  memory reads as zeros.
  """
  T, H, hd = q_THd.shape
  q_THd, keys_KMHd = _normalise(q_THd, keys_KMHd, scale_H)
  K1, M = keys_KMHd.shape[:2]
  pad = (-T) % window
  if pad:
    q_THd = jnp.concatenate([q_THd, jnp.zeros((pad, H, hd), q_THd.dtype)])
    k_T = jnp.concatenate([k_T, jnp.broadcast_to(k_T[-1], (pad,))])
    cleared_T = jnp.concatenate([cleared_T, jnp.ones((pad,), bool)])
  n = (T + pad) // window
  q_NHWd = jnp.swapaxes(q_THd.reshape(n, window, H, hd), 1, 2)
  k_NW = k_T.reshape(n, window)
  lo_N = k_NW[:, 0]
  idx_N2 = jnp.minimum(lo_N[:, None] + jnp.arange(2)[None], K1 - 1)
  # The two snapshots of each window. Up to PICK_BY_MATMUL snapshots, by a one-hot
  # matmul, exact at the highest precision (on CPU a gather of whole snapshots,
  # and its scatter-add gradient, cost several times more); beyond, by a gather
  # (the matmul's cost grows with the square of the windows).
  if K1 <= PICK_BY_MATMUL:
    pick_PK = (idx_N2.reshape(-1)[:, None] == jnp.arange(K1)[None]).astype(keys_KMHd.dtype)
    pick = lambda x_KMHd: jnp.dot(pick_PK, x_KMHd.reshape(K1, -1),
                                  precision=jax.lax.Precision.HIGHEST)
  else:
    pick = lambda x_KMHd: x_KMHd[idx_N2.reshape(-1)]
  take = lambda x_KMHd: jnp.transpose(pick(x_KMHd).reshape(
      n, 2, M, H, hd), (0, 3, 1, 2, 4)).reshape(n, H, 2 * M, hd)
  kk_NHSd, vv_NHSd = take(keys_KMHd), take(values_KMHd)
  logits_NHWS = jnp.einsum("nhwd,nhsd->nhws", q_NHWd, kk_NHSd,
                           preferred_element_type=jnp.float32) / jnp.sqrt(hd).astype(jnp.float32)
  sel_NW2 = (k_NW - lo_N[:, None])[..., None] == jnp.arange(2)
  mask_NWS = ((sel_NW2[..., None] & valid_KM[idx_N2][:, None]).reshape(n, window, 2 * M)
              & ~cleared_T.reshape(n, window)[:, :, None])
  p, ps = _masked_softmax(logits_NHWS, mask_NWS[:, None], -1, logn,
                          None if sink is None else sink[0][None, :, None, None])
  out_NHWd = jnp.einsum("nhws,nhsd->nhwd", p.astype(vv_NHSd.dtype), vv_NHSd,
                        preferred_element_type=jnp.float32)
  if sink is not None:
    out_NHWd = out_NHWd + ps * sink[1][None, :, None, :]
  return jnp.swapaxes(out_NHWd, 1, 2).reshape(n * window, H, hd)[:T]
