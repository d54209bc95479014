"""Times the scan implementations against a plain elementwise pass over the same bytes.

    python -m mmrec_jax.bench.scan [--sizes=tiny,small] [--max_len=16384] [--grad]
        [--impls=sequential,associative,chunked,pallas]

Per row: milliseconds (median of --repeats), the ratio to the fastest
implementation at that length, and the bytes moved per second (read a and b,
write h) as a fraction of what a plain elementwise pass `a * b + b` over the
same bytes reaches in the same run. `pallas` runs in Pallas interpret mode on a CPU
(correct, slow: time it on a GPU or TPU).
"""
from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from mmrec_jax import cli

from mmrec_jax.errors import UsageError
from mmrec_jax.models.mmrec.scan import IMPLS, linear_scan, resolve_impl

SHAPES = {"tiny": (4, 128), "small": (16, 512), "base": (8, 1024)}  # (train batch, width)

flags.DEFINE_list("sizes", ["tiny", "small"], f"Shapes (batch, width) of: {', '.join(SHAPES)}.")
flags.DEFINE_integer("min_len", 256, "Shortest sequence timed.")
flags.DEFINE_integer("max_len", 16384, "Longest sequence timed.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per cell (the median is reported).")
flags.DEFINE_integer("factor", 4, "The length grows by this factor per row.")
flags.DEFINE_bool("grad", False, "Time forward + backward.")
flags.DEFINE_list("impls", ["sequential", "associative", "chunked"],
                  "Implementations timed (pallas: interpret mode on a CPU).")
FLAGS = flags.FLAGS


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv):
  del argv
  args = FLAGS
  impls = tuple(args.impls)
  for name in impls:
    if name not in IMPLS or name == "auto":
      raise UsageError(f"--impls: unknown implementation {name!r}; use any of "
                       f"{', '.join(i for i in IMPLS if i != 'auto')}")
  for size in args.sizes:
    if size not in SHAPES:
      raise UsageError(f"--sizes: unknown size {size!r}; use any of {', '.join(SHAPES)}")
  if args.min_len < 1 or args.max_len < args.min_len or args.factor < 2 or args.repeats < 1:
    raise UsageError("need 1 <= --min_len <= --max_len, --factor >= 2 and --repeats >= 1")
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{platform.processor() or platform.machine()}, auto -> {resolve_impl('auto', 1024)}; "
        f"mode: {'fwd+bwd' if args.grad else 'forward'}")
  print(f"{'size':<6} {'B':>3} {'D':>4} {'T':>6} {'impl':<12} {'ms':>9} {'x fastest':>9} "
        f"{'GB/s':>7} {'vs elementwise':>14}")
  for size in args.sizes:
    B, D = SHAPES[size]
    T = args.min_len
    while T <= args.max_len:
      ka, kb = jax.random.split(jax.random.key(T))
      a = jax.nn.sigmoid(jax.random.normal(ka, (B, T, D)) + 3.0)
      b = jax.random.normal(kb, (B, T, D))
      nbytes = 3 * a.size * 4
      if args.grad:
        elem = jax.jit(jax.grad(lambda a, b: jnp.sum(a * b + b), argnums=(0, 1)))
        fns = {i: jax.jit(jax.grad(lambda a, b, i=i: jnp.sum(linear_scan(a, b, impl=i)),
                                   argnums=(0, 1))) for i in impls}
      else:
        elem = jax.jit(lambda a, b: a * b + b)
        fns = {i: jax.jit(lambda a, b, i=i: linear_scan(a, b, impl=i)) for i in impls}
      t_elem = _time(elem, a, b, repeats=args.repeats)
      times = {i: _time(f, a, b, repeats=args.repeats) for i, f in fns.items()}
      best = min(times.values())
      for i in impls:
        gbs = nbytes / times[i] / 1e9
        print(f"{size:<6} {B:>3} {D:>4} {T:>6} {i:<12} {times[i] * 1e3:>9.2f} "
              f"{times[i] / best:>9.2f} {gbs:>7.2f} {t_elem / times[i]:>14.2f}")
      print(f"{size:<6} {B:>3} {D:>4} {T:>6} {'elementwise':<12} {t_elem * 1e3:>9.2f} "
            f"{'':>9} {nbytes / t_elem / 1e9:>7.2f} {1.0:>14.2f}", flush=True)
      T *= args.factor


def entry():
  cli.run(main)


if __name__ == "__main__":
  entry()
