"""Progressive training, a ladder of grown stages: `python -m mmrec_jax.progressive`.

    python -m mmrec_jax.progressive --workdir=runs/ladder \
        [--configs=configs/tiny.py,configs/mini.py,configs/small.py] \
        [--steps=600,1000,2000] [--recipe=carry] [--one_vocab] [--noise=0.05] \
        [--set=data.path=corpus/ --set=train.batch_size=8] [--stage_set=1:train.lr=0.002]

`--steps` are each stage's own steps. The default recipe, `carry`, grows each stage
with AdamW's state and continues one learning-rate schedule over the ladder;
`restart` starts each grown stage afresh (`mmrec_jax.growth.ladder`). With
`--one_vocab` (default) every stage uses the last stage's tokenizer. Re-running the
command after a kill resumes.
"""
from __future__ import annotations

import os

from absl import flags

from mmrec_jax import cli
from mmrec_jax.errors import ConfigError
from mmrec_jax.growth.ladder import (DEFAULT_CONFIGS, RECIPES, one_vocabulary, run_ladder,
                                     stage_configs)

def main(argv):
  del argv
  F = flags.FLAGS
  paths = [p for p in F.configs.split(",") if p]
  steps = [int(s) for s in F.steps.split(",") if s] if F.steps else None
  if steps and len(steps) != len(paths):
    raise ConfigError(f"--steps has {len(steps)} values for {len(paths)} --configs; give one "
                      "per stage")
  configs = stage_configs(paths, steps, F.set, F.rewarmup, F.stage_set, recipe=F.recipe,
                          rewarm=F.rewarm)
  if F.one_vocab:
    configs = one_vocabulary(configs, F.workdir)
  dirs = [os.path.join(F.workdir, f"{i}_{c.model.name}") for i, c in enumerate(configs)]
  out = run_ladder(configs, dirs, noise=F.noise, allow_inexact=F.allow_inexact, seed=F.seed,
                   recipe=F.recipe)
  for i, r in enumerate(out):
    print(f"stage {i}: {r['workdir']} ({'skipped, already finished' if r['skipped'] else r['reason']})")


def entry():
  flags.DEFINE_string("workdir", "runs/progressive", "Folder holding one workdir per stage.")
  flags.DEFINE_string("configs", DEFAULT_CONFIGS, "Comma-separated config files, small to big.")
  flags.DEFINE_string("steps", "", "Comma-separated train steps per stage (default: each "
                      "config's train.steps).")
  flags.DEFINE_float("noise", 0.05, "Zero-sum symmetry-breaking noise of each growth.")
  flags.DEFINE_enum("recipe", "carry", list(RECIPES), "carry: AdamW's state grown with the "
                    "parameters and one schedule over the ladder; restart: fresh AdamW and a "
                    "re-warmup per stage.")
  flags.DEFINE_bool("one_vocab", True, "Every stage uses the last stage's tokenizer (trained "
                    "once into --workdir); off: each stage its own, grown across vocabularies.")
  flags.DEFINE_float("rewarmup", 0.03, "restart: warmup of a grown stage, as a fraction of its "
                     "steps.")
  flags.DEFINE_float("rewarm", 0.0, "carry: a grown stage's learning rate ramps up again "
                     "from 0 over this fraction of its steps (0: none).")
  flags.DEFINE_bool("allow_inexact", False, "Grow even where the function changes.")
  flags.DEFINE_integer("seed", 0, "Seed of the growth noise.")
  flags.DEFINE_multi_string("set", [], "SECTION.FIELD=VALUE applied to every stage's config.")
  flags.DEFINE_multi_string("stage_set", [], "I:SECTION.FIELD=VALUE applied to stage I only.")
  cli.run(main)


if __name__ == "__main__":
  entry()
