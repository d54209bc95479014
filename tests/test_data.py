"""Tests of the data pipeline: readers, tokenizer, cache, packing, iterators."""
import gzip
import json
import logging
import os
import random

import numpy as np
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import data
from mmrec_jax import sources
from mmrec_jax import tokenizer as tokenizer_lib

VOCAB = 300
SEQ = 32


def _words(rng, n):
  letters = "abcdefghijklmnopqrstuvwxyz"
  return " ".join("".join(rng.choice(letters[:12]) for _ in range(rng.randint(2, 7)))
                  for _ in range(n))


def _docs(n=60, seed=0):
  rng = random.Random(seed)
  return [f"doc {i}: " + _words(rng, 40) + " ünï €." for i in range(n)]


def _write_txt(path, docs):
  path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
  return str(path)


def _cfg(path, val_fraction=0.2, **data_fields):
  c = config_lib.make_config("t", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=1,
                             max_seq_len=64)
  c.train.seq_len = SEQ
  c.train.batch_size = 4
  c.data.path = path
  c.data.val_fraction = val_fraction
  for k, v in data_fields.items():
    c.data[k] = v
  return config_lib.validate(c)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(_docs(80, seed=1), VOCAB)


def _read(path, field="text"):
  return list(sources.read_documents(path, field))


# -------------------------------------------------------------------- readers


def test_txt_blocks(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("first doc\nline two\n\n  \n\nsecond\n\n\n\nthird\n", encoding="utf-8")
  assert _read(str(p)) == [("a.txt#0", "first doc\nline two"), ("a.txt#1", "second"),
                           ("a.txt#2", "third")]


def test_jsonl_and_gz(tmp_path):
  rows = [{"text": "hello"}, {"text": "wörld", "x": 1}]
  body = "\n".join(json.dumps(r) for r in rows) + "\n\n"
  (tmp_path / "a.jsonl").write_text(body, encoding="utf-8")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(body)
  with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as f:
    f.write(json.dumps({"body": "other field"}) + "\n")
  assert _read(str(tmp_path / "a.jsonl")) == [("a.jsonl#1", "hello"), ("a.jsonl#2", "wörld")]
  assert [t for _, t in _read(str(tmp_path / "b.jsonl.gz"))] == ["hello", "wörld"]
  assert _read(str(tmp_path / "c.json.gz"), "body") == [("c.json.gz#1", "other field")]


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["a b", None, "c"], "n": [1, 2, 3]}),
                 tmp_path / "x.parquet")
  assert _read(str(tmp_path / "x.parquet"), "content") == [("x.parquet#0", "a b"),
                                                             ("x.parquet#2", "c")]


def test_array_record(tmp_path):
  from array_record.python import array_record_module
  path = str(tmp_path / "r.array_record")
  w = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for rec in [b"plain text", json.dumps({"text": "from json"}).encode(), "é".encode()]:
    w.write(rec)
  w.close()
  assert _read(path) == [("r.array_record#0", "plain text"), ("r.array_record#1", "from json"),
                         ("r.array_record#2", "é")]


