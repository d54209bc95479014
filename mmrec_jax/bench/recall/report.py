"""The recall benchmark's report: tables (mean and spread over seeds), the plot and
the JSON object."""
from __future__ import annotations

import statistics


def mean_spread(values):
  vals = [v for v in values if v is not None]
  if not vals:
    return None, None
  return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def fmt(values):
  m, s = mean_spread(values)
  if m is None:
    return "-"
  return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ±{s:.2f}"


def table(results, columns, rows, title, log=print):
  """`results[column][row]` = [per-seed accuracy]; one line per row."""
  log(f"\n{title}")
  width = max(14, max(len(c) for c in columns) + 2)
  log(f"{'':>14}" + "".join(f"{c:>{width}}" for c in columns))
  for r in rows:
    log(f"{r:>14}" + "".join(f"{fmt(results[c].get(r, [])):>{width}}" for c in columns))


def plot(path, results, columns, mqar_rows, long_rows, train_len):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  panels = [("MQAR by number of pairs (at the training length)", mqar_rows, "pairs"),
            ("spread MQAR (one pair per chunk)", [r for r in long_rows if r.startswith("spread")],
             f"sequence length (x training length {train_len})"),
            ("passkey (4 tokens)", [r for r in long_rows if r.startswith("passkey")],
             f"sequence length (x training length {train_len})")]
  for ax, (title, rows, xlabel) in zip(axes, panels):
    xs = [int(r.split(":")[1].rstrip("x")) for r in rows]
    for c in columns:
      ys = [mean_spread(results[c].get(r, []))[0] for r in rows]
      ax.plot(xs, [float("nan") if y is None else y for y in ys],
              "x:" if c.endswith("/read_off") else "o-", label=c)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("answer accuracy")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
