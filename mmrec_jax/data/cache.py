"""The tokenize-once cache: token ids on disk, keyed by what produced them, and the
run's tokenizer (trained once, by process 0 in a multi-process run).

Token ids are cached on disk (uint16/uint32 raw file, memory-mapped) under a
fingerprint of the source files (paths, sizes, mtimes), reader settings,
split and tokenizer; the cache is written to a temp file and `os.replace`d.
Cache dir: `data.cache_dir`, else `$MMREC_CACHE_DIR`, else ~/.cache/mmrec_jax.

Multi-process: process 0 trains the tokenizer, writes `workdir/tokenizer.json`
and tokenizes the splits into the cache while the others wait at a barrier, then
read what it wrote (a process that cannot see it, e.g. a node with its own local
cache dir, does the work itself).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmrec_jax.data import sources
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.data.sources import DataError
from mmrec_jax.io import workdir as workdir_lib

log = logging.getLogger("mmrec_jax.data")
CACHE_VERSION = 1
_ENCODE_CHUNK_BYTES = 4 << 20


# --------------------------------------------------------------- fingerprints


def cache_dir(d):
  path = d.cache_dir or os.environ.get("MMREC_CACHE_DIR") or "~/.cache/mmrec_jax"
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  return path


def _files_state(path_spec, include_tests):
  files, _ = sources.list_files(path_spec, include_tests)
  out = []
  for rel, path in files:
    st = os.stat(path)
    out.append([rel, path, st.st_size, st.st_mtime_ns])
  return out


def _fingerprint(d, split, extra):
  """sha256 of the split's source files, reader settings and `extra`."""
  spec = {
      "version": CACHE_VERSION, "split": split, "text_field": d.text_field,
      "max_bytes": d.max_bytes, "include_tests": d.include_tests,
      "val_fraction": d.val_fraction, "val_path": d.val_path,
      "python": sys.version if not d.path else "",
      "files": _files_state(d.path, d.include_tests),
      "val_files": _files_state(d.val_path, False) if d.val_path else [],
      "extra": extra,
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------- multi-process

BARRIER_TIMEOUT_MS = 24 * 3600 * 1000   # process 0 may tokenize a large corpus meanwhile
_BARRIERS = {}


def barrier(name):
  """Every process waits here until all arrive (no-op with one process)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  _BARRIERS[name] = _BARRIERS.get(name, 0) + 1   # a barrier id is used once
  name = f"mmrec_{name}_{_BARRIERS[name]}"
  client = distributed.global_state.client
  if client is not None:  # the coordinator's barrier: no collective timeout while waiting
    client.wait_at_barrier(name, BARRIER_TIMEOUT_MS)
  multihost_utils.sync_global_devices(name)


def process_0_first(name, fn):
  """`fn()` on process 0, then on the others once it is done (they find its files).

  A failure on process 0 still releases the others (who then fail the same way).
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      out = fn()
    finally:
      barrier(name)
    return out
  barrier(name)
  return fn()


# ------------------------------------------------------------------ tokenizer


def get_tokenizer(config, workdir=None):
  """Loads `data.tokenizer`, else workdir/tokenizer.json, else trains one.

  Training uses the train split (at most `data.tokenizer_max_bytes`) and is
  cached by fingerprint. The result is written to `workdir/tokenizer.json`
  and must have exactly `model.vocab_size` tokens (else `DataError`).
  Multi-process: process 0 does this first; the others then load its
  `workdir/tokenizer.json` (the workdir must be shared) and write nothing.
  """
  return process_0_first("tokenizer", lambda: _get_tokenizer(config, workdir))


def _get_tokenizer(config, workdir):
  d, vocab_size = config.data, config.model.vocab_size
  run_path = os.path.join(workdir, "tokenizer.json") if workdir else ""
  if d.tokenizer:
    tok = tokenizer_lib.load_tokenizer(d.tokenizer)
    where = d.tokenizer
  elif run_path and os.path.isfile(run_path):
    tok = tokenizer_lib.load_tokenizer(run_path)
    where = run_path
  elif d.task:   # a generated task: its own word-level vocabulary
    from mmrec_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    tok = synthetic.make_tokenizer(synthetic.parse(d.task))
    where = f"the tokenizer of data.task={d.task}"
  else:
    fp = _fingerprint(d, "train", ["tokenizer", vocab_size, d.tokenizer_max_bytes])
    cached = os.path.join(cache_dir(d), f"tokenizer-{fp}.json")
    if os.path.isfile(cached):
      tok = tokenizer_lib.load_tokenizer(cached)
    else:
      t0 = time.time()
      texts = (t for _, t in sources.split_documents(d, "train", d.tokenizer_max_bytes))
      tok = tokenizer_lib.train_tokenizer(texts, vocab_size)
      tokenizer_lib.save_tokenizer(tok, cached)
      log.info("trained a %d-token BPE in %.1fs", vocab_size, time.time() - t0)
    where = "trained tokenizer"
  tokenizer_lib.check_tokenizer(tok, vocab_size, where)
  if (run_path and os.path.abspath(where) != os.path.abspath(run_path)
      and jax.process_index() == 0):
    tokenizer_lib.save_tokenizer(tok, run_path)
  return tok


# ---------------------------------------------------------------- token cache


def token_dtype(vocab_size):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _chunks(docs, chunk_bytes=_ENCODE_CHUNK_BYTES):
  texts, size = [], 0
  for _, text in docs:
    texts.append(text)
    size += len(text)
    if size >= chunk_bytes:
      yield texts
      texts, size = [], 0
  if texts:
    yield texts


def encode_documents(docs, tok):
  """Yields one token array per chunk of documents, each doc preceded by eod."""
  eod = tok.token_to_id(tokenizer_lib.EOD)
  dtype = token_dtype(tok.get_vocab_size())
  old = tok.encode_special_tokens
  tok.encode_special_tokens = True   # "<|eod|>" inside text is plain text
  try:
    for texts in _chunks(docs):
      encs = tok.encode_batch_fast(texts, add_special_tokens=False)
      eod_1 = np.array([eod], dtype)
      yield np.concatenate([x for e in encs for x in (eod_1, np.asarray(e.ids, dtype))])
  finally:
    tok.encode_special_tokens = old


def _tokenize_to_file(docs, tok, path):
  """Writes the token ids of `docs` to `path` atomically; returns the count."""
  n = 0
  with workdir_lib.atomic_open(path) as f:
    for ids in encode_documents(docs, tok):
      f.write(ids.tobytes())
      n += ids.size
  return n


def cached_tokens(d, split, tok):
  """Memory-mapped token ids of one split, tokenized once and cached (by process 0
  first when there are several)."""
  return process_0_first(f"tokens_{split}", lambda: _cached_tokens(d, split, tok))


def _cached_tokens(d, split, tok):
  dtype = token_dtype(tok.get_vocab_size())
  fp = _fingerprint(d, split, hashlib.sha256(tok.to_str().encode()).hexdigest())
  path = os.path.join(cache_dir(d), f"tokens-{split}-{fp}.{np.dtype(dtype).name}")
  if not os.path.isfile(path):
    t0 = time.time()
    n = _tokenize_to_file(sources.split_documents(d, split), tok, path)
    log.info("tokenized %s split: %d tokens in %.1fs -> %s", split, n, time.time() - t0, path)
  if os.path.getsize(path) == 0:
    hint = ("raise data.val_fraction or set data.val_path" if split == "val"
            else "add data or lower data.val_fraction")
    raise DataError(f"the {split} split of {d.path or 'the built-in corpus'} has no "
                    f"documents; {hint}")
  return np.memmap(path, dtype=dtype, mode="r")
