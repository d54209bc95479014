"""Training: `python -m mmrec_jax.train --config=configs/tiny.py [--workdir=runs/tiny]`.

Any config field can be overridden with `--config.section.field=value`;
`--print_config` lists every field with its value. The run goes to `--workdir`
(default `runs/<model name>`); running the same command again resumes it.

The pieces live in `mmrec_jax.training` (the train state and step, the loss, the
loop and its hooks); this module is the command line. `run` is
`mmrec_jax.training.loop.run`: `run(config, workdir, init_from=params)` starts a
run from given parameters.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax.training import sharding as shard_lib
from mmrec_jax.errors import Interrupted
from mmrec_jax.training.loop import run  # pylint: disable=unused-import (re-exported)

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def resume_command(argv, workdir):
  args = list(argv[1:]) if argv else []
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  return "python -m mmrec_jax.train " + " ".join(shlex.quote(a) for a in args)


def show_library_warnings():
  """The data pipeline's warnings (invalid UTF-8 replaced, files skipped) on stderr."""
  log = logging.getLogger("mmrec_jax")
  if not any(getattr(h, "_mmrec", False) for h in log.handlers):
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("warning: %(message)s"))
    h._mmrec = True  # pylint: disable=protected-access
    log.addHandler(h)
  log.setLevel(logging.WARNING)
  log.propagate = False


def main(argv):
  del argv
  config = flags.FLAGS.config
  if flags.FLAGS.print_config:
    print(config)
    return
  config = config_lib.validate(config)
  show_library_warnings()
  workdir = flags.FLAGS.workdir or os.path.join("runs", config.model.name)
  overrides = set(cli.override_paths(sys.argv, "config"))
  result = run(config, workdir, overrides=overrides)
  if result.reason == "interrupted":
    raise Interrupted(
        f"interrupted by {result.signal} at step {result.step}; checkpoint saved in "
        f"{os.path.join(os.path.abspath(workdir), 'checkpoints')}. Resume with:\n  "
        f"{resume_command(sys.argv, workdir)}", EXIT_CODES.get(result.signal, 130))


def define_flags():
  config_flags.DEFINE_config_file("config", None, cli.config_help(), lock_config=False)
  flags.DEFINE_string("workdir", None, "Run directory (default: runs/<model name>).")
  flags.DEFINE_bool("print_config", False, "Print the config's fields and values, then exit.")
  flags.mark_flag_as_required("config")


def entry():
  define_flags()
  shard_lib.maybe_initialize_distributed()
  cli.run(main)


if __name__ == "__main__":
  entry()
