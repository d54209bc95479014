"""The tokenize-once cache (`data/cache.py`): the run's tokenizer written and checked,
token ids reused until a source changes, an interrupted write never trusted."""
import os

import numpy as np
import pytest

from mmrec_jax.data import cache
from mmrec_jax.data import pipeline as data
from mmrec_jax.data import tokenizer as tokenizer_lib
from tests.data.helpers import SEQ, VOCAB, cfg, docs, write_txt


def test_get_tokenizer_writes_and_checks_size(tmp_path, tok):
  c = cfg(write_txt(tmp_path / "a.txt", docs()))
  run = tmp_path / "run"
  t1 = cache.get_tokenizer(c, str(run))
  assert (run / "tokenizer.json").is_file() and t1.get_vocab_size() == VOCAB
  tokenizer_lib.save_tokenizer(tok, str(tmp_path / "tok.json"))
  c = c.override({"data.tokenizer": str(tmp_path / "tok.json"), "model.vocab_size": 400})
  with pytest.raises(cache.DataError, match=r"has 300 tokens but model.vocab_size=400"):
    cache.get_tokenizer(c, str(tmp_path / "run2"))


def test_cache_reuse_and_invalidation(tmp_path, tok, monkeypatch):
  path = tmp_path / "a.txt"
  write_txt(path, docs())
  c = cfg(str(path))
  first = np.asarray(data.build(c, tok).train_tokens)
  calls = []
  real = cache._tokenize_to_file
  monkeypatch.setattr(cache, "_tokenize_to_file",
                      lambda *a: calls.append(1) or real(*a))
  np.testing.assert_array_equal(data.build(c, tok).train_tokens, first)
  assert not calls
  write_txt(path, docs() + ["one more document here"])
  second = data.build(c, tok)
  assert len(calls) == 2    # train and val re-tokenized under a new fingerprint
  assert len(second.train_tokens) + len(second.val_tokens) > len(first)


def test_interrupted_cache_is_not_trusted(tmp_path, tok, monkeypatch):
  c = cfg(write_txt(tmp_path / "a.txt", docs()), val_fraction=0.0)
  real = cache.encode_documents

  def broken(documents, tk):
    yield next(real(documents, tk))
    raise KeyboardInterrupt

  monkeypatch.setattr(cache, "encode_documents", broken)
  with pytest.raises(KeyboardInterrupt):
    data.build(c, tok)
  assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith("tokens-")]
  monkeypatch.setattr(cache, "encode_documents", real)
  assert len(data.build(c, tok).train_tokens) > SEQ
