"""Byte-level BPE tokenizer (HF `tokenizers`), training and extension.

Ids 0 and 1 are the special tokens `<|eod|>` (end of document; also put
before each document) and `<|pad|>`. All 256 bytes are in the base alphabet,
so no text is ever unknown.

CLI:
  python -m mmrec_jax.tokenizer --config=configs/tiny.py --out=tok.json
  python -m mmrec_jax.tokenizer --extend=OLD.json --config=configs/mini.py --out=NEW.json
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmrec_jax.io import workdir as workdir_lib
from mmrec_jax.errors import DataError, UsageError

EOD = "<|eod|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOD, PAD)


def _empty_bpe():
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def _train_up_to(texts, vocab_size):
  tok = _empty_bpe()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def train_tokenizer(texts, vocab_size):
  """Trains a byte-level BPE of exactly `vocab_size` tokens on `texts`."""
  tok = _train_up_to(texts, vocab_size)
  if tok.get_vocab_size() < vocab_size:
    raise DataError(f"the training text yields only {tok.get_vocab_size()} BPE tokens, fewer "
                    f"than model.vocab_size={vocab_size}; use more data or a smaller vocab")
  return tok


def check_tokenizer(tok, vocab_size, where="tokenizer"):
  """Raises DataError unless `tok` has `vocab_size` tokens and eod=0, pad=1."""
  n = tok.get_vocab_size()
  if n != vocab_size:
    raise DataError(f"{where} has {n} tokens but model.vocab_size={vocab_size}; use a "
                    f"tokenizer of that size or set --config.model.vocab_size={n}")
  if tok.token_to_id(EOD) != 0 or tok.token_to_id(PAD) != 1:
    raise DataError(f"{where}: expected {EOD} at id 0 and {PAD} at id 1; retrain it "
                    "with mmrec_jax.tokenizer")
  return tok


def load_tokenizer(path):
  if not os.path.isfile(path):
    raise DataError(f"tokenizer file {path!r} not found; fix data.tokenizer or leave it "
                    "empty to train one")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: not a valid tokenizer.json ({str(e)[:200]})") from None


def load_extend(path, vocab_size):
  """The tokenizer of `--extend=path` to grow to `vocab_size` (UsageError naming the flag)."""
  if not os.path.isfile(path):
    raise UsageError(f"--extend={path}: file not found; pass the tokenizer.json to extend")
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    msg = " ".join(str(e).split())[:160]
    raise UsageError(f"--extend={path}: not a valid tokenizer.json ({msg}); pass a file "
                     "written by mmrec_jax.tokenizer") from None
  n = tok.get_vocab_size()
  if n > vocab_size:
    raise UsageError(f"--extend={path} has {n} tokens, more than model.vocab_size="
                     f"{vocab_size}; extending only adds tokens: raise "
                     f"--config.model.vocab_size to at least {n}")
  if tok.token_to_id(EOD) != 0 or tok.token_to_id(PAD) != 1:
    raise UsageError(f"--extend={path}: expected {EOD} at id 0 and {PAD} at id 1; pass a "
                     "tokenizer written by mmrec_jax.tokenizer")
  return tok


def save_tokenizer(tok, path):
  """Writes `tok` to `path` atomically."""
  workdir_lib.atomic_write(path, tok.to_str(pretty=True))


def _merge_pairs(merges):
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def extend_tokenizer(old, texts, vocab_size):
  """A `vocab_size` tokenizer that keeps every id, token and merge of `old`.

  New merges come from a fresh BPE trained on `texts`, in its merge order,
  skipping those whose token `old` already has; they are appended after the
  old merges, so old ids keep their meaning.
  """
  spec = json.loads(old.to_str())
  vocab = dict(spec["model"]["vocab"])
  merges = _merge_pairs(spec["model"]["merges"])
  old_size = old.get_vocab_size()
  if vocab_size < old_size:
    raise DataError(f"cannot extend a {old_size}-token tokenizer to a smaller "
                    f"vocab_size={vocab_size}")
  texts = list(texts)
  extra = old_size
  while len(vocab) < vocab_size:
    fresh = _train_up_to(texts, vocab_size + extra)
    fresh_merges = _merge_pairs(json.loads(fresh.to_str())["model"]["merges"])
    vocab_t, merges_t = dict(vocab), list(merges)
    for a, b in fresh_merges:
      if len(vocab_t) >= vocab_size:
        break
      if a + b in vocab_t or a not in vocab_t or b not in vocab_t:
        continue
      vocab_t[a + b] = len(vocab_t)
      merges_t.append((a, b))
    if len(vocab_t) >= vocab_size or fresh.get_vocab_size() < vocab_size + extra:
      vocab, merges = vocab_t, merges_t
      break
    extra *= 2
  if len(vocab) < vocab_size:
    raise DataError(f"the text yields only {len(vocab)} tokens, fewer than "
                    f"vocab_size={vocab_size}; use more data to extend the tokenizer")
  spec["model"]["vocab"] = vocab
  spec["model"]["merges"] = [list(m) for m in merges]
  return Tokenizer.from_str(json.dumps(spec))


@functools.lru_cache(maxsize=None)
def _byte_decoder():
  """Inverse of GPT-2's bytes_to_unicode: byte-level char -> byte value."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok, i):
  """The raw bytes of token `i` (b'' for special tokens)."""
  if i in tok.get_added_tokens_decoder():
    return b""
  dec = _byte_decoder()
  return bytes(dec[ch] for ch in tok.id_to_token(i))


def bytes_per_token(tok):
  """int32 [vocab]: UTF-8 bytes behind each token id (0 for special tokens)."""
  specials = tok.get_added_tokens_decoder()
  out_v = np.zeros(tok.get_vocab_size(), np.int32)
  for s, i in tok.get_vocab(with_added_tokens=False).items():
    out_v[i] = 0 if i in specials else len(s)   # one byte-level char per byte
  return out_v
