"""Loader throughput: `python -m mmrec_jax.bench.data [--config=configs/tiny.py]`.

Builds the tokenizer and token cache (timed; the second run hits the cache),
then times the train iterator alone and prints tokens/s and the ratio to
`--train_tokens_per_s` (the training consumption it must outpace).
"""
import os
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.data import pipeline as data

config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file")
flags.DEFINE_integer("batches", 500, "batches to time")
flags.DEFINE_float("train_tokens_per_s", 5000.0, "training consumption to compare with")
flags.DEFINE_string("workdir", "", "where tokenizer.json goes (default: a temp dir)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  c = config_lib.validate(FLAGS.config)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="mmrec_bench_")
  t0 = time.perf_counter()
  tok = data.get_tokenizer(c, workdir)
  t1 = time.perf_counter()
  ds = data.build(c, tok)
  t2 = time.perf_counter()
  print(f"tokenizer {t1 - t0:.2f}s, build {t2 - t1:.2f}s: {len(ds.train_tokens):,} train "
        f"tokens, {ds.num_train_windows:,} windows, cache {data.cache_dir(c.data)}")
  it = ds.train_iter()
  for _ in range(5):
    next(it)
  t3 = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(it)
  dt = time.perf_counter() - t3
  tokens = FLAGS.batches * batch["inputs"].size
  rate = tokens / dt
  print(f"loader: {FLAGS.batches} batches of {batch['inputs'].shape} in {dt:.3f}s = "
        f"{rate:,.0f} tokens/s (num_workers={c.data.num_workers}, pid {os.getpid()})")
  print(f"ratio vs training at {FLAGS.train_tokens_per_s:,.0f} tokens/s: "
        f"{rate / FLAGS.train_tokens_per_s:,.1f}x")
  t4 = time.perf_counter()
  val = ds.val_batches()
  print(f"validation: {len(val)} batches in {time.perf_counter() - t4:.3f}s")


if __name__ == "__main__":
  cli.run(main)
