"""Data pipeline: tokenize-once cache, packing into windows, Grain iterators.

Each document is preceded by `<|eod|>`; documents are concatenated and cut into
windows of `seq_len + 1` tokens with stride `seq_len` (each token is a target
exactly once). Batches are dicts of numpy arrays:
  inputs int32 [B, T]   window[:-1]
  targets int32 [B, T]  window[1:]
  reset bool [B, T]     inputs == eod (the model drops its recurrent state)
  mask float32 [B, T]   1 where the target is real, 0 on padding
  bytes int32 [B, T]    validation only: UTF-8 bytes behind each target

Token ids are cached on disk (uint16/uint32 raw file, memory-mapped) under a
fingerprint of the source files (paths, sizes, mtimes), reader settings,
split and tokenizer; the cache is written to a temp file and `os.replace`d.
Cache dir: `data.cache_dir`, else `$MMREC_CACHE_DIR`, else ~/.cache/mmrec_jax.

Multi-process: process 0 trains the tokenizer, writes `workdir/tokenizer.json`
and tokenizes the splits into the cache while the others wait at a barrier, then
read what it wrote (a process that cannot see it, e.g. a node with its own local
cache dir, does the work itself). Each process reads only its own windows: rows
[p*B/P, (p+1)*B/P) of every global batch of B windows (of the global shuffled
order in training, of each global validation batch in evaluation), so the global
batch is the one-process batch, row for row, for any number of processes P.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from mmrec_jax import sources
from mmrec_jax import tokenizer as tokenizer_lib
from mmrec_jax import workdir as workdir_lib
from mmrec_jax.sources import DataError, read_documents  # pylint: disable=unused-import

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


# ------------------------------------------------------------------- batching


class Windows:
  """Random-access windows of `seq_len + 1` tokens, stride `seq_len`."""

  def __init__(self, tokens, seq_len):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self):
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i):
    t = self.seq_len
    return np.asarray(self.tokens[i * t:i * t + t + 1], np.int32)


def make_batch(windows_bw, eod_id):
  """Batch dict from windows int [B, T+1]."""
  w = np.stack(windows_bw).astype(np.int32)
  inputs = w[:, :-1]
  return {"inputs": inputs, "targets": w[:, 1:], "reset": inputs == eod_id,
          "mask": np.ones(inputs.shape, np.float32)}


class _BatchFn:
  """Picklable batch function for Grain."""

  def __init__(self, eod_id):
    self.eod_id = eod_id

  def __call__(self, windows):
    if isinstance(windows[0], tuple):   # (window, stream starts) from `_Streams`
      batch = make_batch([w for w, _ in windows], self.eod_id)
      batch["reset"][:, 0] |= np.array([first for _, first in windows])
      return batch
    return make_batch(windows, self.eod_id)


class _Streams(grain.MapDataset):
  """`train.carry_state`: the windows cut into `rows` contiguous streams, one per
  global batch row. Element g*rows + j is (window j*n + g mod n, whether it starts
  stream j), n = len(parent) // rows: row j of step g continues row j of step g-1,
  and a row that wraps round to its stream's start begins with a reset."""

  def __init__(self, parent, rows):
    super().__init__(parent)
    self.rows = rows
    self.n = len(parent) // rows
    if self.n < 1:
      raise DataError(f"train.carry_state: {len(parent)} training windows cannot make "
                      f"{rows} streams (one per batch row); use more data or a smaller "
                      "train.batch_size")

  def __len__(self):
    return self.n * self.rows

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g, j = divmod(index % len(self), self.rows)
    return self._parent[j * self.n + g], g == 0


