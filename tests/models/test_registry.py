"""The model registry (`models/__init__.py`) and what every model's config has in
common (`models/base.py`): sections read from a dict, a ConfigDict or a schema,
unknown fields and kinds refused by name, shared validation, counting."""
import jax
import ml_collections
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import models
from mmrec_jax.models import mmrec as M

ALL_ON = M.MMRecConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                       mem_slots=2, mem_levels=3, use_dpg=True, dpg_rank=4, use_moe=True,
                       moe_experts=4, use_uboo=True, mem_qk_norm=True, mem_pool="exp",
                       mem_read_logn=True, mem_sink=True, mem_out_init=1.0)


def test_unknown_model_field_in_a_saved_config_is_an_error():
  with pytest.raises(config_lib.ConfigError, match=r"unknown field model.bogus"):
    models.make_config({"vocab_size": 10, "d_model": 8, "n_layers": 1, "n_heads": 1,
                        "max_seq_len": 8, "bogus": 1})
  with pytest.raises(config_lib.ConfigError, match=r"did you mean model.chunk_size"):
    models.make_config({"chunk_sise": 8})
  with pytest.raises(config_lib.ConfigError, match=r"model.kind='rnn' is unknown"):
    models.build({"kind": "rnn"})


def test_a_section_builds_from_a_dict_a_configdict_or_its_schema():
  d = {"kind": "transformer", "vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2}
  cfg = models.make_config(d)
  assert models.make_config(ml_collections.ConfigDict(d)) == cfg
  assert models.make_config(cfg) is cfg
  assert type(models.build(cfg)) is models.REGISTRY["transformer"][1]
  assert models.make_config({"vocab_size": 64}).kind == models.DEFAULT_KIND  # before `kind`


def test_matmul_dtype_is_validated():
  with pytest.raises(Exception, match="model.matmul_dtype='int8' is unknown"):
    ALL_ON.replace(matmul_dtype="int8").validate()


def test_counting_from_shapes_equals_counting_a_real_init():
  small = M.MMRec(ALL_ON)
  assert models.count_params(models.param_shapes(small)) == models.count_params(
      models.init_params(small, jax.random.key(0)))
