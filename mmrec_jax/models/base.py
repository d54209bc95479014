"""What every model's config has in common: the frozen dataclass that is the only
place defaults live, its validation, and the allowed values (defined once).

A model's schema subclasses `BaseConfig`, adds its fields with defaults and
extends `validate`. `configs/*.py` set only the numbers of their size.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar

from mmrec_jax.errors import ConfigError
from mmrec_jax.models import layers

DTYPES = tuple(layers.DTYPES)
REMAT_POLICIES = tuple(layers.REMAT_POLICIES)


def check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def positive_ints(cfg, names):
  for f in names:
    v = getattr(cfg, f)
    check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
          f"model.{f} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  """Fields every model has. Subclasses set `kind` and add their own fields."""
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
  # with float32 accumulation: 2.5-3.5x faster on CPUs with AMX, see README).
  matmul_dtype: str = ""
  scan_layers: bool = True       # rolled layer loop (compile time independent of depth)
  remat: str = "none"            # none | full | dots | dots_no_batch

  # A field added after runs were saved without it, with the value those runs had
  # in effect (a new field's default may differ from the behaviour before it):
  # reading a saved config fills such a missing field with this value, never
  # with today's default, so a run resumes and a checkpoint loads as it trained.
  BEFORE_FIELDS: ClassVar[dict] = {}

  def __post_init__(self):
    self.validate()

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

  @classmethod
  def field_names(cls):
    return [f.name for f in dataclasses.fields(cls)]

  @classmethod
  def from_dict(cls, d):
    """From a dict / ConfigDict; an unknown field is a ConfigError with a suggestion."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    names = cls.field_names()
    for k in d:
      if k not in names:
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean model.{close[0]}?" if close else ""
        raise ConfigError(f"unknown field model.{k} for model.kind={cls.kind!r}{hint}")
    return cls(**d)

  def to_dict(self):
    return dataclasses.asdict(self)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

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
