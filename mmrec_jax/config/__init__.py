"""One typed config: a frozen `Config` of validated sections, one loader, one override syntax.

    from mmrec_jax import config
    c = config.load("tiny", {"train.steps": 200})            # or "configs/tiny.py"
    c = c.override({"model.d_model": 256, "train.lr": 1e-3})
    c = c.override(config.parse_overrides(["train.lr=1e-3"]))  # the same, from strings

Sections: `model` (the model kind's schema, `mmrec_jax.models`), `data`, `train`,
`checkpoint`, `mesh` (`config.sections`). A config file (`configs/NAME.py`) is a
Python module whose `get_config()` returns a ConfigDict built by `make_config`;
that ConfigDict is what the command line's `--config.SECTION.FIELD=VALUE`
overrides edit, and `typed()` turns it into a `Config`. Every override, whatever
enters it (the command line, a benchmark's `--set`, an arm, a ladder's
`--stage_set`), names a field as `SECTION.FIELD`.

A run directory's `config.json` is read back with `from_dict(d, saved=True)`:
in every section a field the run predates takes the value it had in effect
then (`BEFORE_FIELDS`), not today's default.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any

import ml_collections

from mmrec_jax import models
from mmrec_jax.config import files
from mmrec_jax.config.sections import (SECTIONS, CheckpointConfig, DataConfig, MeshConfig,
                                       TrainConfig)
from mmrec_jax.errors import ConfigError
from mmrec_jax.schema import check

SECTION_NAMES = ("model", "data", "train", "checkpoint", "mesh")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole, validated config: the model's schema and the four other sections."""
  model: models.BaseConfig
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    t, m = self.train, self.model
    check(t.seq_len <= m.max_seq_len,
          f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.carry_state:
      check(type(m).CARRIES_STATE,
            f"train.carry_state needs a fixed-size recurrent state, which model.kind="
            f"{m.kind!r} does not have; turn it off for this model")

  def to_dict(self) -> dict:
    return {s: getattr(self, s).to_dict() for s in SECTION_NAMES}

  def replace(self, **sections) -> Config:
    return dataclasses.replace(self, **sections)

  def override(self, overrides: dict[str, Any] | None = None, **kw) -> Config:
    """A new Config with `{"SECTION.FIELD": value}` set (validated)."""
    return with_overrides(self, dict(overrides or {}, **kw))


def from_dict(d, saved=False) -> Config:
  """A Config from a dict or ConfigDict of sections (a section left out takes its
  defaults). `saved`: read from a run directory (`BEFORE_FIELDS` fill what it predates)."""
  d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
  for s in d:
    if s not in SECTION_NAMES:
      close = difflib.get_close_matches(s, SECTION_NAMES, n=1)
      raise ConfigError(f"unknown config section {s!r}" + (f"; did you mean {close[0]}?" if close
                                                            else f"; use {', '.join(SECTION_NAMES)}"))
  check("model" in d, "config has no 'model' section; start from configs/tiny.py")
  model = models.make_config(d["model"], saved=saved)
  rest = {s: cls.from_dict(d.get(s, {}), saved=saved) for s, cls in SECTIONS.items()}
  return Config(model=model, **rest)


def typed(c) -> Config:
  """A Config from a Config (itself), a ConfigDict or a dict (validated)."""
  if isinstance(c, Config):
    return c
  return from_dict(c)


def validate(c) -> Config:
  """The validated, typed form of `c`; ConfigError (one line) names what is wrong."""
  return typed(c)


def predated_fields(d) -> dict[str, list[str]]:
  """{section: fields} a saved config dict lacks that `BEFORE_FIELDS` fill."""
  d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
  out = {}
  model = dict(d.get("model", {}))
  kind = model.get("kind", models.DEFAULT_KIND)
  if kind in models.REGISTRY:
    out["model"] = models.schema(kind).predated(model)
  for s, cls in SECTIONS.items():
    out[s] = cls.predated(dict(d.get(s, {})))
  return {s: v for s, v in out.items() if v}


# ----------------------------------------------------------------------------- overrides


def _section_schema(c: Config, section: str):
  if section not in SECTION_NAMES:
    close = difflib.get_close_matches(section, SECTION_NAMES, n=1)
    raise ConfigError(f"unknown config section {section!r}" + (
        f"; did you mean {close[0]}?" if close else f"; use {', '.join(SECTION_NAMES)}"))
  return type(getattr(c, section))


def split_path(path: str) -> tuple[str, str]:
  section, sep, field = path.partition(".")
  if not sep or not field or "." in field:
    raise ConfigError(f"override {path!r} does not name a field as SECTION.FIELD (e.g. "
                      "train.batch_size)")
  return section, field


def with_overrides(c: Config, overrides: dict[str, Any]) -> Config:
  """`c` with every `SECTION.FIELD` of `overrides` set; validated as a whole."""
  by_section: dict[str, dict] = {}
  for path, value in overrides.items():
    section, field = split_path(path)
    _section_schema(c, section).check_fields({field: value})
    by_section.setdefault(section, {})[field] = value
  d = c.to_dict()
  for section, fields in by_section.items():
    d[section].update(fields)
  if "model" in by_section and "kind" in by_section["model"]:
    d["model"] = {k: v for k, v in d["model"].items()
                  if k in by_section["model"] or k in ("name",)}
  return from_dict(d)


def parse_value(raw: str, like: Any):
  """A string override value parsed as the type of `like` (the field's current value)."""
  if isinstance(like, bool):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"{raw!r} is not a boolean (true / false)")
  if isinstance(like, int):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"{raw!r} is not an integer") from None
  if isinstance(like, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"{raw!r} is not a number") from None
  if isinstance(like, str):
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def parse_overrides(items, base: Config | None = None) -> dict[str, Any]:
  """`["SECTION.FIELD=VALUE", ...]` -> `{"SECTION.FIELD": value}`, each value parsed as
  its field's type (in `base`, default: a default tiny config)."""
  base = base or load("tiny")
  out = {}
  for item in items or ():
    path, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not SECTION.FIELD=VALUE (e.g. "
                        "train.batch_size=8)")
    section, field = split_path(path.strip())
    schema = _section_schema(base, section)
    schema.check_fields({field: None})
    try:
      out[path.strip()] = parse_value(raw, getattr(getattr(base, section), field))
    except ConfigError as e:
      raise ConfigError(f"{path.strip()}={raw}: {e}") from None
  return out


# ----------------------------------------------------------------------------- files


def make_config(name, kind=models.DEFAULT_KIND, **model_fields) -> ml_collections.ConfigDict:
  """The ConfigDict of one model size, for a config file's `get_config()`: the model
  section from the model's schema with `model_fields` set, every other section at
  its defaults (a config file then sets what its size changes)."""
  model = models.schema(kind).from_dict(dict(model_fields, kind=kind, name=name))
  d = {"model": model.to_dict(), **{s: cls().to_dict() for s, cls in SECTIONS.items()}}
  return ml_collections.ConfigDict(d)


def load(name_or_path: str, overrides: dict[str, Any] | None = None) -> Config:
  """The validated Config of a config file (`tiny`, `configs/tiny.py`, any path;
  `file.py:arg` passes `arg` to get_config), with `overrides` set."""
  c = typed(files.load_file(name_or_path))
  return c.override(overrides) if overrides else c


resolve = files.resolve
