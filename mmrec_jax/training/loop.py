"""The training loop: `run(config, workdir)` trains (or resumes) one run.

`prepare` builds what a run is made of once (`Run`: tokenizer, data, jitted
steps, checkpoint manager, writers); the loop steps and, after each step, calls
the due hooks (`hooks.py`) on the run's `Progress`; the end of a run writes its
report (`report.py`). Resuming: `resume.py`. The workdir's layout:
`io/checkpoint.py`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import numpy as np

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.errors import StorageError, TrainError
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.io import workdir as workdir_lib
from mmrec_jax.training import hooks as hooks_lib
from mmrec_jax.training import loss as loss_lib
from mmrec_jax.training import metrics as metrics_lib
from mmrec_jax.training import report
from mmrec_jax.training import resume
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.training import state as ts_lib

SUMMARY_FILE = report.SUMMARY_FILE


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


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run is made of, built once by `prepare` and never changed."""
  config: config_lib.Config        # as the run trains it (epochs turned into steps)
  workdir: str
  log: object                      # print, or a no-op (quiet runs, other processes)
  is_main: bool
  show: bool
  tok: object
  ds: object                       # data_lib.Datasets
  setup: ts_lib.Setup
  mngr: object                     # the Orbax CheckpointManager
  writer: metrics_lib.Writer
  bar: metrics_lib.Progress
  val_batches: list
  steps_per_epoch: int
  total_steps: int
  tokens_per_step: int
  flops_train: float
  peak: float


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


