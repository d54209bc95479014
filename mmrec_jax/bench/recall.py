"""Long-range recall: passkey retrieval and multi-query associative recall (MQAR).

    python -m mmrec_jax.bench.recall [--tasks=passkey,mqar] [--arms=mmrec,mmrec_nomem,transformer]
        [--steps=1000] [--batch=8] [--seq_len=256] [--curriculum=128:2000] [--out=runs/recall]
        [--json]

Held-out text cannot tell a working long-term memory from a broken one; these
two synthetic tasks can. The benchmark writes its own data (no download),
trains every arm once with the project's trainer on the same generated stream
(documents of both tasks interleaved) and tokenizer, then scores greedy
answers on fresh examples:

- passkey: "the pass key is 3 8 1 9 0 . remember it ." then `distance` tokens
  of filler sentences, then "what is the pass key ? the pass key is 3 8 1 9 0 .".
  Trained at distances up to the training length; scored (exact match of all
  `--key_digits` digits, greedy) at `--distances`, by default up to 16x the
  training length. Chance is 10**-key_digits.
- mqar: N key-value pairs of one-token words, then every key again (shuffled)
  each followed by its value. Trained with N up to `--train_pairs`; scored as
  the fraction of values predicted (greedy) at each N of `--pairs`. A model that
  remembers nothing scores about 1/64 (the value vocabulary).
- multikey (`--tasks=multikey`, not run by default): `--keys` labelled keys
  ("the pass key bav is 3 .", a few filler tokens after each), then `distance`
  tokens of filler, then every label asked for in random order ("what is the
  pass key bav ? the pass key bav is 3 ."); scored as the fraction of keys
  given exactly. One key fits in any state; several keys, each to be found by
  its label, are what a memory read by attention is for. Chance is
  10**-key_digits (a model that holds one key and answers it everywhere
  scores about 1/keys).

`--curriculum=LEN:STEPS,...` trains stages at other lengths first (each on its
own documents within its length, from the previous stage's parameters, fresh
optimizer); the main stage (`--seq_len`, `--steps`) comes last and sets the
training length the distances are compared with.

Arms: MM-Rec tiny (`configs/tiny.py`), also scored with its memory's read-out
zeroed after training (`mmrec/read_off`: does the trained model use its
memory?) and, with `--eval_mem_slots=N`, with N slots per level
(`mmrec/slotsN`); the same trained with its long-term memory off
(`model.mem_levels=0`), the Transformer of the same size
(`configs/baselines/transformer_tiny.py`, its KV cache holding the whole
evaluation sequence), and optionally `mmrec_bigmem` (16 slots per level) and
the memory probes of the README's Recall section (`mmrec_c16`: chunks of 16
tokens; `_qk`: `mem_qk_norm`; `_exp`: `mem_pool="exp"`; `_logn`:
`mem_read_logn`; `_zr`: `mem_out_init=0`; `_sink`: `mem_sink`; `mmrec_c8`,
`mmrec_c16s2`; these probes, and `mmrec_v0`, keep the memory's defaults until
2026-11-28: `mem_out_init=1`, `mem_lr_scale=1`).
Every arm uses the task tokenizer (one BPE trained on the generated text, each
word one token), so `model.vocab_size` is that tokenizer's size.

Evaluation streams each sequence in pieces of the training length with the
state carried, as decoding does. Prints a table per task, writes `recall.png`
and `recall.json` in `--out`; `--json` prints one JSON object on the last line:
for one task `{"task": T, "arms": {arm: {"<distance or pairs>": accuracy}}}`;
for several tasks the task is "passkey,mqar" and the keys "passkey:<distance>",
"mqar:<pairs>". Re-running reuses finished training runs in `--out`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mmrec_jax import bench
from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax import loading
from mmrec_jax import models
from mmrec_jax import tokenizer as tok_lib
from mmrec_jax import workdir as workdir_lib
from mmrec_jax.errors import UsageError

_V0, _C16 = bench.V0, bench.C16   # the memory's defaults until 2026-11-28; chunks of 16
ARMS = dict(
    bench.ARMS,
    mmrec_bigmem=("configs/tiny.py", dict(_V0, mem_slots=16)),
    mmrec_qknorm=("configs/tiny.py", dict(_V0, mem_qk_norm=True)),
    # the probes of the README's Recall section: chunk size, slots, pooling, read
    mmrec_c8=("configs/tiny.py", dict(_V0, chunk_size=8, mem_levels=6)),
    mmrec_c16s2=("configs/tiny.py", dict(_C16, **_V0, mem_slots=2, mem_levels=8)),
    mmrec_c16exp=("configs/tiny.py", dict(_V0, **_C16, mem_pool="exp")),
    mmrec_c16qk=("configs/tiny.py", dict(_V0, **_C16, mem_qk_norm=True)),
    mmrec_c16qkexp=("configs/tiny.py", dict(_V0, **_C16, mem_qk_norm=True, mem_pool="exp")),
    # the best read setting with its read-out initialised at zero (`mem_out_init`)
    mmrec_c16logn_zr=("configs/tiny.py", dict(bench.ARMS["mmrec_c16logn"][1], mem_out_init=0.0)),
    # ... and with a null slot every read also sees (`mem_sink`)
    mmrec_c16logn_sink=("configs/tiny.py", dict(bench.ARMS["mmrec_c16logn"][1], mem_sink=True)),
    # ... and with normalised queries and keys (`mem_qk_norm`: more gradient to the keys)
    mmrec_c16logn_qk=("configs/tiny.py", dict(bench.ARMS["mmrec_c16logn"][1], mem_qk_norm=True)),
    # ... and with the memory's defaults of now (read-out at zero, a tenth of the lr)
    mmrec_c16logn_new=("configs/tiny.py", dict(_C16, mem_read_logn=True)),
)
TASKS = ("passkey", "mqar", "multikey")
FILLER = ("the grass is green . the sky is blue . the sun is yellow . here we go . "
          "there and back again .").split()
N_WORDS = 64   # MQAR: distinct keys, and distinct values

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs, so importing this module defines none)."""
  flags.DEFINE_list("tasks", ["passkey", "mqar"], f"Tasks to run: {', '.join(TASKS)}.")
  flags.DEFINE_list("arms", ["mmrec", "mmrec_nomem", "transformer"],
                    f"Arms to train ({', '.join(ARMS)}).")
  flags.DEFINE_integer("steps", 1000, "Training steps per arm (one stream of all --tasks).")
  flags.DEFINE_integer("seq_len", 256, "Training length (tokens per sequence).")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
  flags.DEFINE_integer("seed", 0, "Seed of the data, the initialisation and the data order.")
  flags.DEFINE_integer("key_digits", 5, "Passkey digits.")
  flags.DEFINE_list("distances", ["64", "256", "1024", "4096"],
                    "Passkey: filler tokens between the key and the question, evaluated.")
  flags.DEFINE_integer("train_pairs", 48, "MQAR: most key-value pairs in a training sequence.")
  flags.DEFINE_list("pairs", ["8", "16", "32", "48"], "MQAR: numbers of pairs evaluated.")
  flags.DEFINE_integer("keys", 4, "multikey: labelled keys per document, all asked for "
                       "after the filler.")
  flags.DEFINE_integer("examples", 64, "Fresh evaluation examples per distance / number of pairs.")
  flags.DEFINE_string("out", "runs/recall", "Output folder (generated data, one workdir per run).")
  flags.DEFINE_integer("train_span", 0, "Passkey: every other training document is up to "
                       "this many tokens (0: all within --seq_len); those longer than "
                       "--seq_len need --carry_state to be learnable.")
  flags.DEFINE_bool("carry_state", False, "Train the MM-Rec arms with train.carry_state (each "
                    "row's state carried across windows; the Transformer arm trains without).")
  flags.DEFINE_integer("eval_mem_slots", 0, "Also score each MM-Rec arm with this many memory "
                       "slots per level (no parameter depends on it; 0: only as trained).")
  flags.DEFINE_list("curriculum", [], "Stages trained before the main one, each LEN:STEPS "
                    "(e.g. 128:2000): STEPS steps at training length LEN on documents within "
                    "LEN; each stage starts from the previous one's parameters (fresh "
                    "optimizer, its own warmup), the main stage (--seq_len, --steps) last.")
  flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last line.")


