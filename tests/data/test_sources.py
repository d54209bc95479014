"""Document readers (`data/sources.py`): every format, directories and globs, the
built-in corpus, the stable train / val split, and one-line errors for bad input."""
import gzip
import json
import logging

import pytest

from mmrec_jax.data import sources
from tests.data.helpers import cfg, docs, write_txt


def _read(path, field="text"):
  return list(sources.read_documents(path, field))


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
  write_txt(tmp_path / "d" / "a.txt", ["one"])
  write_txt(tmp_path / "d" / "sub" / "b.txt", ["two"])
  (tmp_path / "d" / "notes.md").write_text("skip me")
  (tmp_path / "e.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
  with caplog.at_level(logging.WARNING):
    got = _read(f"{tmp_path / 'd'},{tmp_path / 'e.jsonl'}")
  assert got == [("a.txt#0", "one"), ("sub/b.txt#0", "two"), ("e.jsonl#1", "three")]
  assert "unsupported extensions" in caplog.text and "notes.md" in caplog.text
  assert [t for _, t in _read(str(tmp_path / "d" / "**" / "*.txt"))] == ["one", "two"]


def test_builtin_corpus_listing():
  files = sources.stdlib_files()
  rels = [r for r, _ in files]
  assert len(rels) > 300 and rels == sorted(rels)
  assert "json/decoder.py" in rels
  assert not any(r.startswith(("test/", "idlelib/idle_test/")) or "/tests/" in r for r in rels)
  assert len(sources.stdlib_files(include_tests=True)) > len(rels)
  got = list(sources.read_documents("", max_bytes=20_000))
  assert got[0][0] == rels[0] and 20_000 <= sum(len(t.encode()) for _, t in got) < 400_000


def test_split_is_stable(tmp_path):
  d = tmp_path / "d"
  d.mkdir()
  write_txt(d / "a.txt", docs(200))
  c = cfg(str(d), val_fraction=0.3)
  val_before = {i for i, _ in sources.split_documents(c.data, "val")}
  train_before = {i for i, _ in sources.split_documents(c.data, "train")}
  assert val_before and train_before and not val_before & train_before
  write_txt(d / "0.txt", docs(100, seed=5))   # sorts before a.txt
  val_after = {i for i, _ in sources.split_documents(c.data, "val")}
  train_after = {i for i, _ in sources.split_documents(c.data, "train")}
  assert val_before <= val_after and train_before <= train_after
  assert abs(len(val_after) / 300 - 0.3) < 0.1


def test_invalid_utf8_is_counted(tmp_path, tok, caplog):
  p = tmp_path / "b.txt"
  p.write_bytes("\n\n".join(docs(3)).encode() + b"\n\nbad \xff\xfe bytes\n")
  with caplog.at_level(logging.WARNING):
    got = _read(str(p))
  assert got[-1][1] == "bad \ufffd\ufffd bytes"
  assert "1 file(s)/record(s) had invalid UTF-8" in caplog.text


def test_jsonl_missing_field(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(sources.DataError, match=r"a\.jsonl:2: .*no 'text' field"):
    _read(str(p))


def test_jsonl_broken_line(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
  with pytest.raises(sources.DataError, match=r"a\.jsonl:3: invalid JSON"):
    _read(str(p))


def test_truncated_gzip(tmp_path):
  raw = gzip.compress(("\n".join(json.dumps({"text": t}) for t in docs())).encode())
  (tmp_path / "t.jsonl.gz").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(sources.DataError, match=r"t\.jsonl\.gz: truncated or corrupt gzip"):
    _read(str(tmp_path / "t.jsonl.gz"))


def test_parquet_without_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
  with pytest.raises(sources.DataError, match=r"x\.parquet: .*no column 'text'"):
    _read(str(tmp_path / "x.parquet"))


def test_unknown_extension(tmp_path):
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(sources.DataError, match=r"x\.csv: unknown extension"):
    _read(str(tmp_path / "x.csv"))
