"""The end of a run: its report (printed, and written to workdir/summary.json) and
sampled continuations of validation prompts."""
from __future__ import annotations

import jax
import numpy as np

from mmrec_jax.inference import sampling
from mmrec_jax.training import metrics as metrics_lib

SUMMARY_FILE = "summary.json"


def summary(run, p, wall_s, kept):
  """The end-of-run report as a dict (what summary.json holds)."""
  recs = run.writer.records("train")
  epochs = {}
  for r in recs:
    epochs.setdefault(int((r["step"] - 1) // run.steps_per_epoch), []).append(r["loss"])
  vals = run.writer.records("val")
  best = p.best_val if p.best_val != float("inf") else None
  return {
      "steps": p.step, "epochs": p.step / run.steps_per_epoch,
      "steps_per_epoch": run.steps_per_epoch, "reason": p.reason,
      "first_loss": recs[0]["loss"] if recs else None,
      "final_loss": recs[-1]["loss"] if recs else None,
      "epoch_mean_loss": {str(e + 1): float(np.mean(v)) for e, v in sorted(epochs.items())},
      "best_val_loss": best, "best_step": p.best_step,
      "final_val_loss": vals[-1]["loss"] if vals else None,
      "checkpoints": kept, "wall_s": wall_s,
  }


def print_summary(log, s):
  log(f"steps {s['steps']:,} ({s['epochs']:.2f} epochs of {s['steps_per_epoch']:,} steps), "
      f"stopped: {s['reason']}, wall time {metrics_lib.format_eta(s['wall_s'])}")
  if s["first_loss"] is not None:
    log(f"train loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} "
        f"({s['final_loss'] - s['first_loss']:+.4f})")
  for e, v in s["epoch_mean_loss"].items():
    log(f"  epoch {e}: mean train loss {v:.4f}")
  if s["final_val_loss"] is not None:
    best = (f"best val loss {s['best_val_loss']:.4f} at step {s['best_step']}; "
            if s["best_val_loss"] is not None else "")
    log(f"{best}final val loss {s['final_val_loss']:.4f}")
  log(f"checkpoints kept: {', '.join(map(str, s['checkpoints'])) or 'none'}")


def sample(run, params, n_samples, n_tokens, seed):
  """(prompt text, continuation text) for the first validation windows' beginnings."""
  if not n_samples or not run.val_batches or jax.process_count() > 1:
    return []
  tok = run.tok
  eod, pad = tok.token_to_id("<|eod|>"), tok.token_to_id("<|pad|>")
  prompts_BT = np.asarray(run.val_batches[0]["inputs"])[:n_samples, :16]
  prompts = [[int(x) for x in p if int(x) not in (eod, pad)] for p in prompts_BT]
  prompts = [p for p in prompts if p]
  new = sampling.Decoder(run.setup.model, eod, pad).generate(
      {"params": params}, prompts, n_tokens, temperature=0.8, seed=seed)
  return [(tok.decode(p), tok.decode(n)) for p, n in zip(prompts, new)]
