"""Generated tasks as a data source: every batch drawn fresh, the loss on answers only.

    --config.data.task=mqar:mix=64x4+128x8+256x16
    --config.data.task=spread_mqar:pairs=16,chunk=16
    --config.data.task=passkey:key=5

`data.task` names a task of `tasks.py` and its settings (`NAME:key=value,...`);
several tasks joined by `|` share every batch (its rows split evenly among them):

| task | settings (defaults) |
| --- | --- |
| `mqar` | `mix=64x4` (rows of T tokens with N pairs, `+`-separated, drawn per row), `queries=random` (or `packed`) |
| `spread_mqar` | `pairs=4`, `chunk=16` (at most one pair per chunk, queries two chunks after) |
| `passkey` | `key=5` (key tokens; filler up to the row's length) |

and for every task `keys=64`, `values=64`, `filler=4` (the vocabulary: EOD, PAD,
QUERY, then filler, key and value ids; `model.vocab_size` must equal its size).
Rows are `train.seq_len` tokens (shorter rows padded); the batch's `mask` is 1
exactly on answer targets, so the trainer's loss, `token_accuracy` and every
evaluation are over answers only. Batch i of a run is drawn from the seed
(`train.seed`, i): a resumed run sees the batches of an uninterrupted one.
The tokenizer is a word-level one over the task's token names (`<|eod|>`,
`<|pad|>`, `<|query|>`, `f0`.., `k0`.., `v0`..), saved as the run's tokenizer.json.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from mmrec_jax.data import tasks
from mmrec_jax.data import tokenizer as tokenizer_lib
from mmrec_jax.errors import ConfigError

NAMES = ("mqar", "spread_mqar", "passkey")
_INTS = ("pairs", "chunk", "key", "keys", "values", "filler")
VAL_SEED = 1 << 30     # held-out batches are drawn from (seed, VAL_SEED + j): never trained on


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A parsed `data.task`."""
  name: str
  mix: tuple = ((64, 4),)
  queries: str = "random"
  pairs: int = 4
  chunk: int = 16
  key: int = 5
  keys: int = 64
  values: int = 64
  filler: int = 4

  @property
  def vocab(self) -> tasks.Vocab:
    return tasks.Vocab(n_keys=self.keys, n_values=self.values, n_filler=self.filler)


def parse(spec: str) -> tuple[TaskSpec, ...]:
  """`NAME[:key=value,...]|...` -> TaskSpecs (one vocabulary); ConfigError naming what
  is wrong."""
  specs = tuple(parse_one(s.strip()) for s in spec.split("|"))
  if len({s.vocab for s in specs}) > 1:
    raise ConfigError(f"data.task={spec!r}: the tasks must share keys, values and filler")
  return specs


def parse_one(spec: str) -> TaskSpec:
  """`NAME[:key=value,...]` -> TaskSpec; ConfigError naming what is wrong."""
  name, _, rest = spec.partition(":")
  if name not in NAMES:
    raise ConfigError(f"data.task={spec!r}: unknown task {name!r}; use one of {', '.join(NAMES)}")
  kw = {}
  for item in filter(None, rest.split(",")):
    k, sep, v = item.partition("=")
    k = k.strip()
    if not sep or k not in ("mix", "queries") + _INTS:
      raise ConfigError(f"data.task={spec!r}: {item!r} is not a setting (use key=value with "
                        f"key one of mix, queries, {', '.join(_INTS)})")
    try:
      if k == "mix":
        kw[k] = tuple(tuple(int(x) for x in p.split("x")) for p in v.split("+"))
        if not all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in kw[k]):
          raise ValueError
      elif k == "queries":
        if v not in ("random", "packed"):
          raise ValueError
        kw[k] = v
      else:
        kw[k] = int(v)
        if kw[k] < 1:
          raise ValueError
    except ValueError:
      raise ConfigError(f"data.task={spec!r}: bad value in {item!r} (mix=TxN+TxN..., "
                        "queries=random|packed, positive integers)") from None
  return TaskSpec(name=name, **kw)


def check(specs, seq_len: int, vocab_size: int):
  """ConfigError if a task does not fit the training length or the model's vocabulary."""
  for spec in specs:
    _check_one(spec, seq_len, vocab_size)


def _check_one(spec: TaskSpec, seq_len: int, vocab_size: int):
  if vocab_size != spec.vocab.size:
    raise ConfigError(f"data.task={spec.name} has a vocabulary of {spec.vocab.size} tokens; set "
                      f"model.vocab_size={spec.vocab.size} (got {vocab_size})")
  if spec.name == "mqar":
    for t, n in spec.mix:
      if t > seq_len:
        raise ConfigError(f"data.task: mqar rows of {t} tokens exceed train.seq_len={seq_len}")
  try:   # a dry draw: the generator's own checks (room for pairs, queries, the key)
    draw((spec,), np.random.default_rng(0), 1, seq_len)
  except ValueError as e:
    raise ConfigError(f"data.task={spec.name}: {e}") from None


