"""Training: `python -m mmrec_jax.train --config=configs/tiny.py [--workdir=runs/tiny]`.

One jitted, sharded train step (AdamW, clipping, gradient accumulation), periodic
evaluation with early stopping, async Orbax checkpoints with exact resume, and a
clean stop on SIGTERM / Ctrl-C. See `checkpoint.py` for the workdir layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shlex
import signal
import sys
import time

import jax
import optax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import metrics as metrics_lib
from mmrec_jax import optimizer as opt_lib
from mmrec_jax import sharding as shard_lib

BATCH_KEYS = ("inputs", "targets", "reset", "mask")


class TrainError(RuntimeError):
  """A run cannot go on (non-finite loss, bad workdir); one-line message."""


@dataclasses.dataclass
class Result:
  """What `run` returns: final step, why it stopped, and the logged losses."""
  step: int
  reason: str                      # done | early_stop | interrupted
  train_losses: list               # [(step, loss)] at every log point
  val_losses: list                 # [(step, val_loss)]
  params: object = None


# ----------------------------------------------------------------------------- loss


def cross_entropy(logits_BTV, targets_BT, mask_BT):
  """(sum of masked nats, number of real targets, correct predictions); no shift."""
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  mask_BT = mask_BT.astype(jnp.float32)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT), jnp.sum(correct_BT * mask_BT)


def _microbatches(batch, n, mesh):
  """[B, ...] -> [n, B/n, ...]; microbatch i takes rows i, i+n, ... (keeps the sharding)."""
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shard_lib.BATCH_AXES))

  def one(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sh)
  return {k: one(v) for k, v in batch.items()}


def make_train_step(model, tx, schedule, aux_weights, grad_accum, mesh):
  """train_step(params, opt_state, batch, rng, step) -> (params, opt_state, metrics)."""

  def loss_fn(params, mb, key, denom):
    logits_BTV, _, aux = model.apply(
        {"params": params}, mb["inputs"], state=None, reset=mb["reset"],
        deterministic=False, rngs={"dropout": key})
    ce_sum, _, _ = cross_entropy(logits_BTV, mb["targets"], mb["mask"])
    loss = ce_sum / denom
    for k, w in aux_weights.items():
      loss = loss + w * aux[k] / grad_accum
    return loss, (ce_sum, {k: aux[k] for k in aux_weights})

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(params, opt_state, batch, rng, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    denom = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    if grad_accum == 1:
      (_, (ce_sum, aux)), grads = grad_fn(params, batch, jax.random.fold_in(key, 0), denom)
    else:
      def body(carry, xs):
        g_acc, ce_acc, aux_acc = carry
        mb, i = xs
        (_, (ce, aux)), g = grad_fn(params, mb, jax.random.fold_in(key, i), denom)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        aux_acc = {k: aux_acc[k] + aux[k] / grad_accum for k in aux_acc}
        return (g_acc, ce_acc + ce, aux_acc), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      aux0 = {k: jnp.zeros((), jnp.float32) for k in aux_weights}
      (grads, ce_sum, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), aux0),
          (_microbatches(batch, grad_accum, mesh), jnp.arange(grad_accum)))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    ce = ce_sum / denom
    loss = ce + sum(w * aux[k] for k, w in aux_weights.items())
    out = {"loss": loss, "ce": ce, "grad_norm": optax.tree.norm(grads),
           "lr": schedule(step), "tokens": denom}
    out.update({f"aux_{k}": v for k, v in aux.items()})
    return params, opt_state, out

  return train_step


def make_eval_step(model):
  """eval_step(params, batch) -> {'ce_sum', 'n', 'correct'} (sums over real targets)."""
  def eval_step(params, batch):
    logits_BTV, _, _ = model.apply({"params": params}, batch["inputs"], state=None,
                                   reset=batch["reset"], deterministic=True)
    ce_sum, n, correct = cross_entropy(logits_BTV, batch["targets"], batch["mask"])
    return {"ce_sum": ce_sum, "n": n, "correct": correct}
  return eval_step


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
  """Model, optimizer, mesh, shardings and jitted steps of one run."""
  model: object
  mcfg: object
  mesh: object
  tx: object
  schedule: object
  param_sh: object
  opt_sh: object
  abstract_params: object
  abstract_opt: object
  train_step: object
  eval_step: object
  init_key: object
  rng: object                      # uint32 key data (replicated)


def setup(config, devices=None):
  """Builds everything that does not touch data or disk."""
  from mmrec_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  t = config.train
  mcfg = model_lib.ModelConfig.from_config(config.model)
  model = model_lib.MMRec(mcfg)
  mesh = shard_lib.make_mesh(config.mesh, devices)
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = t.batch_size // t.grad_accum
  if micro % n_batch:
    raise config_lib.ConfigError(
        f"train.batch_size/train.grad_accum={micro} is not divisible by mesh data*fsdp="
        f"{n_batch}; change the batch size or the mesh")
  root = jax.random.PRNGKey(t.seed)
  init_key, train_key = jax.random.split(root)
  abstract_boxed = jax.eval_shape(
      lambda k: model_lib.init_params(model, k, batch=1, seq_len=mcfg.chunk_size), init_key)
  param_sh = shard_lib.logical_shardings(abstract_boxed, mesh)
  abstract_params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(abstract_boxed), param_sh)
  schedule = opt_lib.lr_schedule(t)
  tx = opt_lib.make(t, opt_lib.decay_mask(abstract_boxed))
  opt_shapes = jax.eval_shape(tx.init, abstract_params)
  opt_sh = shard_lib.mirror_shardings(opt_shapes, param_sh, abstract_params, mesh)
  abstract_opt = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_shapes, opt_sh)
  repl = shard_lib.replicated(mesh)
  batch_sh = {k: shard_lib.batch_sharding(mesh) for k in BATCH_KEYS}
  step_fn = make_train_step(model, tx, schedule, model_lib.aux_weights(mcfg), t.grad_accum,
                            mesh)
  train_step = jax.jit(step_fn, in_shardings=(param_sh, opt_sh, batch_sh, repl, repl),
                       out_shardings=(param_sh, opt_sh, repl), donate_argnums=(0, 1))
  eval_step = jax.jit(make_eval_step(model), in_shardings=(param_sh, batch_sh),
                      out_shardings=repl)
  rng = jax.device_put(jax.random.key_data(train_key), repl)
  return Setup(model, mcfg, mesh, tx, schedule, param_sh, opt_sh, abstract_params,
               abstract_opt, train_step, eval_step, init_key, rng)


def init_state(s):
  """Fresh (params, opt_state), created directly with their shardings."""
  from mmrec_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  params = jax.jit(
      lambda k: nn.unbox(model_lib.init_params(s.model, k, batch=1, seq_len=s.mcfg.chunk_size)),
      out_shardings=s.param_sh)(s.init_key)
  opt_state = jax.jit(s.tx.init, in_shardings=(s.param_sh,), out_shardings=s.opt_sh)(params)
  return params, opt_state


@jax.jit
def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def evaluate(s, params, val_batches):
  """Val loss, perplexity, bits per byte and token accuracy over `val_batches`."""
  tot = {"ce_sum": 0.0, "n": 0.0, "correct": 0.0}
  n_bytes = 0
  for b in val_batches:
    out = s.eval_step(params, shard_lib.put_batch({k: b[k] for k in BATCH_KEYS}, s.mesh))
    for k in tot:
      tot[k] += float(out[k])
    if "bytes" in b:
      n_bytes += int(np.sum(np.asarray(b["bytes"]) * (np.asarray(b["mask"]) > 0)))
  n = max(tot["n"], 1.0)
  loss = tot["ce_sum"] / n
  res = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": tot["correct"] / n}
  if n_bytes:
    res["bpb"] = tot["ce_sum"] / math.log(2) / n_bytes
  return res


def sample(s, params, tok, prompts_BT, n_new, seed=0, temperature=0.8):
  """(prompt text, sampled continuation) per prompt row, via `sampling.Decoder`."""
  from mmrec_jax import sampling  # pylint: disable=g-import-not-at-top
  eod, pad = tok.token_to_id("<|eod|>"), tok.token_to_id("<|pad|>")
  prompts = [[int(x) for x in p if int(x) not in (eod, pad)] for p in prompts_BT]
  new = sampling.Decoder(s.model, eod, pad).generate(
      {"params": params}, prompts, n_new, temperature=temperature, seed=seed)
  return [(tok.decode(p), tok.decode(n)) for p, n in zip(prompts, new)]


# ----------------------------------------------------------------------------- run


def _resume_command(argv, workdir):
  args = list(argv[1:]) if argv else []
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  return "python -m mmrec_jax.train " + " ".join(shlex.quote(a) for a in args)


# Model fields that change how the step runs, not the parameters: a run may resume with new values.
RESUMABLE_MODEL_FIELDS = ("dtype", "remat", "scan_impl", "scan_chunk", "dropout")


def check_workdir_config(workdir, config):
  """ConfigError if workdir/config.json holds a different model section."""
  path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = ckpt_lib.load_run_config(workdir)
  diff = ckpt_lib.model_diff(saved.model.to_dict(), config.model.to_dict())
  changed = [k for k in diff if k in RESUMABLE_MODEL_FIELDS]
  if changed and jax.process_index() == 0:
    print(f"note: resuming with changed {', '.join(f'model.{k}' for k in changed)} "
          "(these change how the model runs, not its parameters)")
  diff = [k for k in diff if k not in RESUMABLE_MODEL_FIELDS]
  if diff:
    detail = ", ".join(f"model.{k} (saved {saved.model.get(k)!r}, now {config.model.get(k)!r})"
                       for k in diff)
    raise config_lib.ConfigError(
        f"workdir {workdir} holds a run with a different model config: {detail}; "
        "pass a new --workdir to start a fresh run (or restore these values to resume)")


class _StopFlag:
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
      self.signal = "SIGTERM (another process)"
    return bool(np.any(flags))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def run(config, workdir, devices=None, argv=None, quiet=False):
  """Trains (or resumes) the run in `workdir`; returns a `Result`."""
  from mmrec_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  t, kc = config.train, config.checkpoint
  check_workdir_config(workdir, config)
  is_main = jax.process_index() == 0
  show = is_main and not quiet
  log = print if show else (lambda *a, **k: None)

  s = setup(config, devices)
  tok = data_lib.get_tokenizer(config, workdir)
  ds = data_lib.build(config, tok, process_index=jax.process_index(),
                      process_count=jax.process_count())
  ckpt_lib.save_run_config(workdir, config)
  it = ds.train_iter()
  val_batches = ds.val_batches(max_batches=t.eval_batches)
  mngr = ckpt_lib.make_manager(workdir, keep=kc.keep, async_save=kc.async_save)

  latest = mngr.latest_step()
  val_hist = []
  if latest is not None:
    rng_abs = jax.ShapeDtypeStruct(s.rng.shape, s.rng.dtype, sharding=s.rng.sharding)
    params, opt_state, rng, data_state, meta = ckpt_lib.restore(
        mngr, latest, s.abstract_params, s.abstract_opt, rng_abs)
    it.set_state(data_state)
    start = int(meta["step"])
    best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
    bad_evals = int(meta.get("bad_evals", 0))
    log(f"resumed from {ckpt_lib.checkpoint_dir(workdir)}/{start}")
  else:
    params, opt_state = init_state(s)
    rng = s.rng
    start, best_val, bad_evals = 0, math.inf, 0

  n_dev = s.mesh.devices.size
  from mmrec_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  log(f"model {s.mcfg.name}: {model_lib.count_params(s.abstract_params):,} parameters; "
      f"{n_dev} x {s.mesh.devices.flat[0].device_kind} devices, mesh "
      f"{dict(zip(s.mesh.axis_names, s.mesh.devices.shape))}")
  log(f"data: {config.data.path or 'built-in corpus (Python standard library sources)'}; "
      f"{ds.num_train_windows:,} training windows of {t.seq_len} tokens, "
      f"{len(val_batches)} validation batches; workdir {workdir}")
  flops_train = 3 * _flops(s, t.seq_len)
  peak = metrics_lib.peak_flops_per_device(s.mesh.devices.flat[0]) * n_dev
  tokens_per_step = t.batch_size * t.seq_len
  writer = metrics_lib.Writer(workdir, enabled=is_main)
  bar = metrics_lib.Progress(start, t.steps, enabled=show)
  train_hist, pending = [], []
  reason, step = "done", start
  last_saved = latest
  t_mark, steps_mark, compile_s = None, start, None

  def flush():
    """Fetches pending step metrics; raises TrainError at the first non-finite loss."""
    nonlocal pending
    out = None
    for st, m in pending:
      m = jax.device_get(m)
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise TrainError(
            f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {st}; "
            "stopped without saving "
            f"(last good checkpoint: step {mngr.latest_step()} in "
            f"{ckpt_lib.checkpoint_dir(workdir)}); lower train.lr or raise train.warmup_steps")
      out = (st, m)
    pending = []
    return out

  def do_save(st, val_loss=None):
    nonlocal last_saved
    if st != last_saved:
      if not all_finite(params):
        raise TrainError(f"non-finite parameters at step {st}; not saved (last good "
                         f"checkpoint: step {mngr.latest_step()}); lower train.lr")
      extra = {"best_val": best_val if math.isfinite(best_val) else None,
               "bad_evals": bad_evals}
      ckpt_lib.save(mngr, st, params, opt_state, rng, data_state, val_loss, extra)
      last_saved = st

  data_state = it.get_state()
  debug_sleep = float(os.environ.get("MMREC_DEBUG_STEP_SLEEP", "0"))  # tests: widen steps
  try:
    with _StopFlag() as stop:
      stop_now = False
      if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
        reason = "early_stop"  # resumed an early-stopped run: nothing left to do
      while step < t.steps and not stop_now and reason == "done":
        batch = next(it)
        data_state = it.get_state()
        gb = shard_lib.put_batch({k: batch[k] for k in BATCH_KEYS}, s.mesh)
        t0 = time.perf_counter()
        params, opt_state, m = s.train_step(params, opt_state, gb, rng, jnp.int32(step))
        step += 1
        pending.append((step, m))
        if debug_sleep:
          time.sleep(debug_sleep)
        if compile_s is None:
          jax.block_until_ready(m)
          compile_s = time.perf_counter() - t0
          t_mark, steps_mark = time.perf_counter(), step
        is_eval = step % t.eval_every == 0 or step == t.steps
        is_save = step % kc.every == 0 or step == t.steps
        is_log = step % t.log_every == 0
        stop_now = stop.requested(is_log or is_eval or is_save)
        if is_log or is_eval or is_save or stop_now:
          st, m = flush()
          now = time.perf_counter()
          rate = (step - steps_mark) * tokens_per_step / max(now - t_mark, 1e-9)
          util = metrics_lib.mfu(rate, flops_train, peak)
          eta = (t.steps - step) * tokens_per_step / rate if rate > 0 else math.inf
          scalars = {k: float(v) for k, v in m.items()}
          scalars.update(tokens_per_s=rate, mfu=util)
          if step == steps_mark:
            scalars["compile_s"] = compile_s
          writer.write(st, "train", scalars)
          train_hist.append((st, scalars["loss"]))
          bar.update(step, f"loss={scalars['loss']:.4f} lr={scalars['lr']:.2e} "
                     f"tok/s={rate:,.0f} mfu={100 * util:.2f}% eta={metrics_lib.format_eta(eta)}")
          if step > steps_mark:
            t_mark, steps_mark = now, step
        val_loss = None
        if is_eval:
          ev = evaluate(s, params, val_batches)
          val_loss = ev["loss"]
          writer.write(step, "val", ev)
          val_hist.append((step, val_loss))
          bar.write(f"step {step}: val loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f} "
                    + (f"bpb {ev['bpb']:.4f} " if "bpb" in ev else "")
                    + f"acc {ev['accuracy']:.3f}")
          if val_loss < best_val - t.early_stopping_min_delta:
            best_val, bad_evals = val_loss, 0
          else:
            bad_evals += 1
          if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
            reason = "early_stop"
        if is_save or is_eval and val_loss is not None and val_loss <= best_val:
          do_save(step, val_loss)
        if is_eval or is_save:
          t_mark, steps_mark = time.perf_counter(), step  # rates exclude eval / save
        if reason == "early_stop":
          bar.write(f"early stopping at step {step}: no val improvement in "
                    f"{bad_evals} evaluations (best {best_val:.4f})")
          break
      if stop_now and step < t.steps and reason == "done":
        reason = "interrupted"
        flush()
      do_save(step)
  except TrainError:
    pending = []
    mngr.wait_until_finished()
    mngr.close()
    bar.close()
    writer.close()
    raise
  mngr.wait_until_finished()
  mngr.close()
  bar.close()
  writer.plot()
  writer.close()
  if reason == "interrupted":
    log(f"interrupted by {stop.signal} at step {step}; checkpoint saved in "
        f"{ckpt_lib.checkpoint_dir(workdir)}. Resume with:\n  {_resume_command(argv, workdir)}")
  else:
    log(f"finished at step {step} ({reason}); workdir {workdir}")
    if t.samples > 0 and jax.process_count() == 1 and val_batches and show:
      prompts = np.asarray(val_batches[0]["inputs"])[:t.samples, :min(16, t.seq_len)]
      for p, c in sample(s, params, tok, prompts, t.sample_tokens, seed=t.seed):
        log(f"--- {p!r} => {c!r}")
  return Result(step, reason, train_hist, val_hist, params)


def _flops(s, seq_len):
  from mmrec_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.flops_per_token(s.mcfg, seq_len)


# ----------------------------------------------------------------------------- main


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = flags.FLAGS.workdir or os.path.join("runs", config.model.name)
  try:
    result = run(config, workdir, argv=sys.argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "DataError":
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    raise
  del result


def cli():
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Run directory (default: runs/<model name>).")
  flags.mark_flag_as_required("config")
  logging.set_verbosity(logging.ERROR)
  shard_lib.maybe_initialize_distributed()
  app.run(main)


if __name__ == "__main__":
  cli()
