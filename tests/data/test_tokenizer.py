"""The byte-level BPE tokenizer (`data/tokenizer.py`): round trips, byte counts,
extension that keeps every old id, `--extend` errors naming the flag."""
import json

import pytest

from mmrec_jax import errors
from mmrec_jax.data import tokenizer as tokenizer_lib
from tests.data.helpers import VOCAB, docs


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
  new = tokenizer_lib.extend_tokenizer(tok, docs(80, seed=7), VOCAB + 60)
  assert new.get_vocab_size() == VOCAB + 60
  for i in range(VOCAB):
    assert new.id_to_token(i) == tok.id_to_token(i)
    assert tokenizer_lib.token_bytes(new, i) == tokenizer_lib.token_bytes(tok, i)
  old_m = json.loads(tok.to_str())["model"]["merges"]
  assert json.loads(new.to_str())["model"]["merges"][:len(old_m)] == old_m
  text = docs(3, seed=9)[2]
  ids = new.encode(text).ids
  assert new.decode(ids) == text and max(ids) < VOCAB + 60
  assert len(ids) <= len(tok.encode(text).ids)


def test_extend_with_a_larger_tokenizer_names_the_flag(tmp_path):
  tok = tokenizer_lib._train_up_to(["def main return value " * 50], 300)
  n = tok.get_vocab_size()
  path = str(tmp_path / "tok.json")
  tokenizer_lib.save_tokenizer(tok, path)
  with pytest.raises(errors.UsageError, match=rf"--extend=.* has {n} tokens, more than"):
    tokenizer_lib.load_extend(path, n - 10)
  assert tokenizer_lib.load_extend(path, n + 50).get_vocab_size() == n
