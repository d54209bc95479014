"""The training loop: `run(config, workdir)` trains (or resumes) one run.

The loop itself only steps; everything periodic is a small hook called after a
step with the loop as argument (`LogHook`, `EvalHook`, `CheckpointHook`), and
the end of a run prints a report and writes `workdir/summary.json`. See
`checkpoint.py` for the workdir layout.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import numpy as np
from flax import traverse_util

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import data as data_lib
from mmrec_jax import loss as loss_lib
from mmrec_jax import metrics as metrics_lib
from mmrec_jax import models
from mmrec_jax import sampling
from mmrec_jax import sharding as shard_lib
from mmrec_jax import train_state as ts_lib
from mmrec_jax import workdir as workdir_lib
from mmrec_jax.errors import ConfigError, TrainError

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class Result:
  """What `run` returns: final step, why it stopped, and the logged losses."""
  step: int
  reason: str                      # done | early_stop | interrupted
  train_losses: list               # [(step, loss)] at every log point
  val_losses: list                 # [(step, val_loss)]
  params: object = None
  signal: str | None = None        # the signal that interrupted the run
  summary: dict | None = None


# ----------------------------------------------------------------------------- resume


def keep_saved_fields(workdir, config, overrides, log):
  """A run saved before a model field existed resumes with the value it had in
  effect then (`BEFORE_FIELDS`), not today's default, unless this command sets the
  field (`overrides`: the model field names it sets); a note says which."""
  if not os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
    return
  raw = ckpt_lib.load_run_config(workdir, fill=False).model
  if raw.get("kind", models.DEFAULT_KIND) != config.model.get("kind", models.DEFAULT_KIND):
    return   # another model: check_workdir_model refuses it
  filled, names = models.fill_saved(raw)
  for k in names:
    if k in overrides or config.model.get(k) == filled[k]:
      continue
    log(f"note: this run was saved before model.{k} existed; it resumes with the value it "
        f"trained with, {filled[k]!r}, not today's default {config.model.get(k)!r} "
        f"(pass --config.model.{k}=VALUE to change it)")
    with config.unlocked():
      config.model[k] = filled[k]


def check_workdir_model(workdir, config, log):
  """ConfigError if the workdir's saved model has other parameter shapes than
  `config.model`; a note for fields that differ but keep the shapes (how the
  model runs: dtype, remat, scan_layers, scan_impl, max_seq_len, ...)."""
  if not os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
    return
  saved = ckpt_lib.load_run_config(workdir).model.to_dict()
  now = config.model.to_dict()
  diff = ckpt_lib.model_diff(saved, now)
  if not diff:
    return
  shapes = lambda m: {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      models.param_shapes(models.build(m)), sep="/").items()}
  try:
    same = shapes(saved) == shapes(now)
  except ConfigError:
    same = False
  detail = ", ".join(f"model.{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in diff)
  if not same:
    raise ConfigError(
        f"workdir {workdir} holds a run whose parameters have other shapes: {detail}; "
        "pass a new --workdir to start a fresh run (or restore these values to resume)")
  log(f"note: resuming with changed {detail} (the parameter shapes are the same)")


# ----------------------------------------------------------------------------- stop flag


class StopFlag:
  """Set by SIGTERM / SIGINT; the loop finishes the current step, saves and exits."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.signal = signal.Signals(signum).name

  def requested(self, sync_point):
    """Whether to stop after this step; multi-process: agreed on at sync points only."""
    if jax.process_count() == 1:
      return self.signal is not None
    if not sync_point:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    if np.any(flags) and self.signal is None:
      self.signal = "SIGTERM"
    return bool(np.any(flags))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ----------------------------------------------------------------------------- hooks


class LogHook:
  """Every `train.log_every` steps (and before evals/saves): fetch the step metrics,
  stop at a non-finite loss, write metrics and update the progress bar."""
  pauses_clock = False   # cheap: counted in tokens/s

  def __init__(self, every):
    self.every = every

  def due(self, loop, step):
    return step % self.every == 0

  def __call__(self, loop, step):
    loop.flush_metrics()


