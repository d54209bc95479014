"""Decode benchmark: `python -m mmrec_jax.bench.decode [--configs=tiny,small]`.

For each config (random init: speed and memory do not depend on the weights)
prints decode tokens/s at batch 1 and 16 (jitted while loop, top-k/top-p
sampling), prefill tokens/s and its MFU against a matmul peak measured in the
same run, and, at contexts of 1K, 8K and 64K tokens, the
decode state's size and the peak RSS of a fresh process that prefilled that
many tokens (in pieces, state carried), beside the KV cache a Transformer of
the same width and depth would need: 2 * n_layers * T * d_model * bytes.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
from absl import flags

from mmrec_jax import cli
from mmrec_jax import models

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs, so importing this module defines none)."""
  flags.DEFINE_list("configs", ["tiny", "small"], "Config names under configs/.")
  flags.DEFINE_list("contexts", ["1024", "8192", "65536"], "Context lengths (tokens).")
  flags.DEFINE_integer("decode_tokens", 256, "Tokens per timed decode run.")
  flags.DEFINE_integer("prefill_tokens", 2048, "Prompt length of the timed prefill.")
  flags.DEFINE_integer("piece", 4096, "Prefill piece length for long contexts.")
  flags.DEFINE_integer("reps", 5, "Timed runs per figure (the median is reported).")
  flags.DEFINE_integer("peak_reps", 31, "Timed repetitions per matmul size of the peak.")
  flags.DEFINE_string("child", None, "internal: NAME:CONTEXT, measure one context and exit.")


def _setup(name):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from mmrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load(name)
  model = models.build(c.model)
  params = jax.jit(lambda k: nn.unbox(models.init_params(model, k)))(jax.random.key(0))
  return model, {"params": params}


def _maxrss_bytes():
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == "darwin" else r * 1024


def _prefill_fn(model):
  import jax  # pylint: disable=g-import-not-at-top
  # Only the state is returned: XLA drops the unused vocabulary projection.
  return jax.jit(lambda v, x_BT, st: model.apply(v, x_BT, state=st)[1])


def measure_context(name, context, piece):
  """{'state_bytes', 'maxrss'} after prefilling `context` tokens in pieces."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model, variables = _setup(name)
  fn = _prefill_fn(model)
  piece = min(piece, context)
  state = model.init_state(1)
  rng = jax.random.key(1)
  jax.block_until_ready(fn(variables, jnp.zeros((1, piece), jnp.int32), state))  # compile
  t0 = time.perf_counter()
  for i in range(-(-context // piece)):
    x = jax.random.randint(jax.random.fold_in(rng, i), (1, piece), 2, model.cfg.vocab_size)
    state = fn(variables, x.astype(jnp.int32), state)
  jax.block_until_ready(state)
  return {"state_bytes": models.state_bytes(state), "maxrss": _maxrss_bytes(),
          "seconds": time.perf_counter() - t0}


def measure_speed(model, variables, decode_tokens, prefill_tokens, reps=3):
  """Decode tokens/s at batch 1 and 16 and prefill tokens/s (median of `reps`, after
  compiling), and the prefill's forward FLOPs per token."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmrec_jax.inference import sampling as sampling  # pylint: disable=g-import-not-at-top
  dec = sampling.Decoder(model, eod_id=-1)  # never stops early on random weights
  variables = dec.prepare(variables)
  settings = (0.8, 40, 0.95)
  out = {}

  def median(f):
    jax.block_until_ready(f())
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]

  for b in (1, 16):
    logits = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
    st = model.init_state(b)
    keys = sampling.row_keys(0, b)
    s = median(lambda: dec.loop(variables, keys, logits, st, settings=settings,
                                n_new=decode_tokens))
    out[f"decode_b{b}"] = b * decode_tokens / s
  # The prefill of generation: one parallel apply, last position's logits.
  x = jnp.full((1, prefill_tokens), 2, jnp.int32)
  reset = jnp.zeros((1, prefill_tokens), bool)
  out["prefill"] = prefill_tokens / median(lambda: dec.prefill(variables, x, reset))
  # Only the last position's logits are computed (`last_only`).
  cfg = model.cfg
  out["prefill_flops_per_token"] = (model.flops_per_token(prefill_tokens)
                                    - 2 * cfg.d_model * cfg.vocab_size * (1 - 1 / prefill_tokens))
  return out


def _fmt_bytes(n):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def main(argv):
  del argv
  if FLAGS.child:
    name, ctx = FLAGS.child.split(":")
    print(json.dumps(measure_context(name, int(ctx), FLAGS.piece)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  from mmrec_jax.training import metrics as metrics  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), random init, float32")
  sizes = (512, 1024, 2048) if dev.platform == "cpu" else (2048, 4096, 8192)
  peak, table = metrics.matmul_peak(dev, sizes=sizes, reps=FLAGS.peak_reps)
  print(f"matmul peak float32: {peak / 1e9:,.1f} GFLOP/s (median (p10-p90) per size: "
        f"{metrics.format_peak(table)})")
  for name in FLAGS.configs:
    model, variables = _setup(name)
    c = model.cfg
    sp = measure_speed(model, variables, FLAGS.decode_tokens, FLAGS.prefill_tokens, FLAGS.reps)
    print(f"\n{name}: d_model={c.d_model} n_layers={c.n_layers} vocab={c.vocab_size} "
          f"params={models.count_params(models.param_shapes(model)):,}")
    print(f"  decode  batch 1: {sp['decode_b1']:10,.0f} tok/s   batch 16: "
          f"{sp['decode_b16']:10,.0f} tok/s   prefill ({FLAGS.prefill_tokens} tokens): "
          f"{sp['prefill']:10,.0f} tok/s")
    mfu = sp["prefill"] * sp["prefill_flops_per_token"] / peak
    print(f"  prefill: {sp['prefill_flops_per_token'] / 1e6:.2f} MFLOP/token forward, "
          f"MFU {100 * mfu:.1f}% of the measured float32 matmul peak")
    print(f"  {'context':>8}  {'MM-Rec state':>12}  {'peak RSS':>10}  {'prefill s':>9}  "
          f"{'Transformer KV cache':>20}")
    for ctx in map(int, FLAGS.contexts):
      cmd = [sys.executable, "-m", "mmrec_jax.bench.decode", f"--child={name}:{ctx}",
             f"--piece={FLAGS.piece}"]
      res = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if res.returncode:
        print(f"  {ctx:>8}  failed: {res.stderr.strip().splitlines()[-1:]}")
        continue
      m = json.loads(res.stdout.strip().splitlines()[-1])
      kv = 2 * c.n_layers * ctx * c.d_model * np.dtype(c.compute_dtype).itemsize
      print(f"  {ctx:>8}  {_fmt_bytes(m['state_bytes']):>12}  {_fmt_bytes(m['maxrss']):>10}  "
            f"{m['seconds']:>9.1f}  {_fmt_bytes(kv):>20}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
