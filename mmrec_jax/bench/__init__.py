"""Benchmarks: `python -m mmrec_jax.bench.NAME`, each printing its figures.

What they share: training an arm (`arms.py`) without ever scoring an old run under
a new name, random batches, a compiled train step and timing it.
"""
from __future__ import annotations

import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax.errors import Interrupted, UsageError


def check_same_run(c, workdir):
  """UsageError if `workdir` holds a run of another model or training recipe than
  `c` (`training.resume.compare`): a benchmark never scores an old run under a
  new arm's name."""
  from mmrec_jax.io import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from mmrec_jax.training import resume  # pylint: disable=import-outside-toplevel
  if not ckpt_lib.has_run_config(workdir):
    return
  saved = ckpt_lib.load_run_config(workdir)
  diff = resume.compare(saved, c)
  differ = [f"model.{k}" for k in diff.model if k not in ("name", "max_seq_len")]
  differ += [f"train.{k}" for k in diff.recipe]
  if differ:
    raise UsageError(f"{workdir} holds a run trained otherwise ({', '.join(differ)} differ, "
                     "e.g. an arm whose defaults changed); pass a new --out, or delete it")


def train_arm(c, workdir, **kwargs):
  """`train.run` of one arm, quietly; stops the benchmark (exit 130 / 143, the
  checkpoint saved) when a signal interrupted the run, instead of scoring a
  half-trained model."""
  from mmrec_jax.training import loop  # pylint: disable=import-outside-toplevel
  check_same_run(c, workdir)
  r = loop.run(c, workdir, quiet=True, **kwargs)
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
  from mmrec_jax.training import sharding as shard_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax.training import state as ts_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.typed(c).override({"train.batch_size": batch_size, "train.seq_len": seq_len,
                                     "model.max_seq_len": max(c.model.max_seq_len, seq_len)})
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
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file (or a shipped "
                                  "config's name, e.g. tiny)")
  flags.DEFINE_integer("batch", 4, "global batch size")
  flags.DEFINE_integer("seq_len", 512, "tokens per row")
  flags.DEFINE_integer("steps", steps, steps_help)