# ------------------------------------------------------------------ the tasks


def word_lists():
  """64 key words and 64 value words: consonant-vowel-consonant, disjoint, fixed."""
  cons, vows = "bdfgklmnprstvz", "aeiou"
  words = [a + b + c for a in cons for b in vows for c in cons]
  order = np.random.default_rng(1234).permutation(len(words))
  words = [words[i] for i in order]
  return words[:N_WORDS], words[N_WORDS:2 * N_WORDS]


def filler(rng, n):
  start = int(rng.integers(len(FILLER)))
  return [FILLER[(start + i) % len(FILLER)] for i in range(n)]


def passkey_doc(rng, distance, digits):
  """(text, number of answer tokens at the end, before the final '.')."""
  key = [str(d) for d in rng.integers(0, 10, digits)]
  words = (["the", "pass", "key", "is"] + key + [".", "remember", "it", "."]
           + filler(rng, distance) + ["what", "is", "the", "pass", "key", "?", "the", "pass",
                                      "key", "is"] + key + ["."])
  return " ".join(words)


def mqar_doc(rng, n_pairs, keys, values):
  ks = rng.choice(len(keys), n_pairs, replace=False)
  vs = rng.integers(0, len(values), n_pairs)
  words = ["the"]   # every document starts with "the": each pair word has its leading space
  for k, v in zip(ks, vs):
    words += [keys[k], values[v]]
  words.append(".")
  for j in rng.permutation(n_pairs):
    words += [keys[ks[j]], values[vs[j]]]
  words.append(".")
  return " ".join(words)


