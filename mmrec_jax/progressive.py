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

import ast
import json
import os

from absl import flags

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax import grow
from mmrec_jax import loop as loop_lib
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


def apply_overrides(config, overrides):
  """`section.field=value` strings onto a ConfigDict (values parsed as Python literals,
  else kept as strings)."""
  for o in overrides or ():
    key, sep, raw = o.partition("=")
    sec, _, name = key.partition(".")
    if not sep or sec not in config or name not in config[sec]:
      raise ConfigError(f"--set={o}: expected SECTION.FIELD=VALUE with a known field "
                        "(e.g. --set=train.batch_size=8)")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    config[sec][name] = value
  return config


def stage_configs(paths, steps, overrides=(), rewarmup=0.03, stage_overrides=()):
  """The ConfigDict of every stage: its file, the overrides (then those of
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
    c = apply_overrides(config_lib.load_config_file(path), overrides)
    c = apply_overrides(c, per_stage.get(i, ()))
    if steps:
      c.train.steps = int(steps[i])
    if i > 0:
      c.train.warmup_steps = max(1, int(round(rewarmup * c.train.steps)))
    out.append(config_lib.validate(c))
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
      rec["grow_logit_diff"] = grow.grow_workdir(
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


def main(argv):
  del argv
  F = flags.FLAGS
  paths = [p for p in F.configs.split(",") if p]
  steps = [int(s) for s in F.steps.split(",") if s] if F.steps else None
  if steps and len(steps) != len(paths):
    raise ConfigError(f"--steps has {len(steps)} values for {len(paths)} --configs; give one "
                      "per stage")
  configs = stage_configs(paths, steps, F.set, F.rewarmup, F.stage_set)
  dirs = [os.path.join(F.workdir, f"{i}_{c.model.name}") for i, c in enumerate(configs)]
  out = run_ladder(configs, dirs, noise=F.noise, allow_inexact=F.allow_inexact, seed=F.seed)
  for i, r in enumerate(out):
    print(f"stage {i}: {r['workdir']} ({'skipped, already finished' if r['skipped'] else r['reason']})")


def entry():
  flags.DEFINE_string("workdir", "runs/progressive", "Folder holding one workdir per stage.")
  flags.DEFINE_string("configs", DEFAULT_CONFIGS, "Comma-separated config files, small to big.")
  flags.DEFINE_string("steps", "", "Comma-separated train steps per stage (default: each "
                      "config's train.steps).")
  flags.DEFINE_float("noise", 0.05, "Zero-sum symmetry-breaking noise of each growth.")
  flags.DEFINE_float("rewarmup", 0.03, "Warmup of a grown stage, as a fraction of its steps.")
  flags.DEFINE_bool("allow_inexact", False, "Grow even where the function changes.")
  flags.DEFINE_integer("seed", 0, "Seed of the growth noise.")
  flags.DEFINE_multi_string("set", [], "SECTION.FIELD=VALUE applied to every stage's config.")
  flags.DEFINE_multi_string("stage_set", [], "I:SECTION.FIELD=VALUE applied to stage I only.")
  cli.run(main)


if __name__ == "__main__":
  entry()