def test_directory_glob_and_list(tmp_path, caplog):
  (tmp_path / "d" / "sub").mkdir(parents=True)
  _write_txt(tmp_path / "d" / "a.txt", ["one"])
  _write_txt(tmp_path / "d" / "sub" / "b.txt", ["two"])
  (tmp_path / "d" / "notes.md").write_text("skip me")
  (tmp_path / "e.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
  with caplog.at_level(logging.WARNING):
    docs = _read(f"{tmp_path / 'd'},{tmp_path / 'e.jsonl'}")
  assert docs == [("a.txt#0", "one"), ("sub/b.txt#0", "two"), ("e.jsonl#1", "three")]
  assert "unsupported extensions" in caplog.text and "notes.md" in caplog.text
  assert [t for _, t in _read(str(tmp_path / "d" / "**" / "*.txt"))] == ["one", "two"]


def test_builtin_corpus_listing():
  files = sources.stdlib_files()
  rels = [r for r, _ in files]
  assert len(rels) > 300 and rels == sorted(rels)
  assert "json/decoder.py" in rels
  assert not any(r.startswith(("test/", "idlelib/idle_test/")) or "/tests/" in r for r in rels)
  assert len(sources.stdlib_files(include_tests=True)) > len(rels)
  docs = list(sources.read_documents("", max_bytes=20_000))
  assert docs[0][0] == rels[0] and 20_000 <= sum(len(t.encode()) for _, t in docs) < 400_000


def test_split_is_stable(tmp_path):
  d = tmp_path / "d"
  d.mkdir()
  _write_txt(d / "a.txt", _docs(200))
  c = _cfg(str(d), val_fraction=0.3)
  val_before = {i for i, _ in sources.split_documents(c.data, "val")}
  train_before = {i for i, _ in sources.split_documents(c.data, "train")}
  assert val_before and train_before and not val_before & train_before
  _write_txt(d / "0.txt", _docs(100, seed=5))   # sorts before a.txt
  val_after = {i for i, _ in sources.split_documents(c.data, "val")}
  train_after = {i for i, _ in sources.split_documents(c.data, "train")}
  assert val_before <= val_after and train_before <= train_after
  assert abs(len(val_after) / 300 - 0.3) < 0.1


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip(tok):
  assert tok.get_vocab_size() == VOCAB
  assert tok.token_to_id("<|eod|>") == 0 and tok.token_to_id("<|pad|>") == 1
  text = "héllo wörld\t€ 😀 \x00 never-seen ZZQX\n  indented"
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text and max(ids) < VOCAB and min(ids) > 1
  bpt = tokenizer_lib.bytes_per_token(tok)
  assert bpt[0] == bpt[1] == 0 and bpt[ids].sum() == len(text.encode())
  assert all(len(tokenizer_lib.token_bytes(tok, i)) == bpt[i] for i in range(VOCAB))


def test_extend_tokenizer_keeps_old_ids(tok):
  new = tokenizer_lib.extend_tokenizer(tok, _docs(80, seed=7), VOCAB + 60)
  assert new.get_vocab_size() == VOCAB + 60
  for i in range(VOCAB):
    assert new.id_to_token(i) == tok.id_to_token(i)
    assert tokenizer_lib.token_bytes(new, i) == tokenizer_lib.token_bytes(tok, i)
  old_m = json.loads(tok.to_str())["model"]["merges"]
  assert json.loads(new.to_str())["model"]["merges"][:len(old_m)] == old_m
  text = _docs(3, seed=9)[2]
  ids = new.encode(text).ids
  assert new.decode(ids) == text and max(ids) < VOCAB + 60
  assert len(ids) <= len(tok.encode(text).ids)


def test_get_tokenizer_writes_and_checks_size(tmp_path, tok):
  c = _cfg(_write_txt(tmp_path / "a.txt", _docs()))
  run = tmp_path / "run"
  t1 = data.get_tokenizer(c, str(run))
  assert (run / "tokenizer.json").is_file() and t1.get_vocab_size() == VOCAB
  tokenizer_lib.save_tokenizer(tok, str(tmp_path / "tok.json"))
  c.data.tokenizer = str(tmp_path / "tok.json")
  c.model.vocab_size = 400
  with pytest.raises(data.DataError, match=r"has 300 tokens but model.vocab_size=400"):
    data.get_tokenizer(c, str(tmp_path / "run2"))


# ---------------------------------------------------------- packing and cache


def test_packing_and_reset(tmp_path, tok):
  docs = _docs()
  c = _cfg(_write_txt(tmp_path / "a.txt", docs), val_fraction=0.0)
  ds = data.build(c, tok)
  toks = np.asarray(ds.train_tokens)
  assert toks[0] == ds.eod_id and (toks == ds.eod_id).sum() == len(docs)
  assert not (toks == ds.pad_id).any()
  expected = np.concatenate([[0] + tok.encode(d).ids for d in docs])
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
  path = _write_txt(tmp_path / "a.txt", _docs())
  c = _cfg(path, val_fraction=0.3)
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
  assert sum(int(b["bytes"].sum()) for b in ev) == sum(len(d.encode()) for d in _docs())


def test_cache_reuse_and_invalidation(tmp_path, tok, monkeypatch):
  path = tmp_path / "a.txt"
  _write_txt(path, _docs())
  c = _cfg(str(path))
  first = np.asarray(data.build(c, tok).train_tokens)
  calls = []
  real = data._tokenize_to_file
  monkeypatch.setattr(data, "_tokenize_to_file",
                      lambda *a: calls.append(1) or real(*a))
  np.testing.assert_array_equal(data.build(c, tok).train_tokens, first)
  assert not calls
  _write_txt(path, _docs() + ["one more document here"])
  second = data.build(c, tok)
  assert len(calls) == 2    # train and val re-tokenized under a new fingerprint
  assert len(second.train_tokens) + len(second.val_tokens) > len(first)


def test_interrupted_cache_is_not_trusted(tmp_path, tok, monkeypatch):
  c = _cfg(_write_txt(tmp_path / "a.txt", _docs()), val_fraction=0.0)
  real = data.encode_documents

  def broken(docs, tk):
    yield next(real(docs, tk))
    raise KeyboardInterrupt

  monkeypatch.setattr(data, "encode_documents", broken)
  with pytest.raises(KeyboardInterrupt):
    data.build(c, tok)
  assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith("tokens-")]
  monkeypatch.setattr(data, "encode_documents", real)
  assert len(data.build(c, tok).train_tokens) > SEQ


