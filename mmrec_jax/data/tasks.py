"""Learnable synthetic recall tasks: small vocabulary, fresh bindings, loss on answers.

Pure numpy, generated on the fly (every call draws new random bindings from the
`numpy.random.Generator` it is given; the same seed gives the same batches).

Token layout (`Vocab`, every id below `Vocab.size`):

    0                    EOD: the document start (every row begins with it)
    1                    PAD: after a row's content, when rows of a batch differ in length
    2                    QUERY: the query marker (passkey; MQAR with `marker=True`)
    3 .. 3+F-1           F filler ids (spacing; drawn uniformly when F > 1)
    first_key ..         K key ids
    first_value ..       V value ids (every answer is a value id)

With the defaults (F=4, K=V=64) the vocabulary has 135 ids.

A batch is a dict of numpy arrays:

    inputs   [B, T] int32    the tokens the model reads
    targets  [B, T] int32    the next token (inputs shifted by one)
    mask     [B, T] float32  1 exactly where the target is an answer, else 0
    reset    [B, T] bool     True at position 0 (each row is one document)
    answer_pos [B, Q] int32  the positions t with mask 1 (targets[t] is the answer),
                             in sequence order, -1 where a row has fewer
    answer     [B, Q] int32  targets at answer_pos (-1 where none)
    source_pos [B, Q] int32  where the answer was given first: the position of the
                             bound value (MQAR) or of the key token (passkey)
    n_pairs    [B]    int32  MQAR: pairs in the row (passkey: key tokens)
    length     [B]    int32  content length of the row (the rest is PAD)

Train on `mask` (loss = sum(nll * mask) / sum(mask)); score with `score`.

Tasks:
- `mqar`: EOD, N key-value pairs, then Q queries (Q = N by default), each a key
  followed by its value (the answer). Keys are distinct, values distinct, both
  drawn fresh for every row. Which keys are asked (`query_keys`): "uniform"
  (default), each query a key drawn uniformly with replacement; "distinct", Q
  distinct keys in random order (Q = N: every key once, shuffled). With
  "distinct" and Q = N a model that only knows which values the row holds
  scores 1/N, 1/(N-1), ..., 1 on the successive queries by elimination (0.52
  for N = 4; a 2-layer Transformer learns exactly that first); "uniform" leaves
  no such shortcut (1/N). Queries are packed right after the pairs or (default)
  placed at random positions of the rest of the sequence, filler in between
  (as in Zoology's MQAR).
- `mqar_mix`: rows of several (T, N) difficulties in one batch, PAD-padded to
  the longest T.
- `spread_mqar`: pairs spaced by filler, at most one pair per memory chunk of
  `chunk` tokens (chunks aligned to the document start, as `memory.py` cuts
  them), and every query at least two chunks after its pair's chunk: the first
  half of the chunks holds the pairs, one chunk is left empty, the second half
  holds the queries. Any length (e.g. 1x, 4x, 16x a training window).
- `passkey`: EOD, a key of `key_len` value ids, filler, QUERY, the key again
  (each of its tokens an answer).

Chance: `chance(vocab)` is 1/V (guessing a value); `chance_pairs(n)` is 1/N
(knowing which values are in the row but not which key each belongs to);
`chance_elimination(n)` is what that knowledge plus elimination of the values
already answered scores when every key is asked once ("distinct", Q = N).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

EOD = 0
PAD = 1
QUERY = 2
FIRST_FILLER = 3


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The token layout (see the module docstring)."""
  n_keys: int = 64
  n_values: int = 64
  n_filler: int = 4

  eod: int = dataclasses.field(default=EOD, init=False)
  pad: int = dataclasses.field(default=PAD, init=False)
  query: int = dataclasses.field(default=QUERY, init=False)

  def __post_init__(self):
    for f in ("n_keys", "n_values", "n_filler"):
      if not isinstance(getattr(self, f), (int, np.integer)) or getattr(self, f) < 1:
        raise ValueError(f"Vocab.{f} must be a positive integer, got {getattr(self, f)!r}")

  @property
  def first_filler(self) -> int:
    return FIRST_FILLER

  @property
  def first_key(self) -> int:
    return FIRST_FILLER + self.n_filler

  @property
  def first_value(self) -> int:
    return self.first_key + self.n_keys

  @property
  def size(self) -> int:
    """The vocabulary size a model needs (`model.vocab_size`)."""
    return self.first_value + self.n_values

  @property
  def filler_ids(self) -> np.ndarray:
    return np.arange(self.first_filler, self.first_key)

  @property
  def key_ids(self) -> np.ndarray:
    return np.arange(self.first_key, self.first_value)

  @property
  def value_ids(self) -> np.ndarray:
    return np.arange(self.first_value, self.size)

  def is_key(self, t):
    return (np.asarray(t) >= self.first_key) & (np.asarray(t) < self.first_value)

  def is_value(self, t):
    return (np.asarray(t) >= self.first_value) & (np.asarray(t) < self.size)


