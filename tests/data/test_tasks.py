"""The synthetic recall tasks (`mmrec_jax.data.tasks`): numpy only, fast."""
import numpy as np
import pytest

from mmrec_jax.data import tasks as rt

V = rt.Vocab()


def _rng(seed=0):
  return np.random.default_rng(seed)


def _check_common(b, B, T, vocab=V):
  assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == b["reset"].shape == (B, T)
  assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
  assert b["mask"].dtype == np.float32 and b["reset"].dtype == np.bool_
  for k in ("answer_pos", "answer", "source_pos", "n_pairs", "length"):
    assert b[k].dtype == np.int32, k
  # next-token targets, one document per row
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert b["reset"][:, 0].all() and not b["reset"][:, 1:].any()
  assert (b["inputs"][:, 0] == vocab.eod).all()
  assert (b["inputs"] >= 0).all() and (b["inputs"] < vocab.size).all()
  assert (b["targets"] >= 0).all() and (b["targets"] < vocab.size).all()
  # the mask is 1 exactly at answer_pos, the answers are values and equal the targets there
  m = np.zeros((B, T), np.float32)
  for r in range(B):
    ps = b["answer_pos"][r][b["answer_pos"][r] >= 0]
    m[r, ps] = 1
    assert (np.diff(ps) > 0).all()
    np.testing.assert_array_equal(b["targets"][r, ps], b["answer"][r, :len(ps)])
    assert (b["answer"][r, len(ps):] == -1).all()
  np.testing.assert_array_equal(b["mask"], m)
  assert V.is_value(b["targets"][b["mask"] == 1]).all()


def _check_mqar_bindings(b):
  """Every answer is the value bound to its query key earlier in the row, and the
  mask is 1 on every query (a key occurrence after the pairs) and nowhere else."""
  B = b["inputs"].shape[0]
  for r in range(B):
    x, y = b["inputs"][r], b["targets"][r]
    seen = {}
    for t in range(b["length"][r]):
      if V.is_key(x[t]):
        if int(x[t]) in seen:    # a query: the target is the bound value
          assert b["mask"][r, t] == 1
          assert y[t] == seen[int(x[t])]
          assert b["inputs"][r, b["source_pos"][r][list(b["answer_pos"][r]).index(t)]] == y[t]
        else:                    # a pair: not scored
          assert b["mask"][r, t] == 0
          assert V.is_value(y[t])
          seen[int(x[t])] = int(y[t])
      else:
        assert b["mask"][r, t] == 0
    assert len(seen) == b["n_pairs"][r]
    assert len(set(seen.values())) == len(seen)    # distinct values


@pytest.mark.parametrize("queries", ["random", "packed"])
@pytest.mark.parametrize("marker", [False, True])
def test_mqar_masks_exactly_the_answers(queries, marker):
  b = rt.mqar(_rng(), 16, seq_len=64, n_pairs=4, queries=queries, marker=marker)
  _check_common(b, 16, 64)
  _check_mqar_bindings(b)
  assert (b["mask"].sum(1) == 4).all()
  assert (b["n_pairs"] == 4).all() and (b["length"] == 64).all()
  if marker:
    assert (b["inputs"][:, 9] == V.query).all()
  if queries == "packed":
    start = 9 + marker
    np.testing.assert_array_equal(b["answer_pos"], start + 2 * np.arange(4)[None].repeat(16, 0))