def prepare(config, workdir, devices=None, quiet=False, overrides=()):
  """(Run, Progress) of the run in `workdir`: resumed from its newest readable
  checkpoint, or fresh at step 0 (its state created later, see `start`)."""
  is_main = jax.process_index() == 0
  show = is_main and not quiet
  log = print if show else (lambda *a, **k: None)
  config = resume.keep_saved_fields(workdir, config, overrides, log)
  resume.check_resumable(workdir, config, log)
  t = config.train
  tok = data_lib.get_tokenizer(config, workdir)
  ds = data_lib.build(config, tok, process_index=jax.process_index(),
                      process_count=jax.process_count())
  steps_per_epoch = max(1, ds.num_train_windows // t.batch_size)
  if t.epochs:
    config = config.override({"train.steps": int(math.ceil(t.epochs * steps_per_epoch))})
  setup = ts_lib.setup(config, devices)
  ckpt_lib.save_run_config(workdir, config)
  mngr = ckpt_lib.make_manager(workdir, keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
  n_dev = setup.mesh.devices.size
  model_cfg = models.make_config(config.model)
  p = hooks_lib.Progress()
  if mngr.latest_step() is not None:
    params, opt_state, rng, data_state, meta, carry, step = resume.restore(
        mngr, setup, workdir, is_main, log)
    p.step = int(meta["step"])
    p.state = ts_lib.TrainState(
        step=jax.device_put(np.int32(p.step), setup.state_sharding.step),
        params=params, opt_state=opt_state, rng=rng, carry=carry)
    p.data_state = data_state
    p.best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
    p.bad_evals = int(meta.get("bad_evals", 0))
    p.best_step = meta.get("best_step")
    p.first_loss = meta.get("first_loss")
    p.last_saved = step
  run = Run(
      config=config, workdir=workdir, log=log, is_main=is_main, show=show, tok=tok, ds=ds,
      setup=setup, mngr=mngr,
      writer=metrics_lib.Writer(workdir, enabled=is_main, resume_step=p.step),
      bar=metrics_lib.Progress(p.step, config.train.steps, enabled=show),
      val_batches=ds.val_batches(max_batches=t.eval_batches or None),
      steps_per_epoch=steps_per_epoch, total_steps=config.train.steps,
      tokens_per_step=t.batch_size * t.seq_len,
      flops_train=ts_lib.flops_per_token_train(setup, t.seq_len),
      peak=metrics_lib.peak_flops_per_device(setup.mesh.devices.flat[0],
                                             model_cfg.matmul_compute_dtype) * n_dev)
  p.steps_mark = p.step
  log(f"model {config.model.name} ({config.model.kind}): "
      f"{models.count_params(setup.abstract_state.params):,} parameters; "
      f"{n_dev} x {setup.mesh.devices.flat[0].device_kind} devices, mesh "
      f"{dict(zip(setup.mesh.axis_names, setup.mesh.devices.shape))}")
  val_tokens = loss_lib.global_sum(sum(int(np.sum(b["mask"])) for b in run.val_batches))
  source = (f"generated task {config.data.task}" if config.data.task else
            config.data.path or "built-in corpus (Python standard library sources)")
  log(f"data: {source}; "
      f"{ds.num_train_windows:,} training windows of {t.seq_len} tokens "
      f"({steps_per_epoch:,} steps per epoch), {len(run.val_batches)} validation "
      f"batches ({val_tokens:,} tokens); workdir {workdir}")
  return run, p


def train(run: Run, p: hooks_lib.Progress, init_from=None):
  """Steps until the run's last step, an early stop or a signal; returns the signal."""
  t = run.config.train
  it = run.ds.train_iter()
  if p.state is None:
    p.state = ts_lib.create(run.setup, init_from)
  else:
    it.set_state(p.data_state)
  p.data_state = it.get_state()
  hooks = hooks_lib.hooks_of(run.config)
  stop = StopFlag()
  try:
    with stop:
      if t.early_stopping_patience and p.bad_evals >= t.early_stopping_patience:
        p.reason = "early_stop"  # resumed an early-stopped run: nothing left to do
      while p.step < run.total_steps and p.reason == "done":
        batch = next(it)
        p.data_state = it.get_state()
        gb = shard_lib.put_batch({k: batch[k] for k in loss_lib.BATCH_KEYS}, run.setup.mesh)
        t0 = time.perf_counter()
        p.state, m = run.setup.train_step(p.state, gb)
        p.step += 1
        p.pending.append((p.step, m))
        if p.compile_s is None:
          jax.block_until_ready(m)
          p.compile_s = time.perf_counter() - t0
          p.restart_clock()
        p.val_loss = None
        sync = any(h.due(run, p) for h in hooks)
        stop_now = stop.requested(sync)
        if sync or stop_now:   # hooks see the step's metrics; a non-finite loss stops here
          hooks_lib.flush_metrics(run, p)
        paused = False
        for h in hooks:   # in order: a checkpoint sees this step's evaluation
          if h.due(run, p):
            h(run, p)
            paused = paused or h.pauses_clock
        if paused:
          p.restart_clock()
        if stop_now and p.step < run.total_steps and p.reason == "done":
          p.reason = "interrupted"
      hooks_lib.flush_metrics(run, p)
      hooks_lib.save(run, p)
  except (TrainError, StorageError):
    p.pending = []
    close(run, failed=True)
    raise
  return stop.signal


def close(run, failed=False):
  """Waits for the last checkpoint; returns the steps kept. After a failure the
  run's own error is the one reported (a save failing meanwhile adds nothing)."""
  try:
    ckpt_lib.finish(run.mngr)
  except StorageError:
    if not failed:
      run.bar.close()
      run.writer.close()
      raise
  kept = sorted(run.mngr.all_steps())
  run.bar.close()
  if not failed:
    run.writer.plot()
  run.writer.close()
  return kept


def run(config, workdir, devices=None, quiet=False, init_from=None, overrides=()):
  """Trains (or resumes) the run in `workdir`; returns a `Result`.

  `config`: a Config (or a ConfigDict / dict of sections). `init_from`: parameters
  to start a fresh run from (ignored when the workdir already has a checkpoint to
  resume). `overrides`: the "section.field" names the caller set on purpose; a run
  saved before one of them existed takes the caller's value, where otherwise it
  keeps the value it trained with (`resume.keep_saved_fields`).
  """
  config = config_lib.typed(config)
  t0 = time.time()
  with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
    r, p = prepare(config, workdir, devices, quiet, overrides)
    sig = train(r, p, init_from)
    kept = close(r)
    s = report.summary(r, p, time.time() - t0, kept)
    if r.is_main:
      workdir_lib.atomic_write_json(os.path.join(workdir, SUMMARY_FILE), s)
    if p.reason != "interrupted":
      r.log(f"finished at step {p.step} ({p.reason}); workdir {workdir}")
      report.print_summary(r.log, s)
      if r.show:
        t = r.config.train
        for i, (a, b) in enumerate(report.sample(r, p.state.params, t.samples, t.sample_tokens,
                                                 t.seed), 1):
          r.log(f"--- sample {i} (prompt | continuation) ---\n{a} | {b}")
  return Result(p.step, p.reason, p.train_hist, p.val_hist, p.state.params, sig, s)
