"""Checkpoints and the run directory.

Workdir layout (`--workdir`, default `runs/<model name>`)::

  workdir/
    config.json           full config as JSON (read with `load_run_config`; never pickled)
    tokenizer.json        the `tokenizers` tokenizer of this run
    metrics.jsonl         one JSON object per log / eval event ({"step": ..., "split": ...})
    loss.png              train and val loss curves (written at the end)
    tb/                   TensorBoard event files
    checkpoints/<step>/   Orbax checkpoints (the last `checkpoint.keep` plus the best by
                          val loss), each with items:
        params/           unboxed float32 params (a plain pytree of arrays)
        opt_state/        optax state
        train/            {'step': int32 [], 'rng': uint32 key data}
        data/             data iterator state (JSON)
        meta/             {'step', 'val_loss' (or null), 'time', 'best_val', 'bad_evals'}
        metrics/          {'val_loss'} when the step was evaluated (Orbax best tracking)

Public: `restore_params(workdir, which)`, `load_run_config(workdir)`.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm_policies

ITEMS = ("params", "opt_state", "train", "data", "meta")
CONFIG_FILE = "config.json"


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _val_loss(metrics):
  return float(metrics["val_loss"])


def make_manager(workdir, keep=2, async_save=True, read_only=False):
  """CheckpointManager keeping the last `keep` steps plus the best by val loss."""
  policy = ocm_policies.AnyPreservationPolicy([
      ocm_policies.LatestN(n=keep),
      ocm_policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_val_loss, best_mode="min", keep_checkpoints_without_metrics=False,
      preservation_policy=policy, enable_async_checkpointing=async_save,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  handlers = {k: ocp.StandardCheckpointHandler() for k in ("params", "opt_state", "train")}
  handlers.update({k: ocp.JsonCheckpointHandler() for k in ("data", "meta")})
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)


def save(mngr, step, params, opt_state, rng, data_state, val_loss=None, extra=None):
  """Starts an (async) save of a full training state; returns False if it exists.

  `extra`: JSON-serialisable loop state stored in `meta` (e.g. early-stopping counters).
  """
  if step in mngr.all_steps():
    return False
  train = {"step": np.asarray(step, np.int32), "rng": rng}
  meta = {"step": int(step), "val_loss": None if val_loss is None else float(val_loss),
          "time": time.time(), **(extra or {})}
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      train=ocp.args.StandardSave(train), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta))
  metrics = None if val_loss is None else {"val_loss": float(val_loss)}
  return mngr.save(step, args=args, metrics=metrics, force=True)


def restore(mngr, step, abstract_params, abstract_opt_state, abstract_rng):
  """Restores a full training state onto the shardings of the abstract trees."""
  train = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=abstract_rng.sharding),
           "rng": abstract_rng}
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      train=ocp.args.StandardRestore(train), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out.params, out.opt_state, out.train["rng"], out.data, out.meta


def resolve_step(mngr, which):
  """'latest' | 'best' | int -> a saved step (ValueError if none)."""
  steps = mngr.all_steps()
  if not steps:
    raise ValueError(f"no checkpoints in {mngr.directory}")
  if which == "latest":
    return mngr.latest_step()
  if which == "best":
    return mngr.best_step() or mngr.latest_step()
  if int(which) not in steps:
    raise ValueError(f"step {which} not in saved steps {sorted(steps)}")
  return int(which)


def restore_params(workdir, which="latest"):
  """(params, step): unboxed params as arrays on one local (CPU) device; no optimizer."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # read-only manager warnings
  mngr = make_manager(workdir, async_save=False, read_only=True)
  try:
    step = resolve_step(mngr, which)
    meta = mngr.item_metadata(step)["params"]
    meta = getattr(meta, "tree", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0]
                                            if _has_cpu() else jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), meta)
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))
    return out.params, step
  finally:
    mngr.close()
    absl_log.setLevel(level)


def _has_cpu():
  try:
    return bool(jax.local_devices(backend="cpu"))
  except RuntimeError:
    return False


def save_run_config(workdir, config):
  """Writes workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_run_config(workdir):
  """The run's ConfigDict, read from workdir/config.json (plain JSON, no code)."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_diff(saved_model, model):
  """Names of model fields that differ between two model sections (dicts/ConfigDicts)."""
  a = dict(saved_model)
  b = dict(model)
  return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