DEFAULT_VOCAB = Vocab()


def chance(vocab: Vocab = DEFAULT_VOCAB) -> float:
  """Accuracy of a uniform guess among the values."""
  return 1.0 / vocab.n_values


def chance_pairs(n_pairs: int) -> float:
  """Accuracy of a uniform guess among the N values of the row (the 1/N plateau)."""
  return 1.0 / n_pairs


def chance_elimination(n_pairs: int) -> float:
  """Mean of 1/N, 1/(N-1), ..., 1: knowing the row's values and never repeating an
  answer, when every key is asked exactly once (0.52 for N = 4)."""
  return float(np.mean(1.0 / np.arange(1, n_pairs + 1)))


# ------------------------------------------------------------------ assembling


class _Rows:
  """Builds a batch row by row: each row a sequence of T + 1 tokens."""

  def __init__(self, batch, seq_len, vocab, rng):
    self.T, self.vocab, self.rng = seq_len, vocab, rng
    self.seq = np.full((batch, seq_len + 1), vocab.pad, np.int32)
    self.ans = [[] for _ in range(batch)]     # (answer position in inputs, source position)
    self.n_pairs = np.zeros(batch, np.int32)
    self.length = np.zeros(batch, np.int32)

  def filler(self, n):
    v = self.vocab
    return self.rng.integers(v.first_filler, v.first_key, size=n).astype(np.int32)

  def finish(self):
    B, T = self.seq.shape[0], self.T
    Q = max(1, max(len(a) for a in self.ans))
    answer_pos = np.full((B, Q), -1, np.int32)
    source_pos = np.full((B, Q), -1, np.int32)
    mask = np.zeros((B, T), np.float32)
    for b, a in enumerate(self.ans):
      a = sorted(a)
      for j, (p, s) in enumerate(a):
        answer_pos[b, j], source_pos[b, j] = p, s
        mask[b, p] = 1.0
    inputs, targets = self.seq[:, :-1].copy(), self.seq[:, 1:].copy()
    answer = np.where(answer_pos >= 0,
                      np.take_along_axis(targets, np.maximum(answer_pos, 0), axis=1), -1)
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    return {"inputs": inputs, "targets": targets, "mask": mask, "reset": reset,
            "answer_pos": answer_pos, "answer": answer.astype(np.int32),
            "source_pos": source_pos, "n_pairs": self.n_pairs.copy(),
            "length": self.length.copy()}


def _bindings(rng, vocab, n):
  if n > vocab.n_keys or n > vocab.n_values:
    raise ValueError(f"{n} pairs need {n} distinct keys and values; the vocabulary has "
                     f"{vocab.n_keys} keys and {vocab.n_values} values")
  keys = rng.choice(vocab.key_ids, size=n, replace=False).astype(np.int32)
  values = rng.choice(vocab.value_ids, size=n, replace=False).astype(np.int32)
  return keys, values


QUERY_KEYS = ("uniform", "distinct")


def _query_order(rng, n_pairs, n_queries, query_keys):
  """Which pair each query asks for."""
  q = n_pairs if n_queries is None else n_queries
  if query_keys == "uniform":
    if q < 1:
      raise ValueError(f"n_queries={n_queries} must be >= 1")
    return rng.integers(0, n_pairs, size=q)
  if query_keys != "distinct":
    raise ValueError(f"query_keys={query_keys!r}: use one of {', '.join(QUERY_KEYS)}")
  if not 1 <= q <= n_pairs:
    raise ValueError(f"n_queries={n_queries} must be in [1, n_pairs={n_pairs}]")
  return rng.permutation(n_pairs)[:q]