def test_mqar_query_keys():
  rng = _rng(5)
  d = rt.mqar(rng, 64, seq_len=64, n_pairs=4, query_keys="distinct")
  u = rt.mqar(rng, 64, seq_len=64, n_pairs=4, query_keys="uniform")
  for b in (d, u):
    _check_common(b, 64, 64)
    _check_mqar_bindings(b)
  # distinct: every key asked exactly once; uniform: some rows ask a key twice
  asked = lambda b, r: [int(b["inputs"][r, p]) for p in b["answer_pos"][r]]
  assert all(len(set(asked(d, r))) == 4 for r in range(64))
  assert any(len(set(asked(u, r))) < 4 for r in range(64))
  with pytest.raises(ValueError):
    rt.mqar(rng, 2, seq_len=64, n_pairs=4, query_keys="other")
  assert abs(rt.chance_elimination(4) - (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) < 1e-12


def test_mqar_subset_of_queries_and_errors():
  b = rt.mqar(_rng(), 8, seq_len=32, n_pairs=6, n_queries=3, query_keys="distinct")
  _check_common(b, 8, 32)
  _check_mqar_bindings(b)
  assert (b["mask"].sum(1) == 3).all()
  with pytest.raises(ValueError):
    rt.mqar(_rng(), 2, seq_len=16, n_pairs=8)            # does not fit
  with pytest.raises(ValueError):
    rt.mqar(_rng(), 2, seq_len=64, n_pairs=70)           # more pairs than keys
  with pytest.raises(ValueError):
    rt.mqar(_rng(), 2, seq_len=64, n_pairs=4, n_queries=5, query_keys="distinct")


def test_mqar_random_queries_spread_over_the_sequence():
  b = rt.mqar(_rng(), 256, seq_len=64, n_pairs=4)
  assert b["answer_pos"].min() >= 9                     # after the pairs
  assert b["answer_pos"].max() == 63                    # some reach the end
  assert len(np.unique(b["answer_pos"][:, 0])) > 10     # the first query moves around


def test_mqar_mix_pads_rows_to_the_longest():
  mix = ((64, 4), (128, 8), (256, 16))
  b = rt.mqar_mix(_rng(), 48, mix=mix)
  _check_common(b, 48, 256)
  _check_mqar_bindings(b)
  seen = set()
  for r in range(48):
    t, n = int(b["length"][r]), int(b["n_pairs"][r])
    assert (t, n) in mix
    seen.add((t, n))
    assert b["mask"][r].sum() == n
    assert (b["inputs"][r, t + 1:] == V.pad).all() and (b["mask"][r, t:] == 0).all()
  assert seen == set(mix)


def _chunk(p, c):
  return p // c


@pytest.mark.parametrize("seq_len,n_pairs,chunk", [(256, 4, 16), (1024, 8, 16), (4096, 16, 64),
                                                   (96, 2, 16)])
@pytest.mark.parametrize("query_keys", ["uniform", "distinct"])
def test_spread_mqar_one_pair_per_chunk_queries_two_chunks_after(seq_len, n_pairs, chunk,
                                                                 query_keys):
  b = rt.spread_mqar(_rng(1), 16, seq_len=seq_len, n_pairs=n_pairs, chunk=chunk,
                     query_keys=query_keys)
  _check_common(b, 16, seq_len)
  _check_mqar_bindings(b)
  for r in range(16):
    x = b["inputs"][r]
    key_pos = np.nonzero(V.is_key(x))[0]
    # first occurrence of each key: the pairs
    first = {}
    for p in key_pos:
      first.setdefault(int(x[p]), int(p))
    pairs = sorted(first.values())
    assert len(pairs) == n_pairs
    pair_chunks = [_chunk(p, chunk) for p in pairs]
    assert len(set(pair_chunks)) == n_pairs                           # at most one per chunk
    assert all(_chunk(p + 1, chunk) == _chunk(p, chunk) for p in pairs)  # a pair in one chunk
    for q, src in zip(b["answer_pos"][r], b["source_pos"][r]):
      if q < 0:
        continue
      pair_key = first[int(x[q])]
      assert src == pair_key + 1
      assert _chunk(q, chunk) >= _chunk(pair_key + 1, chunk) + 2       # two chunks after
    # no chunk before the queries holds more than one pair's tokens
    tok = V.is_key(x) | V.is_value(x)
    q0 = b["answer_pos"][r][0]
    for c in range(_chunk(q0, chunk)):
      assert tok[c * chunk:(c + 1) * chunk].sum() in (0, 2)


def test_spread_mqar_rejects_what_does_not_fit():
  with pytest.raises(ValueError):
    rt.spread_mqar(_rng(), 2, seq_len=100, n_pairs=2, chunk=16)       # not a multiple
  with pytest.raises(ValueError):
    rt.spread_mqar(_rng(), 2, seq_len=128, n_pairs=4, chunk=16)       # 8 chunks: 3 for pairs


@pytest.mark.parametrize("distance", [None, 10])
def test_passkey(distance):
  b = rt.passkey(_rng(), 8, seq_len=64, key_len=5, distance=distance)
  _check_common(b, 8, 64)
  for r in range(8):
    x, y = b["inputs"][r], b["targets"][r]
    key = x[1:6]
    assert V.is_value(key).all()
    qp = int(np.nonzero(x == V.query)[0][0])
    assert qp == 6 + (64 - 11 if distance is None else distance)
    np.testing.assert_array_equal(b["answer_pos"][r], qp + np.arange(5))
    np.testing.assert_array_equal(y[qp:qp + 5], key)
    np.testing.assert_array_equal(b["source_pos"][r], 1 + np.arange(5))
    assert b["mask"][r].sum() == 5
    f = x[6:qp]
    assert ((f >= V.first_filler) & (f < V.first_key)).all()
  if distance is not None:
    assert (b["inputs"][:, 6 + 10 + 1 + 5:] == V.pad).all()


def test_bindings_are_fresh():
  rng = _rng(3)
  a = rt.mqar(rng, 64, seq_len=64, n_pairs=4)
  b = rt.mqar(rng, 64, seq_len=64, n_pairs=4)
  assert not np.array_equal(a["inputs"], b["inputs"])
  assert len({tuple(r) for r in a["inputs"]}) == 64                  # rows differ
  # the same key is bound to different values across rows
  values_of = {}
  for r in range(64):
    x = a["inputs"][r]
    for i in range(4):
      values_of.setdefault(int(x[1 + 2 * i]), set()).add(int(x[2 + 2 * i]))
  assert max(len(s) for s in values_of.values()) > 1
  assert np.mean([len(s) > 1 for s in values_of.values() if len(s) > 0]) > 0.3
  p1, p2 = rt.passkey(rng, 4, 32), rt.passkey(rng, 4, 32)
  assert not np.array_equal(p1["inputs"], p2["inputs"])


@pytest.mark.parametrize("fn,kw", [(rt.mqar, dict(seq_len=64, n_pairs=4)),
                                   (rt.mqar_mix, {}),
                                   (rt.spread_mqar, dict(seq_len=256, n_pairs=4, chunk=16)),
                                   (rt.passkey, dict(seq_len=64))])
def test_deterministic_for_a_seed(fn, kw):
  a, b = fn(_rng(7), 8, **kw), fn(_rng(7), 8, **kw)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = fn(_rng(8), 8, **kw)
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_vocab_layout_and_chance():
  v = rt.Vocab(n_keys=255, n_values=255, n_filler=1)
  assert (v.eod, v.pad, v.query) == (0, 1, 2)
  assert v.first_key == 4 and v.first_value == 259 and v.size == 514
  assert rt.Vocab().size == 135
  assert rt.chance(v) == 1 / 255 and rt.chance_pairs(4) == 0.25
  b = rt.mqar(_rng(), 4, seq_len=64, n_pairs=4, vocab=v)
  assert (b["inputs"] < v.size).all()
  assert v.is_value(b["answer"]).all()
  with pytest.raises(ValueError):
    rt.Vocab(n_keys=0)


def test_score():
  b = rt.mqar_mix(_rng(), 12, mix=((64, 4), (128, 8)))
  perfect = rt.score(b["targets"], b)
  assert perfect["acc"] == 1.0 and perfect["exact"] == 1.0
  assert perfect["n"] == int(b["mask"].sum())
  assert set(perfect["acc_by_pairs"]) <= {4, 8}
  wrong = b["targets"].copy()
  r = 0
  wrong[r, b["answer_pos"][r, 0]] = V.pad
  s = rt.score(wrong, b)
  assert s["acc"] == 1 - 1 / perfect["n"] and s["exact"] == 1 - 1 / 12
  # predictions outside the answers do not count
  noise = np.where(b["mask"] == 1, b["targets"], 0)
  assert rt.score(noise, b)["acc"] == 1.0
