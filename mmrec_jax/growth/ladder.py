"""Progressive training: a ladder of stages, each grown from the previous stage's best
checkpoint (`mmrec_jax.grow`), then trained with fresh optimizer state and a short
learning-rate re-warmup.

    python -m mmrec_jax.progressive --workdir=runs/ladder \
        [--configs=configs/tiny.py,configs/mini.py,configs/small.py] \
        [--steps=600,1000,2000] [--noise=0.05] [--rewarmup=0.03] \
        [--set=data.path=corpus/ --set=train.batch_size=8] [--stage_set=1:train.lr=0.002]

Stage i lives in `workdir/<i>_<name>`. Re-running the command after a kill at any
point resumes: finished stages (their `summary.json` says done / early_stop) are
skipped, a stage with a checkpoint resumes from it, a stage without one is grown
(atomically: into a temporary folder renamed when complete) and trained.
"""
from __future__ import annotations

import json
import os


from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax.growth import expander as grow
from mmrec_jax.growth.workdir import grow_workdir
from mmrec_jax.training import loop as loop_lib
from mmrec_jax import models
from mmrec_jax.errors import ConfigError, Interrupted

DEFAULT_CONFIGS = "configs/tiny.py,configs/mini.py,configs/small.py"


def stage_finished(workdir):
  """Whether the stage in `workdir` ran to its end (done or early-stopped)."""
  path = os.path.join(workdir, loop_lib.SUMMARY_FILE)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    s = json.load(f)
  return s.get("reason") in ("done", "early_stop")


def has_checkpoint(workdir):
  d = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def stage_configs(paths, steps, overrides=(), rewarmup=0.03, stage_overrides=()):
  """The config of every stage: its file, the overrides (then those of
  `stage_overrides`, `I:SECTION.FIELD=VALUE` for stage I only), its steps, and for
  grown stages a warmup of `rewarmup` x its steps (at least 1)."""
  per_stage = {}
  for o in stage_overrides or ():
    i, sep, rest = o.partition(":")
    if not sep or not i.isdigit() or int(i) >= len(paths):
      raise ConfigError(f"--stage_set={o}: expected I:SECTION.FIELD=VALUE with a stage "
                        f"index I in 0..{len(paths) - 1}")
    per_stage.setdefault(int(i), []).append(rest)
  out = []
  for i, path in enumerate(paths):
    c = config_lib.load(path)
    c = c.override(config_lib.parse_overrides(list(overrides or ()) + per_stage.get(i, []), c))
    if steps:
      c = c.override({"train.steps": int(steps[i])})
    if i > 0:
      c = c.override({"train.warmup_steps": max(1, int(round(rewarmup * c.train.steps)))})
    out.append(c)
  return out


def run_ladder(configs, workdirs, noise=0.05, allow_inexact=False, seed=0, log=print,
               devices=None, quiet=False):
  """Runs (or resumes) every stage; returns one dict per stage
  ({'workdir', 'skipped', 'step', 'reason', 'grow_logit_diff'})."""
  for a, b in zip(configs, configs[1:]):   # fail before any training
    grow.check_growable(models.make_config(a.model), models.make_config(b.model),
                        allow_inexact)
  out = []
  for i, (c, d) in enumerate(zip(configs, workdirs)):
    rec = {"workdir": d, "skipped": False, "grow_logit_diff": None}
    if stage_finished(d):
      log(f"stage {i} ({c.model.name}): finished, skipped ({d})")
      rec["skipped"] = True
      out.append(rec)
      continue
    if i > 0 and not has_checkpoint(d):
      log(f"stage {i} ({c.model.name}): growing from {workdirs[i - 1]} (best checkpoint)")
      rec["grow_logit_diff"] = grow_workdir(
          workdirs[i - 1], c, d, noise=noise, allow_inexact=allow_inexact, checkpoint="best",
          seed=seed + i, log=log, devices=devices)
    log(f"stage {i} ({c.model.name}): training {c.train.steps} steps in {d}")
    r = loop_lib.run(c, d, devices=devices, quiet=quiet)
    rec.update(step=r.step, reason=r.reason)
    out.append(rec)
    if r.reason == "interrupted":
      raise Interrupted(f"interrupted by {r.signal} in stage {i} at step {r.step}; re-run the "
                        "same command to resume", 130 if r.signal == "SIGINT" else 143)
  return out
