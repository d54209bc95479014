"""The arms the model-comparison benchmarks train (`bench.quality`, `bench.recall`,
`bench.grow`): a config and overrides, each `SECTION.FIELD` (the one override
syntax), and what the arm is.

Arms that reproduce measurements made with defaults that have since changed pin
those defaults by name (`PINNED`), so a rerun reproduces the figures it
published; `CHANGELOG.md` says when each default changed.
"""
from __future__ import annotations

from mmrec_jax import config as config_lib
from mmrec_jax.errors import UsageError

# Defaults a later version changed, pinned by the arms measured before the change.
PINNED = {
    # The long-term memory read from the first step at the full learning rate
    # (model.mem_out_init=1, model.mem_lr_scale=1): MM-Rec's memory before its
    # read-out started at zero and trained at a tenth of the learning rate.
    "memory_read_from_init": {"model.mem_out_init": 1.0, "model.mem_lr_scale": 1.0},
}
_V0 = PINNED["memory_read_from_init"]
# Chunks of 16 tokens, 5 levels of 8 slots (248 chunks, 3,968 tokens).
_C16 = {"model.chunk_size": 16, "model.mem_levels": 5}

# arm -> (config, overrides, what it is)
ARMS = {
    "mmrec": ("tiny", {}, "MM-Rec tiny as shipped"),
    "mmrec_nomem": ("tiny", {"model.mem_levels": 0}, "MM-Rec tiny without its long-term memory"),
    "transformer": ("baselines/transformer_tiny", {}, "the Transformer of tiny's size"),
    "mmrec_v0": ("tiny", dict(_V0), "MM-Rec tiny, memory read from init at the full rate"),
    "mmrec_c16": ("tiny", dict(_V0, **_C16), "v0 memory, chunks of 16"),
    "mmrec_c16logn": ("tiny", dict(_V0, **_C16, **{"model.mem_read_logn": True}),
                      "v0 memory, chunks of 16, read logits times log(slots seen)"),
    "mmrec_zr": ("tiny", dict(_V0, **{"model.mem_out_init": 0.0}),
                 "v0 memory with its read-out initialised at zero"),
    "mmrec_sink": ("tiny", dict(_V0, **{"model.mem_sink": True}),
                   "v0 memory whose read may abstain (a null slot)"),
    "mmrec_wsg": ("tiny", dict(_V0, **{"model.mem_write_grad": False}),
                  "v0 memory whose writes pass no gradient into the recurrence"),
    "mmrec_mres": ("tiny", dict(_V0, **{"model.mem_residual": True}),
                   "v0 memory read as its own residual branch"),
    "mmrec_memlr": ("tiny", dict(_V0, **{"train.lr_scales": "memory=0.1"}),
                    "v0 memory at a tenth of the learning rate"),
    "mmrec_zr_memlr": ("tiny", dict(_V0, **{"model.mem_out_init": 0.0,
                                            "train.lr_scales": "memory=0.1"}),
                       "zero read-out and a slow memory (the same run as `mmrec`)"),
    "mmrec_prevkey": ("tiny", {"model.mem_key": "previous"},
                      "MM-Rec tiny, each chunk keyed by the token before what it pools"),
    "mmrec_v0_prevkey": ("tiny", dict(_V0, **{"model.mem_key": "previous"}),
                         "v0 memory, each chunk keyed by the token before what it pools"),
    "mmrec_short": ("tiny", dict(_V0, **{"model.decay_max": 0.99}),
                    "v0 memory, recurrence timescales of 10 to 100 tokens"),
    "mmrec_short_nomem": ("tiny", {"model.decay_max": 0.99, "model.mem_levels": 0},
                          "no memory, recurrence timescales of 10 to 100 tokens"),
}


def load_arm(arm, arms=None, overrides=None) -> config_lib.Config:
  """The validated config of one arm (its file with its overrides, then `overrides`)."""
  table = arms or ARMS
  if arm not in table:
    raise UsageError(f"unknown arm {arm!r}; use one of {', '.join(table)}")
  name, over, _ = table[arm]
  return config_lib.load(name, dict(over, **(overrides or {})))
