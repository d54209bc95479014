"""Benchmarks: `python -m mmrec_jax.bench.NAME`."""
from __future__ import annotations

import os

import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax.errors import Interrupted

_REPO = os.path.join(os.path.dirname(__file__), "..", "..")

# The arms the model-comparison benchmarks (quality, recall) train: a config file
# and overrides (of `model.` fields; a dotted key such as "train.lr" names any
# field). MM-Rec tiny, the same without its long-term memory, and the Transformer
# of the same size.
ARMS = {
    "mmrec": ("configs/tiny.py", {}),
    "mmrec_nomem": ("configs/tiny.py", {"mem_levels": 0}),
    # chunks of 16 tokens (5 levels of 8 slots: 248 chunks, 3,968 tokens)
    "mmrec_c16": ("configs/tiny.py", {"chunk_size": 16, "mem_levels": 5}),
    # the same, its read's logits scaled by log(slots seen) (see README, Recall)
    "mmrec_c16logn": ("configs/tiny.py", {"chunk_size": 16, "mem_levels": 5,
                                          "mem_read_logn": True}),
    # MM-Rec tiny with its memory's read-out initialised at zero (see README, Quality)
    "mmrec_zr": ("configs/tiny.py", {"mem_out_init": 0.0}),
    # MM-Rec tiny whose read may abstain (an attention sink, `mem_sink`; README, Quality)
    "mmrec_sink": ("configs/tiny.py", {"mem_sink": True}),
    # MM-Rec tiny whose memory writes pass no gradient into the recurrence (README, Quality)
    "mmrec_wsg": ("configs/tiny.py", {"mem_write_grad": False}),
    # MM-Rec tiny whose memory's read is its own residual branch, not gated by v
    "mmrec_mres": ("configs/tiny.py", {"mem_residual": True}),
    # MM-Rec tiny whose memory's weights learn at a tenth of the learning rate
    "mmrec_memlr": ("configs/tiny.py", {"train.lr_scales": "memory=0.1"}),
    # both of the two that each halved the gap to memory off: zero read-out, slow memory
    "mmrec_zr_memlr": ("configs/tiny.py", {"mem_out_init": 0.0,
                                           "train.lr_scales": "memory=0.1"}),
    # MM-Rec tiny whose recurrence starts with short timescales (10 to 100 tokens,
    # not 1,000), with and without its memory: can the memory carry what it cannot?
    "mmrec_short": ("configs/tiny.py", {"decay_max": 0.99}),
    "mmrec_short_nomem": ("configs/tiny.py", {"decay_max": 0.99, "mem_levels": 0}),
    "transformer": ("configs/baselines/transformer_tiny.py", {}),
}


def load_arm(arm, arms=None):
  """The validated config of one arm (its file, with its model overrides applied)."""
  path, overrides = (arms or ARMS)[arm]
  c = config_lib.load_config_file(os.path.join(_REPO, path))
  for key, value in overrides.items():
    *section, field = ("model." + key if "." not in key else key).split(".")
    node = c
    for s in section:
      node = node[s]
    node[field] = value
  return c


def train_arm(c, workdir, **kwargs):
  """`train.run` of one arm, quietly; stops the benchmark (exit 130 / 143, the
  checkpoint saved) when a signal interrupted the run, instead of scoring a
  half-trained model."""
  from mmrec_jax import train  # pylint: disable=import-outside-toplevel
  r = train.run(c, workdir, quiet=True, **kwargs)
  if r.reason == "interrupted":
    raise Interrupted(f"{workdir}: interrupted by {r.signal} at step {r.step}; re-run the same "
                      "command to resume", 130 if r.signal == "SIGINT" else 143)
  return r


def random_batch(rng, batch, seq_len, vocab):
  """A training batch of uniform random tokens (speed does not depend on them)."""
  tokens = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "reset": np.zeros((batch, seq_len), bool), "mask": np.ones((batch, seq_len), np.float32)}


def compiled_train_step(c, batch_size, seq_len):
  """(setup, state, batch, compiled train step, compile seconds) of config `c` on
  random tokens of batch_size x seq_len: what the speed benchmarks time."""
  import time  # pylint: disable=g-import-not-at-top
  from mmrec_jax import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax import train_state as ts_lib  # pylint: disable=g-import-not-at-top
  c.train.batch_size, c.train.seq_len = batch_size, seq_len
  c.model.max_seq_len = max(c.model.max_seq_len, seq_len)
  config_lib.validate(c)
  s = ts_lib.setup(c)
  state = ts_lib.create(s)
  batch = shard_lib.put_batch(random_batch(np.random.default_rng(0), batch_size, seq_len,
                                           c.model.vocab_size), s.mesh)
  t0 = time.perf_counter()
  compiled = s.train_step.lower(state, batch).compile()
  return s, state, batch, compiled, time.perf_counter() - t0


def time_steps(compiled, state, batch, steps, warmup=1):
  """Runs `warmup` then `steps` train steps; returns (state, seconds of each timed
  step, the last step's metrics)."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return state, times, m


def define_step_flags(steps, steps_help):
  """The flags of the commands that time train steps: --config, --batch, --seq_len, --steps."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file")
  flags.DEFINE_integer("batch", 4, "global batch size")
  flags.DEFINE_integer("seq_len", 512, "tokens per row")
  flags.DEFINE_integer("steps", steps, steps_help)
