"""The typed config (`mmrec_jax.config`): one loader, one override syntax, validated
frozen sections, one-line errors naming the field, saved configs read as they ran."""
import dataclasses

import ml_collections
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.config import files
from mmrec_jax.config.sections import TrainConfig
from mmrec_jax.errors import ConfigError
from tests.support import TINY

BAD_VALUES = [
    ("model.n_heads", 3, "not divisible by model.n_heads"),
    ("model.scan_impl", "fast", "scan_impl='fast' is unknown"),
    ("model.mem_pool", "max", "mem_pool=.max. is unknown"),
    ("model.d_model", -8, "model.d_model must be a positive integer"),
    ("model.chunk_size", 0, "model.chunk_size must be a positive integer"),
    ("model.remat", "sometimes", "model.remat='sometimes' is unknown"),
    ("model.dropout", 1.5, "model.dropout=1.5"),
    ("train.seq_len", 4096, "exceeds model.max_seq_len"),
    ("train.batch_size", -1, "train.batch_size must be a positive integer"),
    ("mesh.tensor", 0, "mesh.tensor=0"),
]


@pytest.mark.parametrize("field,value,match", BAD_VALUES)
def test_bad_values_are_clear_errors(field, value, match):
  """Through `override`, and through a config file's ConfigDict edited as the command
  line's `--config.SECTION.FIELD=VALUE` edits it, then validated."""
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.load("configs/tiny.py").override({field: value})
  assert "\n" not in str(e.value)
  c = files.load_file("configs/tiny.py")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_moe_needs_two_experts():
  c = config_lib.load("configs/tiny.py")
  with pytest.raises(config_lib.ConfigError, match="moe_experts"):
    c.override({"model.use_moe": True, "model.moe_experts": 1})


def test_carry_state_config_errors_are_one_line():
  c = config_lib.load(TINY)
  with pytest.raises(ConfigError, match="train.grad_accum=1") as e:
    c.override({"train.carry_state": True, "train.grad_accum": 2, "train.batch_size": 4})
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="fixed-size recurrent state") as e:
    config_lib.load("baselines/transformer_tiny", {"train.carry_state": True})
  assert "\n" not in str(e.value)


def test_a_name_a_relative_path_and_an_absolute_path_load_the_same_config():
  c = config_lib.load("tiny")
  assert config_lib.load("configs/tiny.py") == c == config_lib.load(TINY)
  assert c.model.name == "tiny" and c.train.steps == 600
  assert config_lib.load("baselines/transformer_tiny").model.kind == "transformer"
  with pytest.raises(ConfigError, match=r"config file 'nope' not found.*tiny") as e:
    config_lib.load("nope")
  assert "\n" not in str(e.value)


def test_override_returns_a_new_validated_config():
  c = config_lib.load("tiny")
  d = c.override({"train.steps": 3, "model.d_model": 64})
  assert (d.train.steps, d.model.d_model) == (3, 64)
  assert (c.train.steps, c.model.d_model) == (600, 128)       # c itself is unchanged
  assert c.override(**{"train.steps": 3}) == c.override({"train.steps": 3})
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.train.steps = 3   # pylint: disable=assigning-non-slot
  r = c.replace(model=c.model.replace(d_model=64))
  assert r.model.d_model == 64 and r == c.override({"model.d_model": 64})
  with pytest.raises(ConfigError, match=r"not divisible by model.n_heads"):
    c.replace(model=c.model.replace(d_model=66))


@pytest.mark.parametrize("overrides,match", [
    ({"train.stepz": 3}, "unknown field train.stepz; did you mean train.steps?"),
    ({"trian.steps": 3}, "unknown config section 'trian'; did you mean train?"),
    ({"train": 3}, "does not name a field as SECTION.FIELD"),
    ({"model.chunk_sise": 8}, "did you mean model.chunk_size?"),
])
def test_an_unknown_override_is_refused_by_name(overrides, match):
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.load("tiny").override(overrides)
  assert "\n" not in str(e.value)


def test_overriding_the_model_kind_switches_the_schema():
  c = config_lib.load("tiny").override({"model.kind": "transformer", "model.d_model": 64})
  assert type(c.model) is models.schema("transformer")
  assert c.model.d_model == 64 and c.model.name == "tiny"
  assert c.model.n_layers == models.schema("transformer")().n_layers   # its own defaults


def test_parse_overrides_reads_each_value_as_its_fields_type():
  got = config_lib.parse_overrides(["train.lr=1e-3", "train.steps=7", "model.use_moe=true",
                                    "data.path=corpus/", "model.mem_pool=exp"])
  assert got == {"train.lr": 1e-3, "train.steps": 7, "model.use_moe": True,
                 "data.path": "corpus/", "model.mem_pool": "exp"}
  assert type(got["train.lr"]) is float and type(got["train.steps"]) is int
  assert config_lib.load("tiny").override(got).train.lr == 1e-3
  for bad, match in (("train.steps=abc", "train.steps=abc: 'abc' is not an integer"),
                     ("model.use_moe=maybe", "is not a boolean"),
                     ("train.steps", "is not SECTION.FIELD=VALUE"),
                     ("train.stepz=1", "did you mean train.steps")):
    with pytest.raises(ConfigError, match=match):
      config_lib.parse_overrides([bad])


def test_typed_and_validate_take_a_configdict_a_dict_or_a_config():
  cd = files.load_file("tiny")
  assert isinstance(cd, ml_collections.ConfigDict)
  c = config_lib.typed(cd)
  assert isinstance(c, config_lib.Config) and config_lib.typed(c) is c
  assert config_lib.validate(cd.to_dict()) == c == config_lib.from_dict(c.to_dict())
  assert config_lib.from_dict({"model": {"kind": "mmrec"}}).train == TrainConfig()
  with pytest.raises(ConfigError, match="unknown config section 'trian'; did you mean train"):
    config_lib.from_dict({"model": {}, "trian": {}})
  with pytest.raises(ConfigError, match="has no 'model' section"):
    config_lib.from_dict({"train": {}})


def test_a_saved_config_reads_a_field_it_predates_as_it_ran():
  """`from_dict(d, saved=True)`: a field added after the run was saved takes the value
  the run had in effect (`BEFORE_FIELDS`), not today's default."""
  d = config_lib.load("tiny").to_dict()
  del d["model"]["mem_lr_scale"]
  assert config_lib.from_dict(d).model.mem_lr_scale == 0.1             # today's default
  assert config_lib.from_dict(d, saved=True).model.mem_lr_scale == 1.0   # as it trained
  assert config_lib.predated_fields(d) == {"model": ["mem_lr_scale"]}


def test_every_section_refuses_unknown_fields_and_checks_its_values():
  for section in ("data", "train", "checkpoint", "mesh"):
    with pytest.raises(ConfigError, match=f"unknown field {section}.bogus"):
      config_lib.load("tiny").override({f"{section}.bogus": 1})
  with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
    config_lib.load("tiny").override({"mesh.fsdp": -1})
  with pytest.raises(ConfigError, match="train.lr_scales"):
    config_lib.load("tiny").override({"train.lr_scales": "memory"})