TRAIN_KEYS = ("inputs", "targets", "reset", "mask")


def draw(specs, rng, batch: int, seq_len: int) -> dict:
  """One batch of `batch` rows of `seq_len` tokens: the rows split evenly among the
  tasks (in order); one task gives its full dict (`tasks.py`), several the
  trainer's keys only."""
  if len(specs) == 1:
    return draw_one(specs[0], rng, batch, seq_len)
  sizes = [batch // len(specs) + (i < batch % len(specs)) for i in range(len(specs))]
  parts = [draw_one(s, rng, n, seq_len) for s, n in zip(specs, sizes) if n]
  return {k: np.concatenate([p[k] for p in parts]) for k in TRAIN_KEYS}


def draw_one(spec: TaskSpec, rng, batch: int, seq_len: int) -> dict:
  """One batch of one task, rows padded to `seq_len` (mask 0 on the padding)."""
  v = spec.vocab
  if spec.name == "mqar":
    b = tasks.mqar_mix(rng, batch, mix=spec.mix, vocab=v, queries=spec.queries)
  elif spec.name == "spread_mqar":
    b = tasks.spread_mqar(rng, batch, seq_len, spec.pairs, spec.chunk, vocab=v)
  else:
    b = tasks.passkey(rng, batch, seq_len, key_len=spec.key, vocab=v)
  T = b["inputs"].shape[1]
  if T < seq_len:   # pad every [B, T] array to the training length (mask 0 there)
    pad = {"inputs": v.pad, "targets": v.pad, "mask": 0.0, "reset": False}
    for k, fill in pad.items():
      b[k] = np.concatenate([b[k], np.full((batch, seq_len - T), fill, b[k].dtype)], axis=1)
  return b


def token_names(specs) -> list[str]:
  v = specs[0].vocab
  names = [tokenizer_lib.EOD, tokenizer_lib.PAD, "<|query|>"]
  names += [f"f{i}" for i in range(v.n_filler)] + [f"k{i}" for i in range(v.n_keys)]
  names += [f"v{i}" for i in range(v.n_values)]
  assert len(names) == v.size
  return names


def make_tokenizer(specs) -> Tokenizer:
  """A word-level tokenizer whose id i is the task's token i (space-separated names)."""
  names = token_names(specs)
  tok = Tokenizer(tok_models.WordLevel({n: i for i, n in enumerate(names)},
                                       unk_token=tokenizer_lib.PAD))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizer_lib.EOD, tokenizer_lib.PAD])
  return tok


class TaskIterator:
  """Batch i drawn from (seed, i), this process's rows of it; its state is i."""

  def __init__(self, spec, seed, global_batch, seq_len, process_index, process_count):
    self.spec, self.seed, self.B, self.T = spec, seed, global_batch, seq_len
    self.rows = slice(process_index * global_batch // process_count,
                      (process_index + 1) * global_batch // process_count)
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    b = draw(self.spec, np.random.default_rng([self.seed, self.i]), self.B, self.T)
    self.i += 1
    return {k: b[k][self.rows] for k in TRAIN_KEYS}

  def get_state(self):
    return {"batch": self.i}

  def set_state(self, state):
    self.i = int(state["batch"])


@dataclasses.dataclass
class TaskDatasets:
  """The `pipeline.Datasets` surface for generated tasks."""
  spec: tuple
  seed: int
  global_batch: int
  seq_len: int
  steps: int
  process_index: int = 0
  process_count: int = 1

  @property
  def num_train_windows(self):
    return self.steps * self.global_batch   # one pass: the run (no batch is seen twice)

  def train_iter(self):
    return TaskIterator(self.spec, self.seed, self.global_batch, self.seq_len,
                        self.process_index, self.process_count)

  def val_batches(self, max_batches=None):
    n = max_batches or 8
    rows = slice(self.process_index * self.global_batch // self.process_count,
                 (self.process_index + 1) * self.global_batch // self.process_count)
    out = []
    for j in range(n):
      b = draw(self.spec, np.random.default_rng([self.seed, VAL_SEED + j]), self.global_batch,
               self.seq_len)
      out.append({k: b[k][rows] for k in TRAIN_KEYS})
    return out


def build(config, process_index=0, process_count=1) -> TaskDatasets:
  t = config.train
  spec = parse(config.data.task)
  check(spec, t.seq_len, config.model.vocab_size)
  return TaskDatasets(spec, t.seed, t.batch_size, t.seq_len, t.steps, process_index,
                      process_count)
