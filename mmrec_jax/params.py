"""Parameter count per module of a config, from shapes only (nothing allocated).

    python -m mmrec_jax.params --config=configs/tiny.py

The last line is `total_params: N`.
"""
from __future__ import annotations

import sys
from collections import defaultdict

from absl import app, flags
from ml_collections import config_flags

from mmrec_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path of a config file.", lock_config=True)
_DEPTH = flags.DEFINE_integer("depth", 2, "How many levels of module names to group by.")


def count_by_module(model_cfg, depth=2):
  """{module path (first `depth` names): count} and the total, from shapes only."""
  import jax
  import numpy as np
  from mmrec_jax import model as model_lib
  model = model_lib.MMRec(model_lib.ModelConfig.from_config(model_cfg))
  shapes = model_lib.param_shapes(model)
  counts = defaultdict(int)
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [getattr(p, "key", str(p)) for p in path]
    counts["/".join(names[:depth])] += int(np.prod(leaf.shape))
  return dict(counts), sum(counts.values())


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: pass --config=configs/NAME.py")
  try:
    cfg = config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  counts, total = count_by_module(cfg.model, _DEPTH.value)
  width = max(len(k) for k in counts)
  print(f"model {cfg.model.name}: d_model={cfg.model.d_model} n_layers={cfg.model.n_layers} "
        f"n_heads={cfg.model.n_heads} vocab={cfg.model.vocab_size}")
  for k in sorted(counts):
    print(f"  {k:<{width}}  {counts[k]:>15,}")
  print(f"total_params: {total}")


if __name__ == "__main__":
  app.run(main)
