"""Config files load, validate, and bad values give one-line errors naming the field."""
import glob
import subprocess
import sys

import pytest

from mmrec_jax import config as config_lib
from mmrec_jax import models

CONFIGS = sorted(glob.glob("configs/*.py"))


def test_every_size_has_a_config_with_all_sections():
  names = {p.split("/")[-1][:-3] for p in CONFIGS}
  assert {"tiny", "mini", "small", "base", "medium", "large", "7b"} <= names
  for path in CONFIGS:
    c = config_lib.load_config_file(path)
    for section in ("model", "data", "train", "checkpoint", "mesh"):
      assert section in c
    assert models.make_config(c.model).kind == c.model.kind == "mmrec"
    # configs/*.py set only the numbers of their size: every other model field is the
    # schema's default.
    defaults = models.schema(c.model.kind)().to_dict()
    assert set(c.model.to_dict()) == set(defaults)


@pytest.mark.parametrize("field,value,match", [
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
])
def test_bad_values_are_clear_errors(field, value, match):
  c = config_lib.load_config_file("configs/tiny.py")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_moe_needs_two_experts():
  c = config_lib.load_config_file("configs/tiny.py")
  c.model.use_moe = True
  c.model.moe_experts = 1
  with pytest.raises(config_lib.ConfigError, match="moe_experts"):
    config_lib.validate(c)


def test_unknown_model_field_in_a_saved_config_is_an_error():
  with pytest.raises(config_lib.ConfigError, match=r"unknown field model.bogus"):
    models.make_config({"vocab_size": 10, "d_model": 8, "n_layers": 1, "n_heads": 1,
                        "max_seq_len": 8, "bogus": 1})
  with pytest.raises(config_lib.ConfigError, match=r"did you mean model.chunk_size"):
    models.make_config({"chunk_sise": 8})
  with pytest.raises(config_lib.ConfigError, match=r"model.kind='rnn' is unknown"):
    models.build({"kind": "rnn"})


def test_cli_reports_bad_override_in_one_line():
  r = subprocess.run([sys.executable, "-m", "mmrec_jax.params", "--config=configs/tiny.py",
                      "--config.model.n_heads=3"], capture_output=True, text=True)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: model.d_model=128 is not divisible")