KEY_GAP = 8   # multikey: at most this many filler tokens between two key statements


def multikey_doc(rng, distance, digits, n_keys, labels):
  """(text, indices of the answer words): `n_keys` labelled keys ("the pass key
  <label> is 3 ."), each followed by up to KEY_GAP filler tokens, then `distance`
  tokens of filler, then every label asked for in random order ("what is the pass
  key <label> ? the pass key <label> is 3 ."). A state that holds one key is not
  enough: each question needs the key stored under its label."""
  which = rng.choice(len(labels), n_keys, replace=False)
  keys = [[str(d) for d in rng.integers(0, 10, digits)] for _ in range(n_keys)]
  words = []
  for j in range(n_keys):
    words += ["the", "pass", "key", labels[which[j]], "is"] + keys[j] + ["."]
    words += filler(rng, int(rng.integers(0, KEY_GAP + 1)))
  words += filler(rng, distance)
  answers = []
  for j in rng.permutation(n_keys):
    words += ["what", "is", "the", "pass", "key", labels[which[j]], "?", "the", "pass", "key",
              labels[which[j]], "is"]
    answers += range(len(words), len(words) + digits)
    words += keys[j] + ["."]
  return " ".join(words), answers


def multikey_overhead(digits, n_keys):
  """Tokens of a multikey document besides its `distance` filler, at most (+ <|eod|>)."""
  return n_keys * (6 + digits + KEY_GAP) + n_keys * (13 + digits) + 1