def _mqar_row(rows, b, seq_len, n_pairs, n_queries, queries, marker, query_keys):
  """One MQAR row of content length seq_len + 1 (its last token a target only)."""
  rng, vocab = rows.rng, rows.vocab
  keys, values = _bindings(rng, vocab, n_pairs)
  order = _query_order(rng, n_pairs, n_queries, query_keys)
  s = rows.seq[b]
  s[0] = vocab.eod
  s[1:1 + 2 * n_pairs:2], s[2:2 + 2 * n_pairs:2] = keys, values
  start = 1 + 2 * n_pairs
  if marker:
    s[start] = vocab.query
    start += 1
  room = seq_len + 1 - start            # tokens left for queries and filler
  q = len(order)
  if room < 2 * q:
    raise ValueError(f"MQAR: seq_len={seq_len} is too short for {n_pairs} pairs and {q} "
                     f"queries (needs >= {start + 2 * q - 1})")
  s[start:seq_len + 1] = rows.filler(room)
  if queries == "packed":
    offs = 2 * np.arange(q)
  elif queries == "random":
    # q slots of 2 tokens among `room` tokens: choose the gaps (stars and bars)
    gaps = np.sort(rng.choice(room - 2 * q + q, size=q, replace=False)) - np.arange(q)
    offs = gaps + 2 * np.arange(q)
  else:
    raise ValueError(f"queries={queries!r}: use 'random' or 'packed'")
  for o, i in zip(offs, order):
    p = start + int(o)
    s[p], s[p + 1] = keys[i], values[i]
    rows.ans[b].append((p, 2 + 2 * int(i)))   # the answer's target is at p; bound value at 2+2i
  rows.n_pairs[b] = n_pairs
  rows.length[b] = seq_len


# ------------------------------------------------------------------ tasks


def mqar(rng: np.random.Generator, batch: int, seq_len: int = 64, n_pairs: int = 4,
         vocab: Vocab = DEFAULT_VOCAB, n_queries: int | None = None, queries: str = "random",
         marker: bool = False, query_keys: str = "uniform") -> dict:
  """Multi-query associative recall: EOD k1 v1 ... kN vN, then `n_queries`
  queries k v (None: N; the value the answer), their keys drawn uniformly with
  replacement (`query_keys="uniform"`) or distinct (`"distinct"`: a random subset,
  all keys shuffled when n_queries is N), placed at random positions of the rest
  (`queries="random"`, filler between) or right after the pairs (`"packed"`,
  filler after). `marker`: a QUERY token between the pairs and the queries.
  Returns the batch dict (module docstring)."""
  rows = _Rows(batch, seq_len, vocab, rng)
  for b in range(batch):
    _mqar_row(rows, b, seq_len, n_pairs, n_queries, queries, marker, query_keys)
  return rows.finish()


def mqar_mix(rng: np.random.Generator, batch: int,
             mix: Sequence[tuple[int, int]] = ((64, 4), (128, 8), (256, 16)),
             vocab: Vocab = DEFAULT_VOCAB, n_queries: int | None = None,
             queries: str = "random", marker: bool = False, weights=None,
             query_keys: str = "uniform") -> dict:
  """MQAR rows of mixed difficulty: each row draws one (T, N) of `mix` (uniformly,
  or by `weights`) and is PAD-padded to the longest T of `mix` (mask 0 there).
  `n_pairs` and `length` say which difficulty each row has."""
  mix = [(int(t), int(n)) for t, n in mix]
  T = max(t for t, _ in mix)
  rows = _Rows(batch, T, vocab, rng)
  which = rng.choice(len(mix), size=batch, p=weights)
  for b in range(batch):
    t, n = mix[which[b]]
    _mqar_row(rows, b, t, n, n_queries, queries, marker, query_keys)
  return rows.finish()


