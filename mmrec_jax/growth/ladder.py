"""Progressive training: a ladder of stages, each grown from the previous stage
(`mmrec_jax.grow`) and trained on.

    python -m mmrec_jax.progressive --workdir=runs/ladder \
        [--configs=configs/tiny.py,configs/mini.py,configs/small.py] \
        [--steps=600,1000,2000] [--recipe=carry|restart] [--noise=0.05] [--rewarmup=0.03] \
        [--rewarm=0] \
        [--set=data.path=corpus/ --set=train.batch_size=8] [--stage_set=1:train.lr=0.002]

Recipes (`RECIPES`; `bench.grow` measures them):
- `carry` (the default, the measured best): one warmup-stable-decay schedule over
  the whole ladder. Each stage is grown from the previous stage's last checkpoint
  with AdamW's moments and step count grown with the parameters, and continues
  the schedule at its own peak learning rate; only the last stage decays (its last
  `DECAY` of its own steps). A stage's `train.steps` is then the ladder's steps so
  far (`stage_configs` sets it). With `rewarm` > 0 a grown stage's learning rate
  ramps up again from 0 over that fraction of its steps (`train.rewarm_steps`).
- `restart`: each stage grown from the previous stage's best checkpoint, fresh
  AdamW state, a re-warmup of `rewarmup` x its steps, its config's own schedule.

With one vocabulary (`one_vocabulary`, progressive's default) every stage uses
the last stage's tokenizer, trained once into the ladder's folder, so growth
never changes the vocabulary.

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


RECIPES = {
    "carry": dict(optimizer="carry", schedule="continue", checkpoint="latest"),
    "restart": dict(optimizer="fresh", schedule="restart", checkpoint="best"),
}
DECAY = 0.2          # recipe `carry`: the last stage decays over this fraction of its steps
HOLD_DECAY = 1e-6    # recipe `carry`: an earlier stage's decay_frac (held at its peak: grown mid-run)


def stage_configs(paths, steps, overrides=(), rewarmup=0.03, stage_overrides=(),
                  recipe="carry", rewarm=0.0):
  """The config of every stage: its file, the overrides (then those of
  `stage_overrides`, `I:SECTION.FIELD=VALUE` for stage I only), its steps, and its
  schedule: with `restart`, its own, grown stages warming up for `rewarmup` x their
  steps (at least 1); with `carry`, the ladder's one warmup-stable-decay schedule
  (`train.steps` counted from the ladder's start, stage 0's warmup, the decay in
  the last stage only), each grown stage warming up again from 0 over `rewarm` x
  its steps (`train.rewarm_steps`; 0: none)."""
  if recipe not in RECIPES:
    raise ConfigError(f"--recipe={recipe} is unknown; use one of {', '.join(RECIPES)}")
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
    if i > 0 and recipe == "restart":
      c = c.override({"train.warmup_steps": max(1, int(round(rewarmup * c.train.steps)))})
    out.append(c)
  if recipe == "carry":
    total = 0
    for i, c in enumerate(out):
      before, total = total, total + c.train.steps
      last = i == len(out) - 1
      again = max(1, round(rewarm * c.train.steps)) if i > 0 and rewarm > 0 else 0
      out[i] = c.override({"train.steps": total, "train.schedule": "wsd",
                           "train.warmup_steps": out[0].train.warmup_steps,
                           "train.decay_frac": (DECAY * c.train.steps / total if last
                                                else HOLD_DECAY),
                           "train.rewarm_at": before if again else 0,
                           "train.rewarm_steps": again})
  return out


def one_vocabulary(configs, root, log=print):
  """`configs` with one tokenizer for every stage: the last stage's (its
  `model.vocab_size`), trained once (or loaded) into `root/tokenizer.json`; a
  ladder that names `data.tokenizer` already has one and is returned unchanged."""
  last = configs[-1]
  if last.data.tokenizer or last.data.task:
    return configs
  from mmrec_jax.data import cache  # pylint: disable=import-outside-toplevel (data stack)
  os.makedirs(root, exist_ok=True)
  cache.get_tokenizer(last, root)
  path = os.path.abspath(os.path.join(root, "tokenizer.json"))
  log(f"one vocabulary for the ladder: {last.model.vocab_size} tokens ({path}), every "
      f"stage's model.vocab_size set to it")
  return [c.override({"data.tokenizer": path, "model.vocab_size": last.model.vocab_size})
          for c in configs]


def run_ladder(configs, workdirs, noise=0.05, allow_inexact=False, seed=0, log=print,
               devices=None, quiet=False, recipe="restart"):
  """Runs (or resumes) every stage, grown by `recipe` (`RECIPES`; the configs from
  `stage_configs` with the same recipe); returns one dict per stage
  ({'workdir', 'skipped', 'step', 'reason', 'grow_logit_diff'})."""
  how = RECIPES[recipe]
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
      log(f"stage {i} ({c.model.name}): growing from {workdirs[i - 1]} "
          f"({how['checkpoint']} checkpoint, optimizer {how['optimizer']}, schedule "
          f"{how['schedule']})")
      rec["grow_logit_diff"] = grow_workdir(
          workdirs[i - 1], c, d, noise=noise, allow_inexact=allow_inexact,
          checkpoint=how["checkpoint"], seed=seed + i, log=log, devices=devices,
          optimizer=how["optimizer"], schedule=how["schedule"])
    log(f"stage {i} ({c.model.name}): training to step {c.train.steps} in {d}")
    r = loop_lib.run(c, d, devices=devices, quiet=quiet)
    rec.update(step=r.step, reason=r.reason)
    out.append(rec)
    if r.reason == "interrupted":
      raise Interrupted(f"interrupted by {r.signal} in stage {i} at step {r.step}; re-run the "
                        "same command to resume", 130 if r.signal == "SIGINT" else 143)
  return out
