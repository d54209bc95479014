"""What every model's config has in common: the frozen dataclass that is the only
place defaults live, its validation, and the allowed values (defined once).

A model's schema subclasses `BaseConfig`, adds its fields with defaults and
extends `validate`, and declares what the model can do (`CARRIES_STATE`,
`GROWTH`, `for_context`): the trainer, growth and benchmarks ask these, never
the model's kind. `configs/*.py` set only the numbers of their size.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mmrec_jax import schema
from mmrec_jax.models import layers

DTYPES = tuple(layers.DTYPES)
REMAT_POLICIES = tuple(layers.REMAT_POLICIES)


check = schema.check


def positive_ints(cfg, names):
  cfg.positive_ints(names)


@dataclasses.dataclass(frozen=True)
class BaseConfig(schema.Section):
  """Fields every model has. Subclasses set `kind` and add their own fields."""
  SECTION: ClassVar[str] = "model"
  # A fixed-size decoding state (whatever the tokens seen): `train.carry_state` may
  # carry it from one step to the next.
  CARRIES_STATE: ClassVar[bool] = False
  # How the model's parameters grow into a bigger model's (`GrowthRules`); None: the
  # model declares no exact growth (growing it needs `allow_inexact`).
  GROWTH: ClassVar[Any] = None
  kind: str = "base"
  name: str = "custom"
  vocab_size: int = 5000
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  max_seq_len: int = 1024        # longest train.seq_len allowed (the model never reads it)
  ffn_mult: int = 4
  dropout: float = 0.0
  dtype: str = "float32"         # compute dtype
  param_dtype: str = "float32"
  # The dense layers' and the head's matmuls: "" computes them in `dtype`; a dtype
  # name takes their inputs in it and accumulates and returns in `dtype` (with
  # "bfloat16" on a float32 model, forward and gradient matmuls run in bfloat16
  # with float32 accumulation: 2.5-3.5x faster on CPUs with AMX, see docs/experiments/speed.md).
  matmul_dtype: str = ""
  scan_layers: bool = True       # rolled layer loop (compile time independent of depth)
  remat: str = "none"            # none | full | dots | dots_no_batch | projections

  def validate(self):
    """Raises ConfigError (one line naming the field and the fix)."""
    positive_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                         "ffn_mult"))
    check(self.d_model % self.n_heads == 0,
          f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
          "choose a width that is a multiple of the head count")
    check(self.remat in REMAT_POLICIES,
          f"model.remat={self.remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)}")
    check(self.dtype in DTYPES,
          f"model.dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    check(self.param_dtype in DTYPES,
          f"model.param_dtype={self.param_dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    check(self.matmul_dtype in ("",) + tuple(DTYPES),
          f"model.matmul_dtype={self.matmul_dtype!r} is unknown; use one of {', '.join(DTYPES)} "
          "or '' (the compute dtype)")
    check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
          f"model.dropout={self.dropout} must be in [0, 1)")

  def inert_fields(self) -> tuple[str, ...]:
    """Fields that change nothing in this config (e.g. options of a part it lacks)."""
    return ()

  def for_context(self, n_tokens: int) -> BaseConfig:
    """This config with a decoding state that holds `n_tokens` tokens of context
    (a model whose state is bounded whatever it has seen: itself)."""
    del n_tokens
    return self

  @classmethod
  def _where(cls):
    return f" for model.kind={cls.kind!r}"

  @property
  def compute_dtype(self):
    return layers.DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return layers.DTYPES[self.param_dtype]

  @property
  def matmul_compute_dtype(self):
    """The dtype the dense layers' matmuls take their inputs in."""
    return layers.DTYPES[self.matmul_dtype or self.dtype]

  @property
  def dot_general(self):
    """The dense layers' `dot_general` (None: flax's own, in the compute dtype)."""
    return layers.mixed_dot(self)


class GrowthRules:
  """What growing a model's parameters needs beyond their logical axis names (the
  generic expander, `mmrec_jax.growth.expander`, dispatches on those). A model's
  schema names its rules in `GROWTH`; these defaults fit a plain residual stack."""

  # Fields that only change how a model runs or trains, never its function.
  runtime_fields = ("name", "max_seq_len", "dropout", "dtype", "param_dtype", "scan_layers",
                    "remat", "matmul_dtype")
  # The norm whose output feeds the tied head (divided by the width's copy count).
  tied_head_norm = "final_norm/scale"

  def hidden_widths(self, cfg) -> dict[str, int]:
    """Hidden widths that must grow by integer multiples, by what they are."""
    return {"FFN width (ffn_mult * d_model)": cfg.ffn_mult * cfg.d_model}

  def inexact_reasons(self, small, big) -> list[str]:
    """Model-specific reasons growth cannot preserve the function ([] if none)."""
    del small, big
    return []

  def residual_writers(self, cfg) -> tuple[str, ...]:
    """Parameters (path suffixes under `blocks`) that write into the residual stream:
    zeroed in an inserted block, which is then an exact identity."""
    del cfg
    return ()

  def prepare(self, params, small, big, key, moments=False):
    """The small model's parameters rearranged before growing (e.g. an FFN upcycled
    into experts); default: as they are. `moments`: `params` is an Adam moment tree
    (a part created here starts at zero)."""
    del small, big, key, moments
    return params

  def adjust(self, path, x, small, big, head_ratio):
    """A grown parameter after the generic rules: model facts no axis name carries."""
    del path, small, big, head_ratio
    return x

  def grow_state(self, state, small, width_src, layer_src):
    """A decoding state of the small model as the big model's (None: not supported)."""
    del state, small, width_src, layer_src
    return None
