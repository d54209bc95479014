"""What runs between training steps: logging, evaluation, checkpointing.

Each hook says when it is due and acts on the run (`Run`, built once and never
changed) and its `Progress` (the one place a run's counters live). The loop calls
the due hooks in a fixed order, log -> eval -> checkpoint: a checkpoint records
the evaluation of its own step.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from mmrec_jax.errors import TrainError
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax.training import sharding as shard_lib


@dataclasses.dataclass
class Progress:
  """A run's changing counters (what a checkpoint's `meta` keeps, and the clock)."""
  step: int = 0
  state: object = None                 # the TrainState
  data_state: object = None            # the data iterator's state after the last batch
  first_loss: float | None = None
  best_val: float = math.inf
  bad_evals: int = 0
  best_step: int | None = None
  val_loss: float | None = None        # the validation loss of this step, if evaluated
  reason: str = "done"                 # done | early_stop | interrupted
  last_saved: int | None = None
  pending: list = dataclasses.field(default_factory=list)   # [(step, device metrics)]
  train_hist: list = dataclasses.field(default_factory=list)
  val_hist: list = dataclasses.field(default_factory=list)
  t_mark: float | None = None          # the throughput clock: time and step of its start
  steps_mark: int = 0
  compile_s: float | None = None

  def meta(self):
    """The loop state a checkpoint stores (early stopping and the report resume from it)."""
    return {"best_val": self.best_val if math.isfinite(self.best_val) else None,
            "bad_evals": self.bad_evals, "best_step": self.best_step,
            "first_loss": self.first_loss}

  def restart_clock(self):
    self.t_mark, self.steps_mark = time.perf_counter(), self.step


def flush_metrics(run, p: Progress):
  """Fetches the pending step metrics, writes the last one; TrainError at a
  non-finite loss (nothing is saved then: the last good checkpoint stays)."""
  last = None
  for st, m in p.pending:
    m = jax.device_get(m)
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      p.pending = []
      good = run.mngr.latest_step()
      where = (f"last good checkpoint: step {good} in {ckpt_lib.checkpoint_dir(run.workdir)}"
               if good is not None else "no checkpoint was saved before it")
      raise TrainError(
          f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {st}; "
          f"stopped without saving ({where}); lower train.lr or raise train.warmup_steps")
    last = (st, m)
    if p.first_loss is None:
      p.first_loss = float(m["loss"])
  p.pending = []
  if last is None:
    return
  st, m = last
  now = time.perf_counter()
  rate = (st - p.steps_mark) * run.tokens_per_step / max(now - p.t_mark, 1e-9)
  util = metrics_lib.mfu(rate, run.flops_train, run.peak)
  eta = (run.total_steps - st) * run.tokens_per_step / rate if rate > 0 else math.inf
  scalars = {k: float(v) for k, v in m.items()}
  scalars.update(tokens_per_s=rate, mfu=util, epoch=st / run.steps_per_epoch)
  if st == p.steps_mark:
    scalars["compile_s"] = p.compile_s
  run.writer.write(st, "train", scalars)
  p.train_hist.append((st, scalars["loss"]))
  run.bar.update(st, f"loss={scalars['loss']:.4f} lr={scalars['lr']:.2e} "
                 f"tok/s={rate:,.0f} mfu={100 * util:.2f}% eta={metrics_lib.format_eta(eta)}")
  if st > p.steps_mark:
    p.t_mark, p.steps_mark = now, st


def save(run, p: Progress):
  """Starts a checkpoint of the step (once); TrainError for non-finite parameters."""
  if p.step == p.last_saved:
    return
  if not metrics_lib.all_finite(p.state.params):
    raise TrainError(f"non-finite parameters at step {p.step}; not saved (last good "
                     f"checkpoint: step {run.mngr.latest_step()}); lower train.lr")
  s = p.state
  ckpt_lib.save(run.mngr, p.step, s.params, s.opt_state, s.rng, p.data_state, p.val_loss,
                p.meta(), carry=s.carry)
  p.last_saved = p.step


class LogHook:
  """Every `train.log_every` steps: the step metrics written, the bar updated."""
  pauses_clock = False   # cheap: counted in tokens/s

  def __init__(self, every):
    self.every = every

  def due(self, run, p):
    return p.step % self.every == 0

  def __call__(self, run, p):
    flush_metrics(run, p)


class EvalHook:
  """Every `train.eval_every` steps and at the last: validation metrics, the best
  loss, early stopping."""
  pauses_clock = True    # not training: excluded from tokens/s

  def __init__(self, every, patience, min_delta):
    self.every, self.patience, self.min_delta = every, patience, min_delta

  def due(self, run, p):
    return p.step % self.every == 0 or p.step == run.total_steps

  def __call__(self, run, p):
    if not run.val_batches:
      return
    ev = loss_lib.evaluate(run.setup.eval_step, p.state.params, run.val_batches,
                           put=lambda b: shard_lib.put_batch(b, run.setup.mesh))
    p.val_loss = ev["loss"]
    run.writer.write(p.step, "val", ev)
    p.val_hist.append((p.step, ev["loss"]))
    run.bar.write(f"step {p.step}: val loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f} "
                  f"bpb {ev['bits_per_byte']:.4f} acc {ev['token_accuracy']:.3f} "
                  f"({ev['tokens']:,} tokens)")
    if ev["loss"] < p.best_val - self.min_delta:
      p.best_val, p.bad_evals, p.best_step = ev["loss"], 0, p.step
    else:
      p.bad_evals += 1
    if self.patience and p.bad_evals >= self.patience:
      p.reason = "early_stop"
      run.bar.write(f"early stopping at step {p.step}: no val improvement in "
                    f"{p.bad_evals} evaluations (best {p.best_val:.4f})")


class CheckpointHook:
  """Every `checkpoint.every` steps, at the last, and whenever validation improved."""
  pauses_clock = True

  def __init__(self, every):
    self.every = every

  def due(self, run, p):
    return (p.step % self.every == 0 or p.step == run.total_steps
            or (p.val_loss is not None and p.best_step == p.step))

  def __call__(self, run, p):
    save(run, p)


def hooks_of(config):
  """The run's hooks, in the order they run after a step."""
  t = config.train
  return (LogHook(t.log_every),
          EvalHook(t.eval_every, t.early_stopping_patience, t.early_stopping_min_delta),
          CheckpointHook(config.checkpoint.every))