class EvalHook:
  """Every `train.eval_every` steps and at the last: validation metrics, best loss,
  early stopping."""
  pauses_clock = True    # not training: excluded from tokens/s

  def __init__(self, every, patience, min_delta):
    self.every, self.patience, self.min_delta = every, patience, min_delta

  def due(self, loop, step):
    return step % self.every == 0 or step == loop.total_steps

  def __call__(self, loop, step):
    if not loop.val_batches:
      return
    ev = loss_lib.evaluate(loop.s.eval_step, loop.state.params, loop.val_batches,
                           put=lambda b: shard_lib.put_batch(b, loop.s.mesh))
    loop.val_loss = ev["loss"]
    loop.writer.write(step, "val", ev)
    loop.val_hist.append((step, ev["loss"]))
    loop.bar.write(f"step {step}: val loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f} "
                   f"bpb {ev['bits_per_byte']:.4f} acc {ev['token_accuracy']:.3f} "
                   f"({ev['tokens']:,} tokens)")
    if ev["loss"] < loop.best_val - self.min_delta:
      loop.best_val, loop.bad_evals, loop.best_step = ev["loss"], 0, step
    else:
      loop.bad_evals += 1
    if self.patience and loop.bad_evals >= self.patience:
      loop.reason = "early_stop"
      loop.bar.write(f"early stopping at step {step}: no val improvement in "
                     f"{loop.bad_evals} evaluations (best {loop.best_val:.4f})")


class CheckpointHook:
  """Every `checkpoint.every` steps, at the last, and whenever validation improved."""
  pauses_clock = True

  def __init__(self, every):
    self.every = every

  def due(self, loop, step):
    return (step % self.every == 0 or step == loop.total_steps
            or (loop.val_loss is not None and loop.best_step == step))

  def __call__(self, loop, step):
    loop.save(step)


# ----------------------------------------------------------------------------- loop


