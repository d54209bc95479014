"""The recall benchmark's runs: the arms at recall scale, the training mix, the gate,
and one trained (or reused) run per arm, learning rate and seed."""
from __future__ import annotations

import dataclasses
import json
import os

from mmrec_jax import bench
from mmrec_jax import config as config_lib
from mmrec_jax.data import synthetic
from mmrec_jax.errors import UsageError

# The memory's chunk in every MM-Rec arm, and the spread task's.
CHUNK = 8
# The training mix of every arm: MQAR from 4 pairs in 16 tokens to 8 pairs in 128
# (short rows in every batch make attention's recall circuit form: without them a
# Transformer stays at the 1/N plateau for thousands of steps), spread MQAR (one pair
# per memory chunk), a 4-token passkey; rows split evenly among the three tasks.
TRAIN_TASK = (f"mqar:mix=16x4+64x4+128x8|spread_mqar:pairs=6,chunk={CHUNK}|passkey:key=4")
# The gate: MQAR with 4 pairs in 64 tokens (short rows of 16 tokens mixed in), scored
# on 64-token rows inside the training length.
GATE_TASK = "mqar:mix=16x4+64x4"

# Every arm at recall scale: MM-Rec's design at a width and depth that learn these
# tasks within the benchmark's budget on a CPU (the memory's chunks match the spread
# task's); the Transformer at the same width and depth.
# The memory: chunks of CHUNK, 3 levels of 64 slots (64 chunks at full resolution,
# 4x the training length, then pools of 2 and 4: 448 chunks, 28x; training costs
# the same as with a smaller memory, since a window of 16 chunks fills only 16
# entries of an empty memory and only those are computed), each chunk keyed by
# the token before what it pools (`mem_key="previous"`: a pair is written so that its
# key finds it), a softmax pooling (`mem_pool="exp"`: a salient chunk keeps its
# summary when merged with filler), a read scaled by log(slots) (`mem_read_logn`),
# its read-out at the usual init and the full learning rate (the shipped tiny's zero
# read-out and 0.1x memory rate are for text, where the memory is opened slowly: on
# these tasks they keep it shut for the whole budget). docs/experiments/recall.md.
SCALE = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4}
MEMORY = {"model.chunk_size": CHUNK, "model.mem_slots": 64, "model.mem_levels": 3,
          "model.mem_key": "previous", "model.mem_pool": "exp", "model.mem_read_logn": True,
          "model.mem_out_init": 1.0, "model.mem_lr_scale": 1.0}
ARMS = {
    "mmrec": ("tiny", dict(SCALE, **MEMORY), "MM-Rec with its long-term memory"),
    "mmrec_statekey": ("tiny", dict(SCALE, **dict(MEMORY, **{"model.mem_key": "state"})),
                       "MM-Rec, each chunk keyed by its pooled state (the earlier write)"),
    "mmrec_nomem": ("tiny", dict(SCALE, **{"model.mem_levels": 0}), "MM-Rec, memory off"),
    "transformer": ("baselines/transformer_tiny", dict(SCALE), "the Transformer"),
}
DEFAULT_ARMS = ("mmrec", "mmrec_nomem", "transformer")
# What makes an arm what it is: kept whatever `--set` says (memory off stays off).
KEPT = {"mmrec_nomem": {"model.mem_levels": 0}}
GATE_ARM = ("baselines/transformer_tiny", dict(SCALE), "the gate's Transformer")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How every run trains (shared by the arms; the gate has its own)."""
  steps: int
  batch: int
  seq_len: int
  lr: float
  warmup: int
  task: str
  seed: int = 0


def run_config(arm, recipe: Recipe, overrides=None) -> config_lib.Config:
  """The config of one run: the arm at recall scale on the recipe's task."""
  name, over, _ = ARMS[arm] if arm != "gate" else GATE_ARM
  vocab = synthetic.parse(recipe.task)[0].vocab.size
  c = config_lib.load(name, over)
  c = c.override({
      "model.vocab_size": vocab, "model.max_seq_len": max(c.model.max_seq_len, recipe.seq_len),
      "data.task": recipe.task, "train.seed": recipe.seed, "train.seq_len": recipe.seq_len,
      "train.batch_size": recipe.batch, "train.steps": recipe.steps, "train.lr": recipe.lr,
      "train.schedule": "wsd", "train.decay_frac": 0.2, "train.warmup_steps": recipe.warmup,
      "train.weight_decay": 0.1, "train.eval_every": max(1, recipe.steps // 4),
      "train.eval_batches": 4, "train.log_every": max(1, recipe.steps // 20),
      "train.samples": 0, "checkpoint.every": recipe.steps})
  if overrides:
    c = c.override(overrides)
  return c.override(KEPT[arm]) if arm in KEPT else c


def workdir(out, arm, recipe: Recipe):
  return os.path.join(out, f"{arm}_lr{recipe.lr:g}_s{recipe.seed}")


def train(out, arm, recipe: Recipe, overrides=None, log=print):
  """Trains (or reuses a finished) run; returns (workdir, held-out answer accuracy)."""
  c = run_config(arm, recipe, overrides)
  wd = workdir(out, arm, recipe)
  summary = os.path.join(wd, "summary.json")
  done = os.path.isfile(summary) and json.load(open(summary)).get("reason") == "done"
  if done:
    bench.check_same_run(c, wd)
  else:
    log(f"  training {arm} (lr {recipe.lr:g}, seed {recipe.seed}): {recipe.steps} steps of "
        f"{recipe.batch} x {recipe.seq_len}")
    bench.train_arm(c, wd)
  return wd, last_val_accuracy(wd)


def last_val_accuracy(wd):
  """The last evaluation's token accuracy of a run (on answers only, for a task)."""
  acc = None
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "val":
        acc = r["token_accuracy"]
  return acc


def check_arms(names):
  for a in names:
    if a not in ARMS:
      raise UsageError(f"--arms: unknown arm {a!r}; use {', '.join(ARMS)}")
