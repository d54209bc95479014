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

Public: `restore_newest_good(mngr, ...)` (resume), `restore_params(workdir, which)`
(inference), `load_run_config(workdir)` (the run's typed config). A checkpoint that does not restore
(truncated, bit-flipped, an item missing) is never deleted: resume skips it for
the newest one that restores; inference names it and the readable steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm_policies

from mmrec_jax.io import workdir as workdir_lib
from mmrec_jax.errors import LoadError, StorageError, TrainError, UsageError
from mmrec_jax.io import checksum as checksum_lib

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


def save(mngr, step, params, opt_state, rng, data_state, val_loss=None, extra=None,
         carry=None):
  """Starts an (async) save of a full training state; returns False if it exists.

  `extra`: JSON-serialisable loop state stored in `meta` (e.g. early-stopping counters).
  `carry`: the model state carried between steps (`train.carry_state`), if any.
  """
  if step in mngr.all_steps():
    return False
  train = {"step": np.asarray(step, np.int32), "rng": rng}
  if carry is not None:
    train["carry"] = carry
  meta = {"step": int(step), "val_loss": None if val_loss is None else float(val_loss),
          "time": time.time(), **(extra or {}),
          "checksum": {"params": checksum_lib.checksum(params),
                       "opt_state": checksum_lib.checksum(opt_state)}}
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      train=ocp.args.StandardSave(train), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta))
  metrics = None if val_loss is None else {"val_loss": float(val_loss)}
  with storage_errors(mngr, step):
    return mngr.save(step, args=args, metrics=metrics, force=True)


def finish(mngr):
  """Waits for the last (async) save and closes the manager; StorageError (one line)
  if a save failed, with its temporary folder removed."""
  with storage_errors(mngr, None):
    mngr.wait_until_finished()
  mngr.close()


@contextlib.contextmanager
def storage_errors(mngr, step):
  """A failed write (now, or an earlier async save surfacing here) as one StorageError
  naming the folder and the fix; the failed save's temporary folders are removed,
  so the newest complete checkpoint stays the latest."""
  try:
    with _quiet_orbax():
      yield
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
    if isinstance(e, (TrainError, UsageError)):
      raise
    where = str(mngr.directory)
    failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", _chain_text(e))
    step = int(failed.group(1)) if failed else step
    _remove_partial_saves(where)
    kept = [s for s in sorted(mngr.all_steps(read=True))
            if os.path.isdir(os.path.join(where, str(s)))]
    last = f"step {kept[-1]} is the latest checkpoint" if kept else "no checkpoint was kept"
    raise StorageError(
        f"cannot write the checkpoint{f' of step {step}' if step is not None else ''} in "
        f"{where}: {_storage_reason(e)}; {last}; free space (or make the folder writable), then "
        "rerun the same command to resume") from None


def _chain_text(e):
  parts, c = [], e
  while c is not None and len(parts) < 8:
    parts.append(str(c))
    c = c.__cause__ or c.__context__
  return " ".join(parts)


def _storage_reason(e):
  """What went wrong writing, in a few words."""
  text = _chain_text(e)
  for needle, words in (("No space left", "no space left on device"),
                        ("Read-only file system", "the file system is read-only"),
                        ("Permission denied", "permission denied"),
                        ("No such file or directory", "the folder vanished")):
    if needle in text:
      return words
  return short_reason(e)


def _remove_partial_saves(directory):
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class ChecksumMismatch(Exception):
  """A restored tree's values do not match the checksum saved with them."""


def verify(meta, **trees):
  """ChecksumMismatch if a restored tree differs from its saved checksum (checkpoints
  saved without checksums are not checked)."""
  saved = (meta or {}).get("checksum") or {}
  for name, tree in trees.items():
    if name in saved and checksum_lib.checksum(tree) != int(saved[name]):
      raise ChecksumMismatch(f"DATA_LOSS: the {name} values do not match their checksum "
                             "(a corrupted file)")


def restore(mngr, step, abstract_params, abstract_opt_state, abstract_rng, abstract_carry=None):
  """Restores a full training state onto the shardings of the abstract trees:
  (params, opt_state, rng, data_state, meta), and the carried model state last
  when `abstract_carry` is given."""
  train = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=abstract_rng.sharding),
           "rng": abstract_rng}
  if abstract_carry is not None:
    train["carry"] = abstract_carry
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      train=ocp.args.StandardRestore(train), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  verify(out.meta, params=out.params, opt_state=out.opt_state)
  res = (out.params, out.opt_state, out.train["rng"], out.data, out.meta)
  return res + (out.train["carry"],) if abstract_carry is not None else res


_TS_STATUS = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT"
                        r"|INTERNAL|UNKNOWN|ABORTED|UNAVAILABLE|RESOURCE_EXHAUSTED"
                        r"|PERMISSION_DENIED):")
_TS_WHERE = re.compile(r' in OCDBT database at local file "[^"]*"| at local file "[^"]*"')