class Loop:
  """One run: its setup, state, data, writers and the hooks' shared counters."""

  def __init__(self, config, workdir, devices=None, quiet=False, init_from=None, overrides=()):
    self.config, self.workdir = config, workdir
    t = config.train
    self.is_main = jax.process_index() == 0
    self.show = self.is_main and not quiet
    self.log = print if self.show else (lambda *a, **k: None)
    keep_saved_fields(workdir, config, overrides, self.log)
    check_workdir_model(workdir, config, self.log)
    self.tok = data_lib.get_tokenizer(config, workdir)
    self.ds = data_lib.build(config, self.tok, process_index=jax.process_index(),
                             process_count=jax.process_count())
    self.steps_per_epoch = max(1, self.ds.num_train_windows // t.batch_size)
    if t.epochs:
      with config.unlocked():
        config.train.steps = int(math.ceil(t.epochs * self.steps_per_epoch))
    self.total_steps = config.train.steps
    self.s = ts_lib.setup(config, devices)
    self.saved_carry_state = (  # of the run being resumed, before its config is rewritten
        bool(ckpt_lib.load_run_config(workdir).train.get("carry_state", False))
        if os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)) else None)
    ckpt_lib.save_run_config(workdir, config)
    self.it = self.ds.train_iter()
    self.val_batches = self.ds.val_batches(max_batches=t.eval_batches or None)
    self.mngr = ckpt_lib.make_manager(workdir, keep=config.checkpoint.keep,
                                      async_save=config.checkpoint.async_save)
    self.best_val, self.bad_evals, self.best_step = math.inf, 0, None
    self.val_hist, self.train_hist, self.pending = [], [], []
    self.reason, self.val_loss = "done", None
    self.first_loss = None
    self.start = 0
    self.state = None
    self.last_saved = None
    self._restore_or_init(init_from)
    self.data_state = self.it.get_state()
    self.writer = metrics_lib.Writer(workdir, enabled=self.is_main, resume_step=self.start)
    self.bar = metrics_lib.Progress(self.start, self.total_steps, enabled=self.show)
    n_dev = self.s.mesh.devices.size
    self.flops_train = ts_lib.flops_per_token_train(self.s, t.seq_len)
    self.peak = metrics_lib.peak_flops_per_device(
        self.s.mesh.devices.flat[0], models.make_config(config.model).matmul_compute_dtype) * n_dev
    self.tokens_per_step = t.batch_size * t.seq_len
    self.t_mark, self.steps_mark, self.compile_s = None, self.start, None
    self.t_start = time.time()
    self.log(f"model {config.model.name} ({config.model.kind}): "
             f"{models.count_params(self.s.abstract_state.params):,} parameters; "
             f"{n_dev} x {self.s.mesh.devices.flat[0].device_kind} devices, mesh "
             f"{dict(zip(self.s.mesh.axis_names, self.s.mesh.devices.shape))}")
    val_tokens = loss_lib.global_sum(sum(int(np.sum(b["mask"])) for b in self.val_batches))
    self.log(f"data: {config.data.path or 'built-in corpus (Python standard library sources)'}; "
             f"{self.ds.num_train_windows:,} training windows of {t.seq_len} tokens "
             f"({self.steps_per_epoch:,} steps per epoch), {len(self.val_batches)} validation "
             f"batches ({val_tokens:,} tokens); workdir {workdir}")

  def _restore_or_init(self, init_from):
    if self.mngr.latest_step() is None:
      self.state = ts_lib.create(self.s, init_from)
      return
    saved = self.saved_carry_state
    if saved is not None and saved != bool(self.config.train.carry_state):
      raise ConfigError(
          f"workdir {self.workdir} holds a run trained with train.carry_state={bool(saved)}; "
          f"resume it with the same setting, or pass a new --workdir")
    a = self.s.abstract_state
    params, opt_state, rng, data_state, meta, *carry, step, skipped = (
        ckpt_lib.restore_newest_good(self.mngr, a.params, a.opt_state, a.rng, a.carry))
    for bad, why in skipped:
      # Out of Orbax's way (its step would be saved again) but kept for inspection.
      moved = os.path.join(ckpt_lib.checkpoint_dir(self.workdir), f"{bad}.unreadable")
      if self.is_main:
        os.replace(os.path.join(ckpt_lib.checkpoint_dir(self.workdir), str(bad)), moved)
      self.log(f"warning: checkpoint step {bad} is unreadable ({why}); moved to {moved}, "
               f"resuming from step {step}")
    if skipped:
      data_lib.barrier("checkpoint_fallback")  # process 0 has moved them: all see it
      self.mngr.reload()
    self.it.set_state(data_state)
    self.start = int(meta["step"])
    self.state = ts_lib.TrainState(
        step=jax.device_put(np.int32(self.start), self.s.state_sharding.step),
        params=params, opt_state=opt_state, rng=rng, carry=carry[0] if carry else None)
    self.best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
    self.bad_evals = int(meta.get("bad_evals", 0))
    self.best_step = meta.get("best_step")
    self.first_loss = meta.get("first_loss")
    self.last_saved = step
    self.log(f"resumed from {ckpt_lib.checkpoint_dir(self.workdir)}/{step}")

  # -- pieces the hooks use

  def flush_metrics(self):
    """Fetches pending step metrics, writes the last; TrainError at a non-finite loss."""
    last = None
    for st, m in self.pending:
      m = jax.device_get(m)
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        self.pending = []
        good = self.mngr.latest_step()
        where = (f"last good checkpoint: step {good} in {ckpt_lib.checkpoint_dir(self.workdir)}"
                 if good is not None else "no checkpoint was saved before it")
        raise TrainError(
            f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {st}; "
            f"stopped without saving ({where}); lower train.lr or raise train.warmup_steps")
      last = (st, m)
      if self.first_loss is None:
        self.first_loss = float(m["loss"])
    self.pending = []
    if last is None:
      return
    st, m = last
    now = time.perf_counter()
    rate = (st - self.steps_mark) * self.tokens_per_step / max(now - self.t_mark, 1e-9)
    util = metrics_lib.mfu(rate, self.flops_train, self.peak)
    eta = (self.total_steps - st) * self.tokens_per_step / rate if rate > 0 else math.inf
    scalars = {k: float(v) for k, v in m.items()}
    scalars.update(tokens_per_s=rate, mfu=util, epoch=st / self.steps_per_epoch)
    if st == self.steps_mark:
      scalars["compile_s"] = self.compile_s
    self.writer.write(st, "train", scalars)
    self.train_hist.append((st, scalars["loss"]))
    self.bar.update(st, f"loss={scalars['loss']:.4f} lr={scalars['lr']:.2e} "
                    f"tok/s={rate:,.0f} mfu={100 * util:.2f}% "
                    f"eta={metrics_lib.format_eta(eta)}")
    if st > self.steps_mark:
      self.t_mark, self.steps_mark = now, st

  def save(self, step):
    if step == self.last_saved:
      return
    if not metrics_lib.all_finite(self.state.params):
      raise TrainError(f"non-finite parameters at step {step}; not saved (last good "
                       f"checkpoint: step {self.mngr.latest_step()}); lower train.lr")
    extra = {"best_val": self.best_val if math.isfinite(self.best_val) else None,
             "bad_evals": self.bad_evals, "best_step": self.best_step,
             "first_loss": self.first_loss}
    ckpt_lib.save(self.mngr, step, self.state.params, self.state.opt_state, self.state.rng,
                  self.data_state, self.val_loss, extra, carry=self.state.carry)
    self.last_saved = step

  # -- the loop

  def run(self, hooks=None):
    t, kc = self.config.train, self.config.checkpoint
    hooks = hooks or [LogHook(t.log_every),
                      EvalHook(t.eval_every, t.early_stopping_patience,
                               t.early_stopping_min_delta),
                      CheckpointHook(kc.every)]
    step = self.start
    stop = StopFlag()
    try:
      with stop:
        if t.early_stopping_patience and self.bad_evals >= t.early_stopping_patience:
          self.reason = "early_stop"  # resumed an early-stopped run: nothing left to do
        while step < self.total_steps and self.reason == "done":
          batch = next(self.it)
          self.data_state = self.it.get_state()
          gb = shard_lib.put_batch({k: batch[k] for k in loss_lib.BATCH_KEYS}, self.s.mesh)
          t0 = time.perf_counter()
          self.state, m = self.s.train_step(self.state, gb)
          step += 1
          self.pending.append((step, m))
          if self.compile_s is None:
            jax.block_until_ready(m)
            self.compile_s = time.perf_counter() - t0
            self.t_mark, self.steps_mark = time.perf_counter(), step
          due = [h for h in hooks if h.due(self, step)]
          stop_now = stop.requested(bool(due))
          self.val_loss = None
          if due or stop_now:   # hooks see the step's metrics; a non-finite loss stops here
            self.flush_metrics()
          for h in due:
            h(self, step)
          if any(h.pauses_clock for h in due):
            self.t_mark, self.steps_mark = time.perf_counter(), step
          if stop_now and step < self.total_steps and self.reason == "done":
            self.reason = "interrupted"
        self.flush_metrics()
        self.save(step)
    except TrainError:
      self.pending = []
      self.close(plot=False)
      raise
    self.close()
    return step, stop.signal

  def close(self, plot=True):
    self.mngr.wait_until_finished()
    self.kept = sorted(self.mngr.all_steps())
    self.mngr.close()
    self.bar.close()
    if plot:
      self.writer.plot()
    self.writer.close()

  def summary(self, step, wall_s):
    """The end-of-run report (also written to workdir/summary.json)."""
    recs = self.writer.records("train")
    epochs = {}
    for r in recs:
      epochs.setdefault(int((r["step"] - 1) // self.steps_per_epoch), []).append(r["loss"])
    vals = self.writer.records("val")
    out = {
        "steps": step, "epochs": step / self.steps_per_epoch,
        "steps_per_epoch": self.steps_per_epoch, "reason": self.reason,
        "first_loss": recs[0]["loss"] if recs else None,
        "final_loss": recs[-1]["loss"] if recs else None,
        "epoch_mean_loss": {str(e + 1): float(np.mean(v)) for e, v in sorted(epochs.items())},
        "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
        "best_step": self.best_step, "final_val_loss": vals[-1]["loss"] if vals else None,
        "checkpoints": self.kept, "wall_s": wall_s,
    }
    return out


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


def sample(loop, n_samples, n_tokens, seed):
  """(prompt text, continuation text) for the first validation windows' beginnings."""
  if not n_samples or not loop.val_batches or jax.process_count() > 1:
    return []
  tok = loop.tok
  eod, pad = tok.token_to_id("<|eod|>"), tok.token_to_id("<|pad|>")
  prompts_BT = np.asarray(loop.val_batches[0]["inputs"])[:n_samples, :16]
  prompts = [[int(x) for x in p if int(x) not in (eod, pad)] for p in prompts_BT]
  prompts = [p for p in prompts if p]
  new = sampling.Decoder(loop.s.model, eod, pad).generate(
      {"params": loop.state.params}, prompts, n_tokens, temperature=0.8, seed=seed)
  return [(tok.decode(p), tok.decode(n)) for p, n in zip(prompts, new)]


def run(config, workdir, devices=None, quiet=False, init_from=None, overrides=()):
  """Trains (or resumes) the run in `workdir`; returns a `Result`.

  `init_from`: parameters to start a fresh run from (ignored when the workdir
  already has a checkpoint to resume). `overrides`: the model fields the caller
  set on purpose; a run saved before one of them existed takes the caller's
  value, where otherwise it keeps the value it trained with (`keep_saved_fields`).
  """
  config_lib.validate(config)
  t0 = time.time()
  with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
    loop = Loop(config, workdir, devices, quiet, init_from, overrides)
    step, sig = loop.run()
    s = loop.summary(step, time.time() - t0)
    if loop.is_main:
      workdir_lib.atomic_write_json(os.path.join(workdir, SUMMARY_FILE), s)
    if loop.reason != "interrupted":
      loop.log(f"finished at step {step} ({loop.reason}); workdir {workdir}")
      print_summary(loop.log, s)
      if loop.show:
        t = config.train
        for i, (p, c) in enumerate(sample(loop, t.samples, t.sample_tokens, t.seed), 1):
          loop.log(f"--- sample {i} (prompt | continuation) ---\n{p} | {c}")
  return Result(step, loop.reason, loop.train_hist, loop.val_hist, loop.state.params, sig, s)
