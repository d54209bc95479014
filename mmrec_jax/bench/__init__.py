"""Benchmarks: `python -m mmrec_jax.bench.NAME`."""
from __future__ import annotations

import os

import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax.errors import ConfigError, Interrupted, UsageError

_REPO = os.path.join(os.path.dirname(__file__), "..", "..")

# The arms the model-comparison benchmarks (quality, recall) train: a config file
# and overrides (of `model.` fields; a dotted key such as "train.lr" names any
# field). MM-Rec tiny, the same without its long-term memory, and the Transformer
# of the same size; then the variants the README's Quality and Recall sections
# measured. Those variants were measured before the memory's defaults changed
# (2026-11-28: read-out initialised at zero, memory at a tenth of the learning
# rate), so each pins the earlier values (`V0`) and still reproduces its figures.
V0 = {"mem_out_init": 1.0, "mem_lr_scale": 1.0}   # the memory's defaults until 2026-11-28
C16 = {"chunk_size": 16, "mem_levels": 5}       # chunks of 16 tokens, 5 levels of 8 slots
ARMS = {
    "mmrec": ("configs/tiny.py", {}),
    "mmrec_nomem": ("configs/tiny.py", {"mem_levels": 0}),
    "transformer": ("configs/baselines/transformer_tiny.py", {}),
    # MM-Rec tiny with the memory's defaults until 2026-11-28: its read-out at the
    # usual initialisation, its weights at the full learning rate
    "mmrec_v0": ("configs/tiny.py", dict(V0)),
    # chunks of 16 tokens (5 levels of 8 slots: 248 chunks, 3,968 tokens)
    "mmrec_c16": ("configs/tiny.py", dict(V0, **C16)),
    # the same, its read's logits scaled by log(slots seen) (see README, Recall)
    "mmrec_c16logn": ("configs/tiny.py", dict(V0, **C16, mem_read_logn=True)),
    # the v0 memory with its read-out initialised at zero (see README, Quality)
    "mmrec_zr": ("configs/tiny.py", dict(V0, mem_out_init=0.0)),
    # the v0 memory whose read may abstain (an attention sink, `mem_sink`; README, Quality)
    "mmrec_sink": ("configs/tiny.py", dict(V0, mem_sink=True)),
    # the v0 memory whose writes pass no gradient into the recurrence (README, Quality)
    "mmrec_wsg": ("configs/tiny.py", dict(V0, mem_write_grad=False)),
    # the v0 memory whose read is its own residual branch, not gated by v
    "mmrec_mres": ("configs/tiny.py", dict(V0, mem_residual=True)),
    # the v0 memory's weights at a tenth of the learning rate
    "mmrec_memlr": ("configs/tiny.py", dict(V0, **{"train.lr_scales": "memory=0.1"})),
    # both of the two that each halved the gap to memory off: zero read-out, slow
    # memory (the same model and training as `mmrec` since they became the defaults)
    "mmrec_zr_memlr": ("configs/tiny.py", dict(V0, mem_out_init=0.0,
                                               **{"train.lr_scales": "memory=0.1"})),
    # the v0 model whose recurrence starts with short timescales (10 to 100 tokens,
    # not 1,000), with and without its memory: can the memory carry what it cannot?
    "mmrec_short": ("configs/tiny.py", dict(V0, decay_max=0.99)),
    "mmrec_short_nomem": ("configs/tiny.py", {"decay_max": 0.99, "mem_levels": 0}),
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


# Training settings that make a run another run (a different --tokens, and the
# steps, warmup and evaluation schedule derived from it, extends the same one).
RUN_TRAIN_FIELDS = ("seed", "lr", "lr_scales", "batch_size", "seq_len", "carry_state",
                    "weight_decay")


def check_same_run(c, workdir):
  """UsageError if `workdir` holds a run of another model or training recipe than
  `c` (an arm whose definition or defaults changed since): a benchmark never
  scores an old run under a new arm's name."""
  from mmrec_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from mmrec_jax import models  # pylint: disable=import-outside-toplevel
  if not os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
    return
  saved = ckpt_lib.load_run_config(workdir)   # a field it predates: the value it ran with
  was = saved.model.to_dict()
  try:
    was = models.make_config(was).__dict__
  except ConfigError:   # a saved section this version cannot read: compared as saved
    pass
  now = models.make_config(c.model).__dict__
  no_memory = was.get("mem_levels") == 0 and now.get("mem_levels") == 0
  diff = [f"model.{k}" for k in ckpt_lib.model_diff(was, now)
          if k not in ("name", "max_seq_len") and not (no_memory and k.startswith("mem_"))]
  diff += [f"train.{k}" for k in RUN_TRAIN_FIELDS
           if saved.train.get(k, None) != c.train.get(k, None)]
  if diff:
    raise UsageError(f"{workdir} holds a run trained otherwise ({', '.join(diff)} differ, "
                     "e.g. an arm whose defaults changed); pass a new --out, or delete it")


def train_arm(c, workdir, **kwargs):
  """`train.run` of one arm, quietly; stops the benchmark (exit 130 / 143, the
  checkpoint saved) when a signal interrupted the run, instead of scoring a
  half-trained model."""
  from mmrec_jax import train  # pylint: disable=import-outside-toplevel
  check_same_run(c, workdir)
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
