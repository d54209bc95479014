"""Training telemetry: tqdm bar, TensorBoard, metrics.jsonl, loss.png, peak FLOP/s and MFU.

Only process 0 writes or prints; other processes get no-op writers.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

from mmrec_jax.io import workdir as workdir_lib

# Dense bf16 peak FLOP/s per device by device_kind substring (vendor figures).
VENDOR_PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("V100", 125e12),
    ("B200", 2250e12), ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
    ("TPU v2", 45e12),
)
_PEAK_CACHE = {}


def matmul_peak(device=None, dtype=jnp.float32, sizes=(1024,), reps=11):
  """Measured matmul FLOP/s of one device: `(peak, {n: (median, p10, p90)})`.

  For each n in `sizes`, `reps` timed n x n matmuls (after a warm-up); the
  figure of a size is the median of its repetitions (a single best time is
  noise on a shared machine), the peak is the largest median. A dtype narrower
  than float32 is multiplied with float32 accumulation and output, as the
  models' matmuls are (on a CPU with AMX, 3-4x the rate of a bfloat16 product
  returned in bfloat16). Cached per process, so every MFU one run prints uses
  the same peak.
  """
  device = device or jax.devices()[0]
  key = (device.platform, device.device_kind, tuple(sizes), reps, jnp.dtype(dtype).name)
  if key not in _PEAK_CACHE:
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    table = {}
    for n in sizes:
      a = jax.device_put(jnp.ones((n, n), dtype), device)
      f(a).block_until_ready()
      rates = []
      for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        rates.append(2 * n ** 3 / (time.perf_counter() - t))
      rates.sort()
      pick = lambda q: rates[min(len(rates) - 1, int(q * len(rates)))]
      table[n] = (statistics.median(rates), pick(0.1), pick(0.9))
    _PEAK_CACHE[key] = (max(m for m, _, _ in table.values()), table)
  return _PEAK_CACHE[key]


def measured_matmul_peak(n=1024, reps=11, device=None, dtype=jnp.float32):
  """Median FLOP/s of a jitted n x n matmul on one device (see `matmul_peak`)."""
  return matmul_peak(device, dtype, (n,), reps)[0]


def format_peak(table):
  """One line: the median and 10th-90th percentile spread per matmul size, in GFLOP/s."""
  return ", ".join(f"{n}^2: {m / 1e9:,.0f} ({lo / 1e9:,.0f}-{hi / 1e9:,.0f})"
                   for n, (m, lo, hi) in table.items())


def peak_flops_per_device(device=None, dtype=jnp.float32):
  """Vendor bf16 peak on GPU/TPU (by device_kind), on CPU the measured matmul peak
  in `dtype` (the dtype a model's matmuls run in)."""
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    kind = device.device_kind
    for name, flops in VENDOR_PEAK_FLOPS:
      if name.lower() in kind.lower():
        return flops
  return measured_matmul_peak(device=device, dtype=dtype)


def format_eta(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_lines(path, series, xlabel, ylabel, title=None, vline=None):
  """Writes a PNG of line plots: `series` is {label: (xs, ys, style)}; `vline` is
  (x, label) for a dashed vertical line. The one matplotlib (Agg) setup."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, (xs, ys, style) in series.items():
    ax.plot(xs, ys, style, label=label, markersize=3)
  if vline is not None:
    ax.axvline(vline[0], color="gray", linestyle="--", label=vline[1])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class Writer:
  """metrics.jsonl + TensorBoard (tensorboardX) + the records behind loss.png.

  On resume (`resume_step`), records of steps after it (they are redone) are
  dropped from metrics.jsonl, so every step appears once.
  """

  def __init__(self, workdir, enabled=True, resume_step=0):
    self.enabled = enabled and jax.process_index() == 0
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._records = []
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._load(resume_step)
      self._jsonl = open(self.path, "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except Exception:  # pylint: disable=broad-except
        self._tb = None

  def _load(self, resume_step):
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
          if rec["step"] <= resume_step:
            self._records.append(rec)
    text = "".join(json.dumps(r) + "\n" for r in self._records)
    workdir_lib.atomic_write(self.path, text)

  def records(self, split):
    return [r for r in self._records if r.get("split") == split and "loss" in r]

  def write(self, step, split, scalars):
    """Logs a dict of scalars for `split` ('train' | 'val') at `step`."""
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    self._records.append(rec)
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), step)

  def plot(self):
    """Writes workdir/loss.png with the train and val curves."""
    if not self.enabled or not self.records("train"):
      return
    series = {}
    for split, style in (("train", "-"), ("val", "o-")):
      recs = self.records(split)
      if recs:
        series[split] = ([r["step"] for r in recs], [r["loss"] for r in recs], style)
    plot_lines(os.path.join(self.workdir, "loss.png"), series, "step", "loss (nats/token)")

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """tqdm bar with loss, lr, tokens/s, MFU and ETA (process 0 only)."""

  def __init__(self, start, total, enabled=True):
    self.enabled = enabled and jax.process_index() == 0
    self.bar = None
    if self.enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step",
                      bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

  def update(self, step, postfix):
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix_str(postfix, refresh=False)
      self.bar.refresh()

  def write(self, msg):
    if self.enabled:
      if self.bar is not None:
        self.bar.write(msg)
      else:
        print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def mfu(tokens_per_s, flops_per_token_train, peak_total):
  return tokens_per_s * flops_per_token_train / max(peak_total, 1.0)


@jax.jit
def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
