"""Where a train step's time goes: `python -m mmrec_jax.bench.profile --config=configs/tiny.py`.

Times, then traces, --steps compiled train steps (random tokens, --batch x --seq_len) with
`jax.profiler`, attributes every executed XLA operation to the model code that
produced it (the `op_name` metadata of the compiled HLO) and prints its share of
the operations' time by category, and the --top operations:

- matmul: every dot (forward and backward, head included);
- head & loss: the softmax cross entropy around the head (not its matmuls);
- memory: the HDS memory's non-matmul work (pooling, writes, masks, gathers);
- recurrence: the scans' loop bodies;
- layout: copies and transposes XLA inserted;
- optimizer: the AdamW update and gradient clipping;
- elementwise: everything else (gates, norms, activations, the MDI decay).

Shares are of the operations' summed time; on a multi-core CPU operations
overlap, so the sum exceeds the step's wall time (printed beside it). On a GPU
only the device's timelines count; XLA's command buffers (CUDA graphs) hide the
kernels inside them, so profile there with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=` (launch/gpu_bench.sh does).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile

import jax
from absl import flags
from absl import logging

from mmrec_jax import cli
from mmrec_jax import models
from mmrec_jax import bench

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when it runs, so importing this module defines none)."""
  bench.define_step_flags(3, "timed, then traced, steps")
  flags.DEFINE_integer("top", 15, "operations listed")
  flags.DEFINE_string("keep", None, "folder to keep the trace and the compiled HLO in "
                      "(trace.json.gz, hlo.txt.gz), to read again with other tools")

CATEGORIES = ("matmul", "head & loss", "memory", "recurrence", "layout", "optimizer",
              "elementwise")
_SKIP = ("$", "Thunk", "end:", "Threadpool", "ThreadpoolListener", "Pjit", "Slinky")


def op_sources(hlo_text):
  """{instruction name: op_name} from compiled HLO text; a fusion or call gets the
  op_name of the last instruction of the computation it calls."""
  own = dict(re.findall(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo_text))
  calls = dict(re.findall(r"%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)", hlo_text))
  comp = {}
  for name, body in re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S):
    ops = re.findall(r"op_name=\"([^\"]+)\"", body)
    if ops:
      comp[name] = ops[-1]
  out = dict(own)
  for name, callee in calls.items():
    if name not in out and callee in comp:
      out[name] = comp[callee]
  return out


# The registered models' module names: an operation under one is the model's, not the optimizer's.
MODEL_NAMES = tuple(module.__name__ for _, module in models.REGISTRY.values())


def category(event_name, src):
  """The category of one executed operation (see the module docstring)."""
  last = src.split("/")[-1]
  if "optax" in src or "clip" in src or src.startswith("jit(train_step)/") and (
      "jvp" not in src and "transpose" not in src and "while" not in src
      and not any(n in src for n in MODEL_NAMES)):
    if "dot_general" not in last:
      return "optimizer"
  if "dot" in event_name or last == "dot_general" or "dot_general" in event_name:
    return "matmul"
  if "/memory/" in src:
    return "memory"
  if event_name.startswith(("copy", "transpose")) or last in ("transpose", "copy"):
    return "layout"
  if "/while/body" in src or "dynamic_update_slice" in src or "dynamic_slice" in src:
    return "recurrence"
  if "blocks" not in src and "block_" not in src:
    return "head & loss"
  return "elementwise"


def device_pids(events):
  """The trace's accelerator processes (`/device:GPU:0`, `/device:TPU:0`, ...), if any.

  On an accelerator the host's threads hold launch and runtime spans that enclose
  the device's work; only the device's own timelines are operations."""
  return {e.get("pid") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"
          and str(e.get("args", {}).get("name", "")).startswith("/device:")}


def summarize(events, sources, steps):
  """(ms per step by category, [(ms per step, source, name)] of the largest ops).

  On a CPU every operation runs on a host thread; where the trace has device
  processes, only their events count, and a GPU kernel is looked up by the HLO
  operation it ran (its `hlo_op` argument)."""
  pids = device_pids(events)
  by_cat = collections.Counter()
  by_op = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(_SKIP) or name.startswith("while"):
      continue   # a while's event spans its body's operations, which are counted
    if pids and e.get("pid") not in pids:
      continue
    name = str(e.get("args", {}).get("hlo_op", name))
    src = sources.get(name, "?")
    dur_ms = e.get("dur", 0) / 1e3 / steps
    by_cat[category(name, src)] += dur_ms
    by_op[(re.sub(r"^jit\(\w+\)/", "", src), re.sub(r"[.\d]+$", "", name))] += dur_ms
  return by_cat, [(v, s, n) for (s, n), v in by_op.most_common()]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  c = FLAGS.config
  _, state, batch, compiled, _ = bench.compiled_train_step(c, FLAGS.batch, FLAGS.seq_len)
  sources = op_sources(compiled.as_text())
  state, times, _ = bench.time_steps(compiled, state, batch, FLAGS.steps, warmup=2)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(FLAGS.steps):
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
    jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not traces:
      raise SystemExit("error: the profiler wrote no trace; is this jaxlib built with it?")
    with gzip.open(traces[0]) as f:
      events = json.load(f)["traceEvents"]
    if FLAGS.keep:
      os.makedirs(FLAGS.keep, exist_ok=True)
      shutil.copy(traces[0], os.path.join(FLAGS.keep, "trace.json.gz"))
      with gzip.open(os.path.join(FLAGS.keep, "hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
  by_cat, ops = summarize(events, sources, FLAGS.steps)
  total = sum(by_cat.values())
  print(f"model {c.model.name}, batch {FLAGS.batch} x {FLAGS.seq_len}, "
        f"{jax.devices()[0].device_kind}: step {statistics.median(times) * 1e3:.1f} ms "
        f"(median of {FLAGS.steps}, untraced); operations' time {total:.1f} ms per step")
  print("\n| category | ms / step | share |\n| --- | --- | --- |")
  for cat in CATEGORIES:
    print(f"| {cat} | {by_cat[cat]:.1f} | {100 * by_cat[cat] / max(total, 1e-9):.1f}% |")
  print(f"\ntop {FLAGS.top} operations (ms / step, source, XLA operation):")
  for v, src, name in ops[:FLAGS.top]:
    print(f"  {v:7.2f}  {src[-100:]}  [{name}]")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
