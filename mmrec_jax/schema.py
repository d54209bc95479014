"""Config sections as frozen, validated dataclasses: the base every section of a
config derives from (the model's schema, data, train, checkpoint, mesh).

A section holds its defaults (the only place they live), validates itself on
construction (one-line `ConfigError` naming the field and the fix), reads a
dict with unknown fields refused by name (with the closest real one), and
reads a dict saved by an older version with each field that version predates
set to the value it had in effect then (`BEFORE_FIELDS`), never to a newer
default.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar

from mmrec_jax.errors import ConfigError


def check(cond, msg):
  """ConfigError(msg) unless `cond`."""
  if not cond:
    raise ConfigError(msg)


def is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Section:
  """A config section. Subclasses add fields with defaults and extend `validate`."""

  # The section's name in a config (`model.`, `train.`, ...), used in messages.
  SECTION: ClassVar[str] = ""
  # A field added after runs were saved without it, with the value those runs had in
  # effect (a new field's default may differ from the behaviour before it): reading a
  # saved section fills such a missing field with this value, not today's default.
  BEFORE_FIELDS: ClassVar[dict] = {}

  def __post_init__(self):
    self.validate()

  def validate(self):
    """Raises ConfigError (one line naming the field and the fix)."""

  def positive_ints(self, names):
    for f in names:
      v = getattr(self, f)
      check(is_int(v) and v > 0, f"{self.SECTION}.{f} must be a positive integer, got {v!r}")

  def nonnegative_ints(self, names):
    for f in names:
      v = getattr(self, f)
      check(is_int(v) and v >= 0, f"{self.SECTION}.{f} must be an integer >= 0, got {v!r}")

  @classmethod
  def field_names(cls):
    return [f.name for f in dataclasses.fields(cls)]

  @classmethod
  def field_types(cls) -> dict[str, Any]:
    """{field: the type of its default} (what a string override is parsed as)."""
    out = {}
    for f in dataclasses.fields(cls):
      default = f.default if f.default is not dataclasses.MISSING else None
      out[f.name] = type(default) if default is not None else str
    return out

  @classmethod
  def check_fields(cls, d):
    """ConfigError for a key of `d` that is not a field, with the closest one."""
    names = cls.field_names()
    for k in d:
      if k not in names:
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {cls.SECTION}.{close[0]}?" if close else ""
        raise ConfigError(f"unknown field {cls.SECTION}.{k}{cls._where()}{hint}")

  @classmethod
  def _where(cls):
    return ""

  @classmethod
  def from_dict(cls, d, saved=False):
    """From a dict / ConfigDict. `saved`: a section read from a run directory, whose
    missing fields take their `BEFORE_FIELDS` value."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    if saved:
      d = {**{k: v for k, v in cls.BEFORE_FIELDS.items() if k not in d}, **d}
    cls.check_fields(d)
    return cls(**d)

  @classmethod
  def predated(cls, d):
    """The fields a saved section `d` lacks that `BEFORE_FIELDS` fills."""
    return sorted(k for k in cls.BEFORE_FIELDS if k not in d)

  def to_dict(self):
    return dataclasses.asdict(self)

  def replace(self, **kw):
    type(self).check_fields(kw)
    return dataclasses.replace(self, **kw)