def short_reason(e, limit=160):
  """One line saying why a restore failed, from the innermost TensorStore status if any.

  e.g. 'OUT_OF_RANGE: Error reading "w/0.0": Requested byte range [0, 15139) is not
  valid for value of size 7711', or 'KeyError: Item "params" was not found ...'.
  """
  chain, c = [], e
  while c is not None and len(chain) < 8:
    chain.append(c)
    c = c.__cause__ or c.__context__
  text = None
  for c in reversed(chain):   # innermost first: TensorStore's own status
    m = _TS_STATUS.search(str(c))
    if m:
      text = _TS_WHERE.sub("", str(c)[m.start():]).split("; at byte")[0]
      break
  if text is None:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = (lines[0] if lines else "").strip("'\"")
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
  text = " ".join(text.replace("\\'", "'").split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax / absl log their own error traces on a failed restore: keep them off stderr."""
  loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, lv in zip(loggers, levels):
      l.setLevel(lv)


def restore_newest_good(mngr, abstract_params, abstract_opt_state, abstract_rng,
                        abstract_carry=None):
  """Resume: the newest checkpoint that restores, skipping (not deleting) bad ones.

  Returns `(params, opt_state, rng, data_state, meta, step, skipped)` (with the
  carried model state after `meta` when `abstract_carry` is given), with
  `skipped` a list of `(step, one-line reason)` for the newer steps that did not
  restore (truncated, bit-flipped, an item missing); None if there is no
  checkpoint at all. Raises TrainError naming every step tried if none restores.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  skipped = []
  for step in steps:
    try:
      with _quiet_orbax():
        res = restore(mngr, step, abstract_params, abstract_opt_state, abstract_rng,
                      abstract_carry)
    except Exception as e:  # pylint: disable=broad-except  (any failure: unreadable)
      skipped.append((int(step), short_reason(e)))
      continue
    return res + (int(step), skipped)
  tried = "; ".join(f"step {s}: {r}" for s, r in skipped)
  raise TrainError(f"no checkpoint in {mngr.directory} restores (tried {tried}); they are "
                   "left in place: move the checkpoints folder away to start afresh")


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


def _restore_params_at(mngr, step):
  """Unboxed params of `step` as arrays on one local (CPU) device."""
  try:
    meta = mngr.item_metadata(step)["params"]
  except KeyError:
    meta = None
  if meta is None:
    raise FileNotFoundError("its params/ item is missing")
  meta = getattr(meta, "tree", meta)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0]
                                          if _has_cpu() else jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), meta)
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  verify(out.meta, params=out.params)
  return out.params


def restore_params(workdir, which="latest"):
  """(params, step) for inference: unboxed params on one local (CPU) device; no optimizer.

  Raises LoadError (one line) if there is no checkpoint, `which` names no saved
  step, or the chosen step does not restore; then the message names the steps
  that do ("checkpoint step 12 in D is unreadable (...); readable steps: 4, 8;
  pass --checkpoint=8").
  """
  with _quiet_orbax():
    mngr = make_manager(workdir, async_save=False, read_only=True)
    try:
      try:
        step = resolve_step(mngr, which)
      except ValueError as e:
        raise LoadError(f"{workdir}: {e}") from None
      try:
        return _restore_params_at(mngr, step), step
      except Exception as e:  # pylint: disable=broad-except  (any failure: unreadable)
        reason = short_reason(e)
      readable = []
      for s in sorted(mngr.all_steps()):
        if s == step:
          continue
        try:
          _restore_params_at(mngr, s)
          readable.append(int(s))
        except Exception:  # pylint: disable=broad-except
          pass
      where = mngr.directory
      if readable:
        raise LoadError(f"checkpoint step {step} in {where} is unreadable ({reason}); readable "
                        f"steps: {', '.join(map(str, readable))}; pass "
                        f"--checkpoint={readable[-1]}")
      raise LoadError(f"checkpoint step {step} in {where} is unreadable ({reason}); no other "
                      "step is readable either; retrain or restore the checkpoints")
    finally:
      mngr.close()


def _has_cpu():
  try:
    return bool(jax.local_devices(backend="cpu"))
  except RuntimeError:
    return False


def save_run_config(workdir, config):
  """Writes workdir/config.json (process 0 only): the typed config as plain JSON."""
  if jax.process_index() != 0:
    return
  workdir_lib.atomic_write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def read_run_config_dict(workdir, flag="--workdir"):
  """workdir/config.json as a dict (plain JSON, no code); UsageError (one line, naming
  `flag`) if the folder or the file is missing or not this project's run config."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise UsageError(f"{flag}={workdir} is not a directory; pass the workdir of a run")
  if not os.path.isfile(path):
    raise UsageError(f"{flag}={workdir} holds no {CONFIG_FILE}: it is not a run's workdir; pass "
                     "the workdir of a run")
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} is unreadable ({short_reason(e)}); it is not this project's run "
                     "config: pass another --workdir, or move the file away") from None
  if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
    raise UsageError(f"{path} has no model section; it is not this project's run config: "
                     "pass another --workdir, or move the file away")
  return d


def load_run_config(workdir, flag="--workdir"):
  """The run's typed config from workdir/config.json; a field the run predates has
  the value the run had in effect (`BEFORE_FIELDS`, every section)."""
  from mmrec_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.from_dict(read_run_config_dict(workdir, flag), saved=True)


def has_run_config(workdir):
  return os.path.exists(os.path.join(workdir, CONFIG_FILE))
