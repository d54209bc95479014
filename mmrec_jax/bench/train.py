"""Train-step throughput: `python -m mmrec_jax.bench.train --config=configs/tiny.py`.

Random tokens at --batch x --seq_len (default 4 x 512); prints compile time, the
median step time of --steps timed steps, tokens/s and MFU against a matmul peak
measured in the same run (and against the vendor peak on GPU/TPU).
"""
import statistics

import jax.numpy as jnp
from absl import flags
from absl import logging

from mmrec_jax import cli
from mmrec_jax import bench
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax import models
from mmrec_jax.training import state as ts_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs, so importing this module defines none)."""
  bench.define_step_flags(5, "timed steps (median reported)")
  flags.DEFINE_integer("peak_reps", 31, "timed repetitions per matmul size of the peak")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  c = FLAGS.config
  s, state, batch, compiled, compile_s = bench.compiled_train_step(c, FLAGS.batch, FLAGS.seq_len)
  state, times, m = bench.time_steps(compiled, state, batch, FLAGS.steps)
  step_s = statistics.median(times)
  tokens_s = FLAGS.batch * FLAGS.seq_len / step_s
  flops_tok = ts_lib.flops_per_token_train(s, FLAGS.seq_len)
  dev = s.mesh.devices.flat[0]
  n_dev = s.mesh.devices.size
  big = dev.platform != "cpu"
  peaks = {}
  for dt in ("float32", "bfloat16"):
    peaks[dt] = metrics_lib.matmul_peak(
        dev, jnp.dtype(dt), sizes=(2048, 4096, 8192) if big else (512, 1024, 2048),
        reps=FLAGS.peak_reps)
  mm_dtype = jnp.dtype(models.make_config(c.model).matmul_compute_dtype).name
  measured = peaks["bfloat16" if mm_dtype == "bfloat16" else "float32"][0]
  print(f"device: {n_dev} x {dev.device_kind} ({dev.platform}), model {c.model.name}, "
        f"batch {FLAGS.batch} x {FLAGS.seq_len}, loss {float(m['loss']):.4f}")
  print(f"compile: {compile_s:.2f}s")
  mem = compiled.memory_analysis()
  print(f"saved activations: {mem.temp_size_in_bytes / (FLAGS.batch * FLAGS.seq_len):,.0f} "
        f"bytes/token ({mem.temp_size_in_bytes / 1e9:.3f} GB of temporaries in the compiled "
        f"step, model.remat={c.model.remat}; memory_analysis)")
  print(f"step: median {step_s * 1e3:.1f} ms over {FLAGS.steps} steps "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
  print(f"throughput: {tokens_s:,.0f} tokens/s, {flops_tok / 1e6:.2f} MFLOP/token (train)")
  for dt, (peak, table) in peaks.items():
    print(f"matmul peak {dt}: {peak / 1e9:,.1f} GFLOP/s per device, the largest median over "
          f"{FLAGS.peak_reps} repetitions per size; median (p10-p90) GFLOP/s: "
          f"{metrics_lib.format_peak(table)}")
  print(f"MFU: {100 * metrics_lib.mfu(tokens_s, flops_tok, measured * n_dev):.2f}% of the "
        f"measured {mm_dtype} matmul peak of {measured / 1e9:,.1f} GFLOP/s per device")
  if big:
    vendor = metrics_lib.peak_flops_per_device(dev)
    print(f"MFU: {100 * metrics_lib.mfu(tokens_s, flops_tok, vendor * n_dev):.2f}% of the "
          f"vendor peak of {vendor / 1e12:,.0f} TFLOP/s per device")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
