"""Parameter count per module of a config, from shapes only (nothing allocated).

    python -m mmrec_jax.params --config=configs/tiny.py

The last line is `total_params: N`.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from mmrec_jax import cli
from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.errors import UsageError


def count_by_module(model_cfg, depth=2):
  """{module path (first `depth` names): count} and the total, from shapes only."""
  shapes = models.param_shapes(models.build(model_cfg))
  counts = defaultdict(int)
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    counts["/".join(path[:depth])] += int(np.prod(leaf.shape))
  return dict(counts), sum(counts.values())


def main(argv):
  del argv
  if flags.FLAGS.depth < 1:
    raise UsageError(f"--depth={flags.FLAGS.depth} must be >= 1 (how many levels of module "
                     "names to group by, e.g. --depth=2)")
  cfg = config_lib.validate(flags.FLAGS.config)
  counts, total = count_by_module(cfg.model, flags.FLAGS.depth)
  width = max(len(k) for k in counts)
  m = cfg.model
  print(f"model {m.name} ({m.kind}): d_model={m.d_model} n_layers={m.n_layers} "
        f"n_heads={m.n_heads} vocab={m.vocab_size}")
  for k in sorted(counts):
    print(f"  {k:<{width}}  {counts[k]:>15,}")
  print(f"total_params: {total}")


def entry():
  config_flags.DEFINE_config_file("config", None, "Path of a config file.", lock_config=True)
  flags.DEFINE_integer("depth", 2, "How many levels of module names to group by.")
  flags.mark_flag_as_required("config")
  cli.run(main)


if __name__ == "__main__":
  entry()
