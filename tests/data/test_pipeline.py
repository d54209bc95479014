"""Packing and iterators (`data/pipeline.py`): documents packed into windows with
resets, padded validation batches with bytes, exact resume, a new order each epoch,
rows shared out among processes, carried-state streams, one-line errors."""
import json

import numpy as np
import pytest

from mmrec_jax.data import pipeline as data
from mmrec_jax.data import sources
from tests.data.helpers import SEQ, cfg, docs, write_txt


def test_packing_and_reset(tmp_path, tok):
  documents = docs()
  c = cfg(write_txt(tmp_path / "a.txt", documents), val_fraction=0.0)
  ds = data.build(c, tok)
  toks = np.asarray(ds.train_tokens)
  assert toks[0] == ds.eod_id and (toks == ds.eod_id).sum() == len(documents)
  assert not (toks == ds.pad_id).any()
  expected = np.concatenate([[0] + tok.encode(d).ids for d in documents])
  np.testing.assert_array_equal(toks, expected)
  batch = next(ds.train_iter())
  assert batch["inputs"].shape == (4, SEQ) and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["reset"], batch["inputs"] == ds.eod_id)
  assert batch["mask"].dtype == np.float32 and batch["mask"].all()
  windows = [data.Windows(toks, SEQ)[i] for i in range(ds.num_train_windows)]
  rows = {tuple(w) for w in windows}
  for row_in, row_t in zip(batch["inputs"], batch["targets"]):
    assert tuple(np.r_[row_in, row_t[-1:]]) in rows
  # stride T: every token after the first is a target exactly once
  np.testing.assert_array_equal(np.concatenate([w[1:] for w in windows]),
                                toks[1:1 + SEQ * len(windows)])


def test_val_batches_padded_with_bytes(tmp_path, tok):
  path = write_txt(tmp_path / "a.txt", docs())
  c = cfg(path, val_fraction=0.3)
  ds = data.build(c, tok)
  val = ds.val_batches()
  again = ds.val_batches()
  assert val and all(np.array_equal(a[k], b[k]) for a, b in zip(val, again) for k in a)
  n_val = len(ds.val_tokens)
  mask = np.concatenate([b["mask"].ravel() for b in val])
  assert mask.sum() == n_val - 1 and mask[-1] == 0
  last = val[-1]
  assert (last["targets"][last["mask"] == 0] == ds.pad_id).all()
  val_text = [t for _, t in sources.split_documents(c.data, "val")]
  total_bytes = sum(int(b["bytes"].sum()) for b in val)
  assert total_bytes == sum(len(t.encode()) for t in val_text)
  assert len(ds.val_batches(max_batches=1)) == 1
  ev = data.encode_eval_file(path, tok, SEQ, batch_size=4)
  assert sum(int(b["bytes"].sum()) for b in ev) == sum(len(d.encode()) for d in docs())


def test_iterator_resume_exact(tmp_path, tok):
  c = cfg(write_txt(tmp_path / "a.txt", docs()))
  ds = data.build(c, tok)
  it = ds.train_iter()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(5)]
  it2 = data.build(c, tok).train_iter()
  it2.set_state(state)
  got = [next(it2) for _ in range(5)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(want[0]["inputs"], want[1]["inputs"])


def test_new_order_each_epoch_and_seed(tmp_path, tok):
  c = cfg(write_txt(tmp_path / "a.txt", docs()), val_fraction=0.0)
  ds = data.build(c, tok)
  n = ds.num_train_windows
  c = c.override({"train.batch_size": 1})
  ds1 = data.build(c, tok)
  it = ds1.train_iter()
  rows = [tuple(next(it)["inputs"][0]) for _ in range(2 * n)]
  assert sorted(rows[:n]) == sorted(rows[n:]) and rows[:n] != rows[n:]
  c = c.override({"train.seed": 1})
  it_b = data.build(c, tok).train_iter()
  assert [tuple(next(it_b)["inputs"][0]) for _ in range(n)] != rows[:n]


def test_process_sharding(tmp_path, tok):
  c = cfg(write_txt(tmp_path / "a.txt", docs()))
  single = data.build(c, tok)
  shards = [data.build(c, tok, process_index=p, process_count=2) for p in range(2)]
  assert shards[0].batch_size == 2
  its = [s.train_iter() for s in shards]
  it = single.train_iter()
  for _ in range(3):
    b = next(it)["inputs"]
    parts = np.concatenate([next(i)["inputs"] for i in its])
    assert sorted(map(tuple, b)) == sorted(map(tuple, parts))
  v = single.val_batches()[0]["inputs"]
  v_parts = np.concatenate([s.val_batches()[0]["inputs"] for s in shards])
  np.testing.assert_array_equal(v, v_parts)


def test_streams_give_each_row_consecutive_windows_and_resume_exactly():
  T, B = 4, 2
  ds = data.Datasets(train_tokens=np.arange(1, 4 * 10 + 2), val_tokens=None, seq_len=T,
                         batch_size=B, seed=0, eod_id=-1, pad_id=0,
                         bytes_per_token=np.ones(64, np.int32), carry_state=True)
  n = ds.num_train_windows // B   # 10 windows: 2 streams of 5
  it = ds.train_iter()
  batches = [next(it) for _ in range(2 * n + 1)]
  for g, b in enumerate(batches):
    for j in range(B):
      w = j * n + g % n
      np.testing.assert_array_equal(b["inputs"][j], np.arange(w * T + 1, w * T + T + 1))
      np.testing.assert_array_equal(b["targets"][j], b["inputs"][j] + 1)
      # a stream's first window (also after it wraps round) starts from a fresh state
      assert b["reset"][j, 0] == (g % n == 0)
      assert not b["reset"][j, 1:].any()
  it = ds.train_iter()
  for _ in range(3):
    next(it)
  state = it.get_state()
  it2 = ds.train_iter()
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["inputs"], batches[3]["inputs"])


def _err(c, tok, match):
  with pytest.raises(data.DataError, match=match) as e:
    data.build(c, tok)
  assert "\n" not in str(e.value)


def test_missing_path(tmp_path, tok):
  _err(cfg(str(tmp_path / "nope.txt")), tok, "does not exist")


def test_empty_file(tmp_path, tok):
  (tmp_path / "e.txt").write_text("\n \n\n")
  _err(cfg(str(tmp_path / "e.txt")), tok, r"zero documents.*e\.txt")


def test_corpus_smaller_than_window(tmp_path, tok):
  _err(cfg(write_txt(tmp_path / "s.txt", ["tiny"]), val_fraction=0.0), tok,
       "fewer than one window")


def test_empty_val_split(tmp_path, tok):
  _err(cfg(write_txt(tmp_path / "s.txt", docs(2)), val_fraction=0.001), tok,
       "val split.*val_fraction")