def eval_batches(tokens, seq_len, batch_size, *, eod_id, pad_id, bytes_per_token,
                 process_index=0, process_count=1, max_batches=None):
  """Fixed batches over all `tokens` (non-overlapping targets, padded).

  Global batch g holds windows g*G .. g*G+G-1 (G = batch_size * process_count);
  this process gets rows [process_index*batch_size, ...). Missing windows are
  all `<|pad|>` with mask 0.
  """
  t, g_size = seq_len, batch_size * process_count
  n_windows = -(-(len(tokens) - 1) // t)
  n_batches = -(-n_windows // g_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  out = []
  for g in range(n_batches):
    w_bw = np.full((batch_size, t + 1), pad_id, np.int32)
    n_real = np.zeros(batch_size, np.int64)
    for j in range(batch_size):
      k = g * g_size + process_index * batch_size + j
      if k < n_windows:
        chunk = np.asarray(tokens[k * t:k * t + t + 1], np.int32)
        w_bw[j, :len(chunk)] = chunk
        n_real[j] = len(chunk) - 1
    batch = make_batch(list(w_bw), eod_id)
    batch["mask"] = (np.arange(t)[None, :] < n_real[:, None]).astype(np.float32)
    batch["bytes"] = bytes_per_token[batch["targets"]] * (batch["mask"] > 0)
    batch["bytes"] = batch["bytes"].astype(np.int32)
    out.append(batch)
  return out


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: element i of it is element
  g*B + p*b + j of `parent` (g, j = divmod(i, b); b rows per process, B = P*b)."""

  def __init__(self, parent, process_index, process_count, rows):
    super().__init__(parent)
    self.p, self.n, self.b = process_index, process_count, rows

  def __len__(self):
    return len(self._parent) // self.n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g, j = divmod(index, self.b)
    return self._parent[g * self.b * self.n + self.p * self.b + j]


@dataclasses.dataclass
class Datasets:
  """Train and validation data of one process."""
  train_tokens: np.ndarray
  val_tokens: np.ndarray | None
  seq_len: int
  batch_size: int          # per process
  seed: int
  eod_id: int
  pad_id: int
  bytes_per_token: np.ndarray
  process_index: int = 0
  process_count: int = 1
  num_threads: int = 0
  prefetch: int = 8
  carry_state: bool = False

  @property
  def num_train_windows(self):
    return len(Windows(self.train_tokens, self.seq_len))

  def train_dataset(self):
    """The infinite `grain.MapDataset` of this process's train batches."""
    ds = grain.MapDataset.source(Windows(self.train_tokens, self.seq_len))
    if self.carry_state:
      ds = _Streams(ds, self.batch_size * self.process_count).repeat()
    else:
      ds = ds.shuffle(seed=self.seed).repeat()
    if self.process_count > 1:
      ds = _ProcessRows(ds, self.process_index, self.process_count, self.batch_size)
    return ds.batch(self.batch_size, drop_remainder=True, batch_fn=_BatchFn(self.eod_id))

  def train_iter(self):
    """Infinite iterator of batches with `get_state()` / `set_state(state)`.

    The epoch order is reshuffled each epoch (seeded); the state is a JSON-
    serialisable dict and restoring it continues exactly where it was taken.
    """
    opts = grain.ReadOptions(num_threads=self.num_threads,
                             prefetch_buffer_size=self.prefetch if self.num_threads else 0)
    return iter(self.train_dataset().to_iter_dataset(opts))

  def val_batches(self, max_batches=None):
    """Fixed validation batches (with 'bytes'); [] when there is no val split."""
    if self.val_tokens is None:
      return []
    return eval_batches(self.val_tokens, self.seq_len, self.batch_size, eod_id=self.eod_id,
                        pad_id=self.pad_id, bytes_per_token=self.bytes_per_token,
                        process_index=self.process_index, process_count=self.process_count,
                        max_batches=max_batches)


def build(config, tok, process_index=0, process_count=1):
  """Tokenizes (or loads from cache) both splits; returns `Datasets`."""
  d, t = config.data, config.train
  tokenizer_lib.check_tokenizer(tok, config.model.vocab_size)
  if t.batch_size % process_count:
    raise DataError(f"train.batch_size={t.batch_size} is not divisible by the "
                    f"{process_count} processes; use a multiple of {process_count}")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in [0, {process_count})")
  train_tokens = cached_tokens(d, "train", tok)
  if len(train_tokens) < t.seq_len + 1:
    raise DataError(f"the train split has {len(train_tokens)} tokens, fewer than one window "
                    f"of train.seq_len+1={t.seq_len + 1}; add data or lower train.seq_len")
  val_tokens = cached_tokens(d, "val", tok) if d.val_path or d.val_fraction > 0 else None
  return Datasets(
      train_tokens=train_tokens, val_tokens=val_tokens, seq_len=t.seq_len,
      batch_size=t.batch_size // process_count, seed=t.seed,
      eod_id=tok.token_to_id(tokenizer_lib.EOD), pad_id=tok.token_to_id(tokenizer_lib.PAD),
      bytes_per_token=tokenizer_lib.bytes_per_token(tok), process_index=process_index,
      process_count=process_count, num_threads=d.num_workers, prefetch=d.prefetch,
      carry_state=bool(t.get("carry_state", False)))


def encode_eval_file(path, tok, seq_len, text_field="text", *, batch_size=8,
                     max_batches=None, process_index=0, process_count=1):
  """Validation-style batches (with 'bytes') over every document of `path`.

  No split and no cache: all documents of `path` (any supported format).
  """
  docs = read_documents(path, text_field)
  parts = list(encode_documents(docs, tok))
  tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  return eval_batches(
      tokens, seq_len, batch_size, eod_id=tok.token_to_id(tokenizer_lib.EOD),
      pad_id=tok.token_to_id(tokenizer_lib.PAD),
      bytes_per_token=tokenizer_lib.bytes_per_token(tok), process_index=process_index,
      process_count=process_count, max_batches=max_batches)
