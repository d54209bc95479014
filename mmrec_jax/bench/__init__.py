"""Benchmarks: `python -m mmrec_jax.bench.NAME`."""
from __future__ import annotations

import os

import numpy as np

from mmrec_jax import config as config_lib

_REPO = os.path.join(os.path.dirname(__file__), "..", "..")

# The arms the model-comparison benchmarks (quality, recall) train: a config file
# and model overrides. MM-Rec tiny, the same without its long-term memory, and
# the Transformer of the same size.
ARMS = {
    "mmrec": ("configs/tiny.py", {}),
    "mmrec_nomem": ("configs/tiny.py", {"mem_levels": 0}),
    "transformer": ("configs/baselines/transformer_tiny.py", {}),
}


def load_arm(arm, arms=None):
  """The validated config of one arm (its file, with its model overrides applied)."""
  path, model_overrides = (arms or ARMS)[arm]
  c = config_lib.load_config_file(os.path.join(_REPO, path))
  c.model.update(model_overrides)
  return c


def random_batch(rng, batch, seq_len, vocab):
  """A training batch of uniform random tokens (speed does not depend on them)."""
  tokens = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "reset": np.zeros((batch, seq_len), bool), "mask": np.ones((batch, seq_len), np.float32)}
