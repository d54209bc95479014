"""Resuming a run: is the workdir's run the same run, which values does a field it
predates take, and restoring the newest checkpoint that reads.

"The same run" is decided in one place, `compare`: the model fields that change
parameter shapes (refused on resume), the model fields that change the function
but not the shapes (a resume may change them: dtype, remat, scan_impl, ...), and
the training fields that make another recipe (a benchmark refuses those).
"""
from __future__ import annotations

import dataclasses
import os

from flax import traverse_util

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.data import pipeline as data_lib
from mmrec_jax.errors import ConfigError
from mmrec_jax.io import checkpoint as ckpt_lib

# Training settings that make a run another recipe (a longer run of the same recipe,
# with the steps, warmup and evaluations derived from its length, is the same one).
RECIPE_TRAIN_FIELDS = ("seed", "lr", "lr_scales", "batch_size", "seq_len", "carry_state",
                       "weight_decay")


@dataclasses.dataclass
class RunDiff:
  """How two configs of one workdir differ."""
  shapes: list          # model fields, when the parameter shapes differ (else [])
  model: list           # every model field that differs (and does something in either)
  recipe: list          # train fields of RECIPE_TRAIN_FIELDS that differ


def _shapes(m):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      models.param_shapes(models.build(m)), sep="/").items()}


def compare(saved: config_lib.Config, now: config_lib.Config) -> RunDiff:
  """The one decision of "is this the same run?" (see the module docstring)."""
  a, b = saved.model.to_dict(), now.model.to_dict()
  inert = set(saved.model.inert_fields()) & set(now.model.inert_fields())
  model = sorted(k for k in set(a) | set(b)
                 if a.get(k, "<missing>") != b.get(k, "<missing>") and k not in inert)
  shapes = []
  if model:
    try:
      same = saved.model.kind == now.model.kind and _shapes(saved.model) == _shapes(now.model)
    except ConfigError:
      same = False
    shapes = [] if same else model
  recipe = [k for k in RECIPE_TRAIN_FIELDS
            if getattr(saved.train, k) != getattr(now.train, k)]
  return RunDiff(shapes=shapes, model=model, recipe=recipe)


def keep_saved_fields(workdir, config, overrides, log):
  """The config to resume with: a run saved before a field existed resumes with the
  value it had in effect then (`BEFORE_FIELDS`, any section), not today's default,
  unless this command sets the field (`overrides`: "section.field" names); a note
  says which."""
  if not ckpt_lib.has_run_config(workdir):
    return config
  raw = ckpt_lib.read_run_config_dict(workdir)
  if raw["model"].get("kind", models.DEFAULT_KIND) != config.model.kind:
    return config   # another model: check_resumable refuses it
  saved = config_lib.from_dict(raw, saved=True)
  keep = {}
  for section, names in config_lib.predated_fields(raw).items():
    for k in names:
      path = f"{section}.{k}"
      was, now = getattr(getattr(saved, section), k), getattr(getattr(config, section), k)
      if path in overrides or was == now:
        continue
      log(f"note: this run was saved before {path} existed; it resumes with the value it "
          f"trained with, {was!r}, not today's default {now!r} (pass --config.{path}=VALUE "
          "to change it)")
      keep[path] = was
  return config.override(keep) if keep else config


def check_resumable(workdir, config, log):
  """ConfigError if the workdir's run has other parameter shapes or another
  `train.carry_state` than `config`; a note for model fields that differ but keep
  the shapes (how the model runs: dtype, remat, scan_layers, scan_impl, ...)."""
  if not ckpt_lib.has_run_config(workdir):
    return
  saved = ckpt_lib.load_run_config(workdir)
  if saved.train.carry_state != config.train.carry_state:
    raise ConfigError(
        f"workdir {workdir} holds a run trained with train.carry_state="
        f"{saved.train.carry_state}; resume it with the same setting, or pass a new --workdir")
  diff = compare(saved, config)
  if not diff.model:
    return
  a, b = saved.model.to_dict(), config.model.to_dict()
  detail = ", ".join(f"model.{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in diff.model)
  if diff.shapes:
    raise ConfigError(
        f"workdir {workdir} holds a run whose parameters have other shapes: {detail}; "
        "pass a new --workdir to start a fresh run (or restore these values to resume)")
  log(f"note: resuming with changed {detail} (the parameter shapes are the same)")


def restore(mngr, setup, workdir, is_main, log):
  """The newest checkpoint that restores, onto the run's shardings: (params,
  opt_state, rng, data_state, meta, carry or None, step). Unreadable newer ones
  are moved aside to `checkpoints/<step>.unreadable` with a warning."""
  a = setup.abstract_state
  params, opt_state, rng, data_state, meta, *carry, step, skipped = (
      ckpt_lib.restore_newest_good(mngr, a.params, a.opt_state, a.rng, a.carry))
  for bad, why in skipped:
    # Out of Orbax's way (its step would be saved again) but kept for inspection.
    moved = os.path.join(ckpt_lib.checkpoint_dir(workdir), f"{bad}.unreadable")
    if is_main:
      os.replace(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(bad)), moved)
    log(f"warning: checkpoint step {bad} is unreadable ({why}); moved to {moved}, "
        f"resuming from step {step}")
  if skipped:
    data_lib.barrier("checkpoint_fallback")  # process 0 has moved them: all see it
    mngr.reload()
  log(f"resumed from {ckpt_lib.checkpoint_dir(workdir)}/{step}")
  return params, opt_state, rng, data_state, meta, (carry[0] if carry else None), step