# ------------------------------------------------------------------ iterators


def test_iterator_resume_exact(tmp_path, tok):
  c = _cfg(_write_txt(tmp_path / "a.txt", _docs()))
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
  c = _cfg(_write_txt(tmp_path / "a.txt", _docs()), val_fraction=0.0)
  ds = data.build(c, tok)
  n = ds.num_train_windows
  c.train.batch_size = 1
  ds1 = data.build(c, tok)
  it = ds1.train_iter()
  rows = [tuple(next(it)["inputs"][0]) for _ in range(2 * n)]
  assert sorted(rows[:n]) == sorted(rows[n:]) and rows[:n] != rows[n:]
  c.train.seed = 1
  it_b = data.build(c, tok).train_iter()
  assert [tuple(next(it_b)["inputs"][0]) for _ in range(n)] != rows[:n]


def test_process_sharding(tmp_path, tok):
  c = _cfg(_write_txt(tmp_path / "a.txt", _docs()))
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


# ------------------------------------------------------------------ bad input


def _err(c, tok, match):
  with pytest.raises(data.DataError, match=match) as e:
    data.build(c, tok)
  assert "\n" not in str(e.value)


def test_missing_path(tmp_path, tok):
  _err(_cfg(str(tmp_path / "nope.txt")), tok, "does not exist")


def test_empty_file(tmp_path, tok):
  (tmp_path / "e.txt").write_text("\n \n\n")
  _err(_cfg(str(tmp_path / "e.txt")), tok, r"zero documents.*e\.txt")


def test_corpus_smaller_than_window(tmp_path, tok):
  _err(_cfg(_write_txt(tmp_path / "s.txt", ["tiny"]), val_fraction=0.0), tok,
       "fewer than one window")


def test_empty_val_split(tmp_path, tok):
  _err(_cfg(_write_txt(tmp_path / "s.txt", _docs(2)), val_fraction=0.001), tok,
       "val split.*val_fraction")


def test_invalid_utf8_is_counted(tmp_path, tok, caplog):
  p = tmp_path / "b.txt"
  p.write_bytes("\n\n".join(_docs(3)).encode() + b"\n\nbad \xff\xfe bytes\n")
  with caplog.at_level(logging.WARNING):
    docs = _read(str(p))
  assert docs[-1][1] == "bad \ufffd\ufffd bytes"
  assert "1 file(s)/record(s) had invalid UTF-8" in caplog.text


def test_jsonl_missing_field(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(data.DataError, match=r"a\.jsonl:2: .*no 'text' field"):
    _read(str(p))


def test_jsonl_broken_line(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(data.DataError, match=r"a\.jsonl:3: invalid JSON"):
    _read(str(p))


def test_truncated_gzip(tmp_path):
  raw = gzip.compress(("\n".join(json.dumps({"text": t}) for t in _docs())).encode())
  (tmp_path / "t.jsonl.gz").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.DataError, match=r"t\.jsonl\.gz: truncated or corrupt gzip"):
    _read(str(tmp_path / "t.jsonl.gz"))


def test_parquet_without_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
  with pytest.raises(data.DataError, match=r"x\.parquet: .*no column 'text'"):
    _read(str(tmp_path / "x.parquet"))


def test_unknown_extension(tmp_path):
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(data.DataError, match=r"x\.csv: unknown extension"):
    _read(str(tmp_path / "x.csv"))