def spread_mqar(rng: np.random.Generator, batch: int, seq_len: int, n_pairs: int,
                chunk: int, vocab: Vocab = DEFAULT_VOCAB, n_queries: int | None = None,
                query_keys: str = "uniform") -> dict:
  """MQAR for a memory of chunk summaries. The input positions are cut into chunks
  of `chunk` tokens from the document start (position 0). Each pair (key, value)
  lies inside one chunk, at a random offset, and no chunk holds two pairs: the
  pairs take distinct random chunks of the first H - 1 chunks (H = n_chunks // 2),
  chunk H - 1 holds filler only, and the queries (key then value, the value the
  answer) lie at random positions of chunks H .. n_chunks - 1, in random order.
  So every query is at least two chunks after its pair. Filler everywhere else.
  Needs seq_len a multiple of chunk, chunk >= 3, n_pairs <= H - 1 and room for
  the queries."""
  if chunk < 3 or seq_len % chunk:
    raise ValueError(f"spread_mqar: seq_len={seq_len} must be a multiple of chunk={chunk} >= 3")
  n_chunks = seq_len // chunk
  H = n_chunks // 2
  q = n_pairs if n_queries is None else n_queries
  if n_pairs > H - 1:
    raise ValueError(f"spread_mqar: {n_pairs} pairs need >= {n_pairs + 1} chunks before the "
                     f"queries; seq_len={seq_len} / chunk={chunk} gives {H - 1} (one pair per "
                     f"chunk in the first half, one empty chunk)")
  q_start, q_end = H * chunk, seq_len          # queries' keys and values in [q_start, q_end)
  room = q_end - q_start
  if room < 2 * q:
    raise ValueError(f"spread_mqar: {q} queries do not fit in {room} tokens")
  rows = _Rows(batch, seq_len, vocab, rng)
  for b in range(batch):
    keys, values = _bindings(rng, vocab, n_pairs)
    order = _query_order(rng, n_pairs, n_queries, query_keys)
    s = rows.seq[b]
    s[:] = rows.filler(seq_len + 1)
    s[0] = vocab.eod
    chunks = rng.choice(H - 1, size=n_pairs, replace=False)
    pair_pos = np.empty(n_pairs, np.int64)
    for i, c in enumerate(chunks):
      lo = 1 if c == 0 else 0                  # position 0 is EOD
      p = int(c) * chunk + int(rng.integers(lo, chunk - 1))   # key at p, value at p+1 <= c*chunk+C-1
      s[p], s[p + 1] = keys[i], values[i]
      pair_pos[i] = p
    gaps = np.sort(rng.choice(room - q, size=q, replace=False)) - np.arange(q)
    offs = gaps + 2 * np.arange(q)
    for o, i in zip(offs, order):
      p = q_start + int(o)
      s[p], s[p + 1] = keys[i], values[i]
      rows.ans[b].append((p, int(pair_pos[i]) + 1))
    rows.n_pairs[b] = n_pairs
    rows.length[b] = seq_len
  return rows.finish()


def passkey(rng: np.random.Generator, batch: int, seq_len: int = 64, key_len: int = 5,
            vocab: Vocab = DEFAULT_VOCAB, distance: int | None = None) -> dict:
  """EOD, a key of `key_len` value ids (uniform, with repetition), `distance`
  filler tokens (None: as many as fill seq_len), QUERY, the key again: each of
  the key's tokens after QUERY is an answer. PAD after when the content is
  shorter than seq_len."""
  need = 2 * key_len + 1           # EOD, key, QUERY, key minus the last (a target only)
  if distance is None:
    distance = seq_len - need
  if distance < 0 or need + distance > seq_len:
    raise ValueError(f"passkey: seq_len={seq_len} is too short for key_len={key_len} and "
                     f"distance={distance} (needs {need + distance})")
  rows = _Rows(batch, seq_len, vocab, rng)
  for b in range(batch):
    key = rng.integers(vocab.first_value, vocab.size, size=key_len).astype(np.int32)
    s = rows.seq[b]
    s[0] = vocab.eod
    s[1:1 + key_len] = key
    s[1 + key_len:1 + key_len + distance] = rows.filler(distance)
    qp = 1 + key_len + distance
    s[qp] = vocab.query
    s[qp + 1:qp + 1 + key_len] = key
    for j in range(key_len):
      rows.ans[b].append((qp + j, 1 + j))
    rows.n_pairs[b] = key_len
    rows.length[b] = need + distance
  return rows.finish()


# ------------------------------------------------------------------ scoring


def score(pred_BT, batch) -> dict:
  """Greedy predictions [B, T] (argmax of the logits) scored on the answers:
  `acc` (fraction of answer tokens right), `exact` (fraction of rows with every
  answer right), `n` (answer tokens), `correct_BQ` (bool, per answer in
  answer_pos order; False where there is none) and `acc_by_pairs` ({N: acc})."""
  pred_BT = np.asarray(pred_BT)
  pos = batch["answer_pos"]
  has = pos >= 0
  got = np.take_along_axis(pred_BT, np.maximum(pos, 0), axis=1)
  correct = (got == batch["answer"]) & has
  n = int(has.sum())
  row_ok = (correct | ~has).all(axis=1)
  by = {}
  for k in np.unique(batch["n_pairs"]):
    r = batch["n_pairs"] == k
    by[int(k)] = float(correct[r].sum() / max(1, has[r].sum()))
  return {"acc": float(correct.sum() / max(1, n)), "exact": float(row_ok.mean()), "n": n,
          "correct_BQ": correct, "acc_by_pairs": by}
