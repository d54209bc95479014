"""Grow a trained run into a bigger model: `python -m mmrec_jax.grow`.

    python -m mmrec_jax.grow --from_workdir=runs/tiny --config=configs/mini.py \
        --workdir=runs/mini [--noise=0.05] [--allow_inexact] [--checkpoint=best]

Writes a ready-to-train workdir (`mmrec_jax.growth.workdir.grow_workdir`); then
`python -m mmrec_jax.train --config=... --workdir=...` trains it.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.growth.workdir import grow_workdir


def main(argv):
  del argv
  F = flags.FLAGS
  config = config_lib.validate(F.config)
  grow_workdir(F.from_workdir, config, F.workdir, noise=F.noise, allow_inexact=F.allow_inexact,
               checkpoint=F.checkpoint, seed=F.seed, optimizer=F.optimizer,
               schedule=F.schedule, rewind=F.rewind, depth=F.depth)
  print(f"ready: python -m mmrec_jax.train --config={config_flags.get_config_filename(F['config'])} "
        f"--workdir={F.workdir}")


def entry():
  config_flags.DEFINE_config_file("config", None, cli.config_help("mmrec_jax.grow",
                                                                  "configs/mini.py"),
                                  lock_config=False)
  flags.DEFINE_string("from_workdir", None, "Trained run to grow from (e.g. runs/tiny).")
  flags.DEFINE_string("workdir", None, "New, empty run directory to write (e.g. runs/mini).")
  flags.DEFINE_float("noise", 0.05, "Zero-sum symmetry-breaking noise, relative to each "
                     "kernel's std (0: plain copies, which never diverge).")
  flags.DEFINE_bool("allow_inexact", False, "Grow even where the function changes; prints "
                    "the measured logit difference.")
  flags.DEFINE_string("checkpoint", "best", "Checkpoint of --from_workdir: best, latest or a step.")
  flags.DEFINE_integer("seed", 0, "Seed of the noise (and of any fresh part).")
  flags.DEFINE_enum("optimizer", "fresh", ["carry", "fresh"], "carry: the small run's AdamW "
                    "moments and step counts grown with the parameters; fresh: a new optimizer.")
  flags.DEFINE_enum("schedule", "restart", ["continue", "restart"], "continue: the grown run "
                    "starts at the small run's step (minus --rewind) of its config's schedule "
                    "(give it the whole ladder's train.steps); restart: at step 0.")
  flags.DEFINE_integer("rewind", 0, "With --schedule=continue: start this many steps earlier.")
  flags.DEFINE_enum("depth", "identity", ["identity", "stack"], "New layers: identity blocks "
                    "(exact) or the trained stack repeated (not function-preserving).")
  for f in ("config", "from_workdir", "workdir"):
    flags.mark_flag_as_required(f)
  cli.run(main)


if __name__ == "__main__":
  entry()