def train_docs(task, rng, n_tokens, seq_len, key_digits=5, train_pairs=48, span=None,
               n_keys=4):
  """Training documents of about `n_tokens` tokens, each shorter than `seq_len`; with
  a passkey `span` > `seq_len`, every other document is up to `span` tokens long
  (the rest stay within `seq_len`, where one window holds key and question)."""
  docs, total = [], 0
  keys, values = word_lists()
  while total < n_tokens:
    if task == "passkey":
      overhead = 24 + 2 * key_digits
      longest = span if span and span > seq_len and len(docs) % 2 else seq_len
      d = passkey_doc(rng, int(rng.integers(0, max(1, longest - overhead))), key_digits)
    elif task == "multikey":
      room = max(1, seq_len - multikey_overhead(key_digits, n_keys))
      d, _ = multikey_doc(rng, int(rng.integers(0, room)), key_digits, n_keys, keys)
    else:
      hi = min(train_pairs, (seq_len - 4) // 4)
      d = mqar_doc(rng, int(rng.integers(2, hi + 1)), keys, values)
    docs.append(d)
    total += d.count(" ") + 2
  return docs


def write_docs(path, docs):
  workdir_lib.atomic_write(path, "\n\n".join(docs) + "\n")


def make_tokenizer(out):
  """One BPE for both tasks in which every word is one token (checked)."""
  path = os.path.join(out, "tokenizer.json")
  keys, values = word_lists()
  words = FILLER + [str(d) for d in range(10)] + keys + values + [
      "the", "pass", "key", "is", "remember", "it", "what", "?"]
  if os.path.isfile(path):
    tok = tok_lib.load_tokenizer(path)
  else:
    rng = np.random.default_rng(0)
    texts = train_docs("passkey", rng, 200_000, 256) + train_docs("mqar", rng, 200_000, 256)
    tok = tok_lib._train_up_to(texts, 2048)  # pylint: disable=protected-access
    tok_lib.save_tokenizer(tok, path)
  for text in ["the"] + ["the " + w for w in sorted(set(words))]:
    ids = tok.encode(text).ids
    if len(ids) != text.count(" ") + 1:
      raise UsageError(f"the recall tokenizer splits {text!r} into {len(ids)} tokens; delete "
                       f"{path} and rerun")
  return tok, path


# ------------------------------------------------------------------ training


def arm_config(arm, stream, tok, tok_path, data_dir, seq_len, steps):
  c = bench.load_arm(arm, ARMS)
  c.model.vocab_size = tok.get_vocab_size()
  c.model.max_seq_len = max(c.model.max_seq_len, seq_len)
  c.data.path = os.path.join(data_dir, f"{stream}_train.txt")
  c.data.val_path = os.path.join(data_dir, f"{stream}_val.txt")
  c.data.tokenizer = tok_path
  c.data.cache_dir = os.path.join(data_dir, "cache")
  t = c.train
  t.seed, t.seq_len, t.batch_size, t.steps, t.lr = (FLAGS.seed, seq_len, FLAGS.batch,
                                                    steps, FLAGS.lr)
  t.warmup_steps = max(1, steps // 10)
  t.eval_every = steps
  t.eval_batches = 4
  t.log_every = max(1, steps // 10)
  t.samples = 0
  c.checkpoint.every = steps
  t.carry_state = FLAGS.carry_state and c.model.kind == "mmrec"
  return config_lib.validate(c)


# ------------------------------------------------------------------ evaluation


def eval_set(task, x, tok, rng, examples, seq_len, key_digits=5, n_keys=4):
  """(ids [N, T] right-padded to a multiple of `seq_len`, answer positions [N, A])
  of `examples` fresh examples at distance / number of pairs `x`."""
  keys, values = word_lists()
  eod, pad = tok.token_to_id(tok_lib.EOD), tok.token_to_id(tok_lib.PAD)
  seqs, answers = [], []
  for _ in range(examples):
    if task == "passkey":
      ids = [eod] + tok.encode(passkey_doc(rng, x, key_digits)).ids
      n = len(ids)
      ans = list(range(n - 1 - key_digits, n - 1))
    elif task == "multikey":
      doc, ans = multikey_doc(rng, x, key_digits, n_keys, keys)
      ids = [eod] + tok.encode(doc).ids
      ans = [a + 1 for a in ans]   # after the <|eod|>
    else:
      ids = [eod] + tok.encode(mqar_doc(rng, x, keys, values)).ids
      n = len(ids)
      ans = list(range(n - 1 - 2 * x + 1, n - 1, 2))   # the value after each queried key
    seqs.append(ids)
    answers.append(ans)
  L = seq_len
  T = -(-(max(map(len, seqs)) + 1) // L) * L
  ids_NT = np.full((len(seqs), T), pad, np.int32)
  for i, s in enumerate(seqs):
    ids_NT[i, :len(s)] = s
  return ids_NT, np.asarray(answers, np.int32)


def accuracy(model, variables, task, ids_NT, ans_NA, eod, seq_len, batch=16, key_digits=1):
  """Greedy answers scored in pieces of `seq_len` tokens, state carried: for
  passkey the fraction of keys whose every digit is right, for multikey the
  fraction of asked keys (of `key_digits` digits each) whose every digit is
  right, for MQAR the fraction of queried values."""
  L = seq_len
  N, T = ids_NT.shape
  cfg = getattr(model, "cfg", None)
  if hasattr(cfg, "cache_len"):   # the Transformer: a KV cache of the whole sequence
    model = type(model)(dataclasses.replace(cfg, cache_len=T))

  @jax.jit
  def piece(variables, x_BT, state):
    logits_BTV, state, _ = model.apply(variables, x_BT, state=state, reset=x_BT == eod)
    return jnp.argmax(logits_BTV, axis=-1), state

  pred_NT = np.zeros_like(ids_NT)
  for b0 in range(0, N, batch):
    x = ids_NT[b0:b0 + batch]
    n = len(x)
    if n < batch:
      x = np.concatenate([x, np.full((batch - n, T), eod, np.int32)])
    state = model.init_state(batch)
    for k in range(0, T, L):
      p, state = piece(variables, x[:, k:k + L], state)
      pred_NT[b0:b0 + n, k:k + L] = np.asarray(p)[:n]
  # the answer token at position a is predicted at a - 1
  ok_NA = np.take_along_axis(pred_NT, ans_NA - 1, 1) == np.take_along_axis(ids_NT, ans_NA, 1)
  if task == "passkey":
    return float(np.mean(np.all(ok_NA, axis=1)))   # exact match of the whole key
  if task == "multikey":
    return float(np.mean(np.all(ok_NA.reshape(len(ok_NA), -1, key_digits), axis=2)))
  return float(np.mean(ok_NA))                      # fraction of queries answered


def read_off(variables):
  """The variables with the memory's read-out zeroed: the memory is written and
  read as before, but what it reads no longer reaches the block. Scoring a
  trained model this way shows whether it uses its memory."""
  def zero(path, x):
    keys = [getattr(k, "key", None) for k in path]
    return jnp.zeros_like(x) if "memory" in keys and "out" in keys else x
  return jax.tree_util.tree_map_with_path(zero, variables)


# ------------------------------------------------------------------ report


def parse_curriculum(items):
  """[(seq_len, steps)] of `--curriculum` items LEN:STEPS."""
  stages = []
  for item in items:
    a, sep, b = item.partition(":")
    if not (sep and a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0):
      raise UsageError(f"--curriculum: {item!r} is not LEN:STEPS with positive integers "
                       "(e.g. --curriculum=128:2000)")
    stages.append((int(a), int(b)))
  return stages


def make_stream(data_dir, stream, tasks, seq_len, steps, stage, last):
  """Writes (once per setting) the training and held-out documents of one stage;
  returns (its file name stem, its tag). The main stage (`last`) keeps the
  stem and seed it had before curricula existed, so its data are unchanged."""
  name = stream if last else f"{stream}_stage{stage}"
  n_train = steps * FLAGS.batch * seq_len
  span = (FLAGS.train_span if last else 0) or seq_len
  tag = (f"{stream} seed={FLAGS.seed} seq_len={seq_len} tokens={n_train} "
         f"key_digits={FLAGS.key_digits} train_pairs={FLAGS.train_pairs} span={span} mix=half"
         + (f" keys={FLAGS.keys}" if "multikey" in tasks else ""))
  tag_path = os.path.join(data_dir, f"{name}.tag")
  if not os.path.isfile(tag_path) or open(tag_path).read() != tag:
    seed = [FLAGS.seed, len(tasks)] + ([] if last else [100 + stage])
    rng = np.random.default_rng(seed)
    for split, n in (("train", int(n_train * 1.1)), ("val", 8 * FLAGS.batch * seq_len)):
      docs = [d for task in tasks for d in train_docs(
          task, rng, n // len(tasks), seq_len, FLAGS.key_digits, FLAGS.train_pairs, span,
          FLAGS.keys)]
      write_docs(os.path.join(data_dir, f"{name}_{split}.txt"),
                 [docs[i] for i in rng.permutation(len(docs))])
    workdir_lib.atomic_write(tag_path, tag)
  return name, tag


# Training options added after recall runs were first keyed, with their "off" value.
NEW_TRAIN_OPTIONS = {"lr_scales": ""}


# Model fields whose default changed after recall runs were first keyed, with the
# value they had then: a run keys them against that value, so a run at today's
# default never takes the key (and the workdir) of one trained at the old one.
KEYED_DEFAULTS = {"mmrec": dict(bench.V0)}


def run_key(c):
  """The config as a dict, without the model fields at their keyed defaults (the
  schema's, or `KEYED_DEFAULTS` where a default changed since), nor the training
  options added since, when off: a new option, off by default, does not change
  the key of runs made before it."""
  d = c.to_dict()
  kind = d["model"]["kind"]
  fields = {f.name: f.default for f in dataclasses.fields(models.schema(kind))}
  fields.update(KEYED_DEFAULTS.get(kind, {}))
  d["model"] = {k: v for k, v in d["model"].items()
                if k == "kind" or k not in fields or fields[k] != v}
  d["train"] = {k: v for k, v in d["train"].items() if k not in NEW_TRAIN_OPTIONS
                or v != NEW_TRAIN_OPTIONS[k]}
  return d


def plot(path, results, tasks, arms):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for arm in arms:
      xs = sorted(results[task][arm], key=int)
      ax.plot([int(x) for x in xs], [results[task][arm][x] for x in xs],
              "x:" if arm.endswith("/read_off") else "o-", label=arm)
    if task in ("passkey", "multikey"):
      ax.set_xscale("log", base=2)
      ax.axvline(FLAGS.seq_len, color="gray", linestyle="--", label="training length")
      ax.set_xlabel("distance from key to question (tokens)" if task == "passkey" else
                    "distance from the last key to the first question (tokens)")
      ax.set_ylabel("exact-match accuracy")
      ax.set_title(f"Passkey ({FLAGS.key_digits} digits)" if task == "passkey" else
                   f"{FLAGS.keys} labelled keys ({FLAGS.key_digits} digits each)")
    else:
      ax.set_xlabel("key-value pairs")
      ax.set_ylabel("fraction of queries answered")
      ax.set_title("Multi-query associative recall")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  tasks, arms = FLAGS.tasks, FLAGS.arms
  for t in tasks:
    if t not in TASKS:
      raise UsageError(f"--tasks: unknown task {t!r}; use {', '.join(TASKS)}")
  for a in arms:
    if a not in ARMS:
      raise UsageError(f"--arms: unknown arm {a!r}; use {', '.join(ARMS)}")
  distances = [int(x) for x in FLAGS.distances]
  xs = {"passkey": distances, "multikey": distances, "mqar": [int(x) for x in FLAGS.pairs]}
  if "mqar" in tasks and not all(1 <= x <= N_WORDS for x in xs["mqar"]):
    raise UsageError(f"--pairs: each must be in 1..{N_WORDS} (the key vocabulary)")
  if FLAGS.eval_mem_slots < 0:
    raise UsageError("--eval_mem_slots must be >= 0 (0: score only the trained memory size)")
  if not all(x >= 0 for x in distances) or FLAGS.key_digits < 1:
    raise UsageError("--distances must be >= 0 and --key_digits >= 1")
  stages = parse_curriculum(FLAGS.curriculum) + [(FLAGS.seq_len, FLAGS.steps)]
  if "multikey" in tasks:
    if not 1 <= FLAGS.keys <= N_WORDS:
      raise UsageError(f"--keys must be in 1..{N_WORDS} (the label vocabulary)")
    need = multikey_overhead(FLAGS.key_digits, FLAGS.keys) + 1
    if min(n for n, _ in stages) < need:
      raise UsageError(f"--keys={FLAGS.keys} with --key_digits={FLAGS.key_digits} needs a "
                       f"training length of at least {need} tokens (--seq_len, --curriculum)")
  out = FLAGS.out
  data_dir = os.path.join(out, "data")
  os.makedirs(data_dir, exist_ok=True)
  tok, tok_path = make_tokenizer(data_dir)
  eod = tok.token_to_id(tok_lib.EOD)
  rng_eval = {t: np.random.default_rng([FLAGS.seed, 1000 + i]) for i, t in enumerate(TASKS)}
  # One training stream per stage: documents of the chosen tasks, interleaved at random.
  stream = "+".join(tasks)
  streams = [make_stream(data_dir, stream, tasks, seq_len, steps, i, last=i == len(stages) - 1)
             for i, (seq_len, steps) in enumerate(stages)]
  n_train = sum(FLAGS.batch * seq_len * steps for seq_len, steps in stages)
  sets = {task: {x: eval_set(task, x, tok, rng_eval[task], FLAGS.examples, FLAGS.seq_len,
                             FLAGS.key_digits, FLAGS.keys) for x in xs[task]} for task in tasks}
  plan = " then ".join(f"{steps} steps of {FLAGS.batch} x {seq_len}" for seq_len, steps in stages)
  print(f"recall: tasks {', '.join(tasks)} (one training stream); arms {', '.join(arms)}; "
        f"{plan} = {n_train:,} training tokens per arm; vocabulary {tok.get_vocab_size()}; "
        f"{FLAGS.examples} evaluation examples per cell", flush=True)
  results = {t: {} for t in tasks}
  info = {}
  for arm in arms:
    t0 = time.time()
    parent, params = None, None
    for i, (name, tag) in enumerate(streams):
      seq_len, steps = stages[i]
      c = arm_config(arm, name, tok, tok_path, data_dir, seq_len, steps)
      # one workdir per setting (and per earlier stages), so a rerun with other
      # settings never reuses a run
      key = [tag, run_key(c)] + ([parent] if parent else [])
      run_id = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
      suffix = f"_stage{i}" if i < len(streams) - 1 else ""
      workdir = os.path.join(out, f"{arm}_{run_id}{suffix}")
      r = bench.train_arm(c, workdir, init_from=params)
      parent, params = run_id, r.params
    train_s = time.time() - t0
    model, variables, _, _ = loading.load(workdir, "latest")
    t1 = time.time()
    evaluated = {arm: (model, variables)}
    if getattr(model.cfg, "mem_levels", 0):   # the same model with its memory read zeroed
      evaluated[f"{arm}/read_off"] = (model, read_off(variables))
      if FLAGS.eval_mem_slots:   # the same weights with more (or fewer) slots per level
        evaluated[f"{arm}/slots{FLAGS.eval_mem_slots}"] = (models.build(dataclasses.replace(
            model.cfg, mem_slots=FLAGS.eval_mem_slots)), variables)
    for name, (m, v) in evaluated.items():
      for task in tasks:
        results[task][name] = {str(x): accuracy(m, v, task, *sets[task][x], eod,
                                                FLAGS.seq_len, key_digits=FLAGS.key_digits)
                               for x in xs[task]}
    info[arm] = {"params": models.count_params(models.param_shapes(model)),
                 "val_loss": r.val_losses[-1][1] if r.val_losses else float("nan"),
                 "train_s": train_s}
    print(f"  {arm}: trained {sum(s for _, s in stages)} steps in {train_s:.0f}s (held-out loss "
          f"{info[arm]['val_loss']:.3f}), evaluated in {time.time() - t1:.0f}s", flush=True)
    for name in evaluated:
      print(f"    {name}: " + "; ".join(
          f"{task} " + ", ".join(f"{x}: {a:.2f}" for x, a in results[task][name].items())
          for task in tasks), flush=True)
  columns = list(results[tasks[0]])
  for task in tasks:
    label = "pairs" if task == "mqar" else "distance"
    what = {"passkey": "exact-match accuracy of the key",
            "multikey": f"fraction of the {FLAGS.keys} keys given exactly",
            "mqar": "fraction of queries answered"}[task]
    print(f"\n{task}: {what} by {label} (training length {FLAGS.seq_len})")
    print(f"{label:>10}  " + "  ".join(f"{a:>17}" for a in columns))
    for x in xs[task]:
      print(f"{x:>10}  " + "  ".join(f"{results[task][a][str(x)]:>17.2f}" for a in columns))
  print("\nparameters: " + ", ".join(f"{a} {info[a]['params']:,}" for a in arms))
  png = os.path.join(out, "recall.png")
  plot(png, results, tasks, columns)
  if len(tasks) == 1:
    obj = {"task": tasks[0], "arms": results[tasks[0]]}
  else:
    obj = {"task": ",".join(tasks),
           "arms": {a: {f"{t}:{x}": v for t in tasks for x, v in results[t][a].items()}
                    for a in columns}}
  obj.update(steps=FLAGS.steps, seq_len=FLAGS.seq_len, batch=FLAGS.batch, seed=FLAGS.seed,
             examples=FLAGS.examples, params={a: info[a]["params"] for a in arms},
             held_out_loss={a: info[a]["val_loss"] for a in arms},
             train_s={a: round(info[a]["train_s"], 1) for a in arms})
  workdir_lib.atomic_write(os.path.join(out, "recall.json"), json.dumps(obj, indent=2))
  print(f"wrote {png} and {os.path.join(out, 'recall.json')}")
  if FLAGS.json:
    print(json.dumps(obj))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
