"""Correctness promises that the invariant tests in test_model.py did not cover (issue 9):
MoE at its default capacity keeps documents, pieces and batch rows apart and
costs linear time; sampling gives a prompt the same tokens alone or in a batch;
the decays span their configured timescales and keep a gradient; the memory
writes follow their level / pooling rules and read no dead slot."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrec_jax import memory as mem_lib
from mmrec_jax import models
from mmrec_jax import sampling
from mmrec_jax.models import mmrec as M

V = 64
# Every option on, MoE at its default settings (moe_capacity_factor left at 1.25); the
# memory read on its own residual branch (test_model.py covers the gated read).
MOE = M.MMRecConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, chunk_size=4, mem_slots=2,
                    mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True, moe_experts=4,
                    use_uboo=True, mem_residual=True, mem_out_init=1.0)
IMPLS = ("dense", "ragged")


def _tokens(B, T, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 2, V)


@pytest.fixture(scope="module")
def moe():
  """The invariants are properties of the routing, which both implementations share;
  `ragged` is checked equal to `dense` (values and gradients) below, so the slower
  invariant tests run on `dense` only (suite time)."""
  model = M.MMRec(MOE.replace(moe_impl="dense"))
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  apply = jax.jit(lambda p, t, s, r: model.apply({"params": p}, t, state=s, reset=r))
  return model, params, apply


def _close_trees(a, b, atol=2e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- MoE


def test_moe_streaming_pieces_and_token_by_token_equal_one_pass(moe):
  model, params, apply = moe
  T = 40
  toks = _tokens(2, T, seed=2)
  r = jnp.zeros((2, T), bool).at[0, 11].set(True).at[1, 23].set(True)
  full, s_full, _ = apply(params, toks, model.init_state(2), r)
  pieces, s = [], model.init_state(2)
  for a, b in [(0, 3), (3, 19), (19, 40)]:
    lo, s, _ = apply(params, toks[:, a:b], s, r[:, a:b])
    pieces.append(lo)
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=2e-5, rtol=1e-5)
  _close_trees(s, s_full)
  steps, s = [], model.init_state(2)
  for t in range(T):
    lo, s, _ = apply(params, toks[:, t:t + 1], s, r[:, t:t + 1])
    steps.append(lo)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)
  _close_trees(s, s_full)


def test_moe_packed_document_gives_what_it_gives_alone(moe):
  model, params, apply = moe
  toks = _tokens(1, 48, seed=3)
  for start in (5, 29):   # docB after a short and after a long docA
    r = jnp.zeros((1, 48), bool).at[0, start].set(True)
    packed, s_packed, _ = apply(params, toks, model.init_state(1), r)
    alone, s_alone, _ = apply(params, toks[:, start:], model.init_state(1), r[:, start:])
    np.testing.assert_allclose(packed[:, start:], alone, atol=2e-5, rtol=1e-5)
    _close_trees(s_packed, s_alone)


def test_moe_left_padded_batch_row_gives_what_it_gives_alone(moe):
  model, params, apply = moe
  prompts = [np.asarray(_tokens(1, n, seed=10 + n)[0]).tolist() for n in (3, 17, 30)]
  toks_BP, reset_BP = sampling.pack_prompts(prompts, eod_id=0, pad_id=1, multiple=16)
  batch, s_batch, _ = apply(params, toks_BP, model.init_state(3), reset_BP)
  for b, p in enumerate(prompts):
    t1, r1 = sampling.pack_prompts([p], eod_id=0, pad_id=1)
    alone, s_alone, _ = apply(params, t1, model.init_state(1), r1)
    n = len(p) + 1
    np.testing.assert_allclose(batch[b:b + 1, -n:], alone, atol=2e-5, rtol=1e-5)
    _close_trees(jax.tree.map(lambda x: x[:, b:b + 1], s_batch), s_alone)


def test_moe_capacity_factor_is_ignored(moe):
  model, params, apply = moe
  toks = _tokens(2, 24, seed=5)
  ref, _, _ = apply(params, toks, model.init_state(2), None)
  tiny = M.MMRec(model.cfg.replace(moe_capacity_factor=0.05))
  lo, _, _ = jax.jit(lambda p, t: tiny.apply({"params": p}, t, state=tiny.init_state(2)))(
      params, toks)
  np.testing.assert_allclose(lo, ref, atol=1e-6, rtol=1e-6)


def test_moe_dense_and_ragged_agree_in_values_and_gradients():
  toks = _tokens(2, 24, seed=4)
  out = {}
  for impl in IMPLS:
    model = M.MMRec(MOE.replace(moe_impl=impl))
    params = nn.unbox(models.init_params(model, jax.random.key(0)))

    def loss(p, model=model):
      lo, _, aux = model.apply({"params": p}, toks[:, :-1])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), toks[:, 1:, None], -1))
      return ce + 0.01 * aux["moe"], aux["moe"]

    out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (ld, auxd), gd = out["dense"]
  (lr, auxr), gr = out["ragged"]
  np.testing.assert_allclose(ld, lr, rtol=1e-5)
  np.testing.assert_allclose(auxd, auxr, rtol=1e-5)
  assert float(auxd) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gd), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(gd["blocks"]["moe"]["router"]["kernel"]).max()) > 0


def _step_flops_per_token(cfg, T, B=1):
  model = M.MMRec(cfg)
  params = jax.eval_shape(lambda r: nn.unbox(models.init_params(model, r)), jax.random.key(0))
  toks = jax.ShapeDtypeStruct((B, T + 1), jnp.int32)

  def loss(p, t):
    lo, _, aux = model.apply({"params": p}, t[:, :-1])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lo), t[:, 1:, None], -1))
    return ce + sum(w * aux[k] for k, w in model.aux_weights().items())

  cost = jax.jit(jax.grad(loss)).lower(params, toks).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / (B * T)


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_train_step_flops_per_token_do_not_grow_with_length(impl):
  cfg = M.MMRecConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, chunk_size=64,
                      mem_slots=2, mem_levels=2, use_moe=True, moe_experts=4, ffn_mult=4,
                      moe_impl=impl)
  short, long = _step_flops_per_token(cfg, 512), _step_flops_per_token(cfg, 4096)
  assert long < 1.3 * short, (short, long)


def test_moe_flops_per_token_count_the_experts_that_run():
  cfg = MOE.replace(use_dpg=False, use_uboo=False)
  D, F, E = cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.moe_experts
  dense = M.MMRec(cfg.replace(use_moe=False)).flops_per_token()
  moe = M.MMRec(cfg.replace(moe_impl="dense")).flops_per_token()
  per_expert = cfg.n_layers * 2 * 2 * D * F
  np.testing.assert_allclose(moe - dense, (E - 1) * per_expert + cfg.n_layers * 2 * D * E)


# ---------------------------------------------------------------- sampling


def test_sampled_batch_gives_each_prompt_what_it_gives_alone():
  cfg = MOE.replace(n_layers=1)
  model = M.MMRec(cfg)
  variables = {"params": nn.unbox(models.init_params(model, jax.random.key(0)))}
  dec = sampling.Decoder(model, eod_id=0, pad_id=1)
  prompts = [np.asarray(_tokens(1, n, seed=20 + n)[0]).tolist() for n in (2, 9, 21)]
  kw = dict(max_new_tokens=12, temperature=0.8, top_k=20)
  batch = dec.generate(variables, prompts, seed=7, **kw)
  alone = [dec.generate(variables, [p], seed=7, pad_multiple=1, **kw)[0] for p in prompts]
  assert batch == alone
  # Per-prompt seeds: a prompt's tokens depend on its own seed only.
  seeds = [3, 11, 5]
  batch = dec.generate(variables, prompts, seed=seeds, **kw)
  alone = [dec.generate(variables, [p], seed=s, pad_multiple=1, **kw)[0]
           for p, s in zip(prompts, seeds)]
  assert batch == alone
  moved = dec.generate(variables, prompts[::-1], seed=seeds[::-1], **kw)
  assert moved == batch[::-1]
  # Sampling is on: it is not greedy, and another seed gives other tokens.
  greedy = dec.generate(variables, prompts, max_new_tokens=12, temperature=0)
  assert batch != greedy
  assert dec.generate(variables, prompts, seed=8, **kw) != dec.generate(variables, prompts,
                                                                        seed=7, **kw)


def test_sample_logits_uses_each_rows_key():
  logits = jnp.zeros((3, 50))
  keys = jnp.stack([jax.random.key(s) for s in (4, 9, 4)])
  tok = np.asarray(sampling.sample_logits(keys, logits, 1.0, 0, 1.0))
  assert tok[0] == tok[2]
  one = [int(sampling.sample_logits(k[None], logits[:1], 1.0, 0, 1.0)[0]) for k in keys]
  assert tok.tolist() == one


def test_bad_seed_list_is_a_usage_error():
  from mmrec_jax.errors import UsageError
  with pytest.raises(UsageError, match="one per prompt"):
    sampling.row_keys([1, 2], 3)


# ---------------------------------------------------------------- decay


def _decays_at_init(cfg, T=64):
  """Per-channel decay at init, averaged over random inputs, via the block's own
  parameters, sub-module outputs and `log_decay`."""
  block = M.Block(cfg)
  state = jax.tree.map(lambda s: s[0], M.MMRec(cfg).init_state(2))
  x = jax.random.normal(jax.random.key(1), (2, T, cfg.d_model))
  reset = jnp.zeros((2, T), bool)
  params = nn.unbox(block.init(jax.random.key(0), x, state, reset)["params"])
  _, inter = block.apply({"params": params}, x, state, reset, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = inter["intermediates"]
  log_a = M.log_decay(params["lam"], inter["mdi_base"]["__call__"][0],
                      inter["mdi_ctx"]["__call__"][0])
  return np.asarray(jnp.exp(log_a).mean(axis=(0, 1)))


@pytest.mark.parametrize("lo,hi", [(0.9, 0.999), (0.5, 0.9999)])
def test_decays_at_init_span_the_configured_range(lo, hi):
  cfg = M.MMRecConfig(vocab_size=V, d_model=128, n_layers=1, n_heads=4, decay_min=lo,
                      decay_max=hi)
  a = _decays_at_init(cfg)
  assert abs(a.min() - lo) < 0.1 * (1 - lo), a.min()     # timescales within 10%
  assert abs(a.max() - hi) < 0.1 * (1 - hi), a.max()
  # Timescales 1 / (1 - a) spread geometrically: the median is their geometric mean.
  tau = 1 / (1 - a)
  want = np.sqrt(1 / ((1 - lo) * (1 - hi)))
  assert 0.8 * want < np.median(tau) < 1.25 * want


def test_decay_keeps_a_gradient_at_extreme_inputs_and_stays_in_open_interval():
  x = jnp.array([-1e4, -50.0, -16.0, -1.0, 0.0, 1.0, 16.0, 50.0, 1e4])
  lam = jnp.zeros_like(x)
  for base in (x, -x, jnp.zeros_like(x)):
    for ctx in (x, -x, jnp.zeros_like(x)):
      la = M.log_decay(lam, base[None, None], ctx[None, None])
      a = jnp.exp(la)
      assert bool(((a > 0) & (a < 1)).all())
      assert bool(jnp.isfinite(-jnp.expm1(la)).all())
      f = lambda l, b, c: jnp.sum(M.log_decay(l, b[None, None], c[None, None]))
      g_lam, g_base, g_ctx = jax.grad(f, argnums=(0, 1, 2))(lam, base, ctx)
      for g in (g_lam, g_base, g_ctx):
        assert bool((g > 0).all()), (base, ctx, g)


# ---------------------------------------------------------------- memory


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
  cfg = MOE
  assert cfg.mem_readable_slots == cfg.mem_levels * (cfg.mem_slots + 1) - 1
  mem = M.MMRec(cfg).init_state(1).memory
  assert mem.pend.shape[2] == cfg.mem_levels - 1 and mem.pend_n.shape[2] == cfg.mem_levels - 1
  one = mem_lib.empty_memory(1, 3, 4)   # one level: no pending slot at all
  m, v = mem_lib.readable(mem_lib.write(one, jnp.ones(4), jnp.float32(1.0)))
  assert m.shape == (3, 4) and v.tolist() == [True, False, False]
