"""Data pipeline: documents packed into windows, batches, Grain iterators.

Each document is preceded by `<|eod|>`; documents are concatenated and cut into
windows of `seq_len + 1` tokens with stride `seq_len` (each token is a target
exactly once). Batches are dicts of numpy arrays:
  inputs int32 [B, T]   window[:-1]
  targets int32 [B, T]  window[1:]
  reset bool [B, T]     inputs == eod (the model drops its recurrent state)
  mask float32 [B, T]   1 where the target is real, 0 on padding
  bytes int32 [B, T]    validation only: UTF-8 bytes behind each target

Token ids come from the tokenize-once cache (`cache.py`). Each process reads only
its own windows: rows
[p*B/P, (p+1)*B/P) of every global batch of B windows (of the global shuffled
order in training, of each global validation batch in evaluation), so the global
batch is the one-process batch, row for row, for any number of processes P.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.data.cache import (barrier, cache_dir, cached_tokens, encode_documents,  # noqa: F401
                                  get_tokenizer, process_0_first, token_dtype)
from mmrec_jax.data.sources import DataError, read_documents  # noqa: F401 (re-exported)


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
  if config.data.task:   # a generated task (data/synthetic.py): batches drawn fresh
    from mmrec_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    tokenizer_lib.check_tokenizer(tok, config.model.vocab_size)
    return synthetic.build(config, process_index, process_count)
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
      carry_state=bool(t.carry_state))


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
