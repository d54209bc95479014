"""The shipped config files (`mmrec_jax/configs/`, `configs/` at the repository root):
every size loads with all sections, sets only the numbers of its size, and has the
parameter count it says; the baselines match MM-Rec's sizes."""
import glob
import os

from mmrec_jax import models
from mmrec_jax.config import files
from mmrec_jax.params import count_by_module
from tests.support import REPO

SIZES = ("tiny", "mini", "small", "base", "medium", "large", "7b")


def _total(name):
  return count_by_module(files.load_file(name).model)[1]


def test_the_repository_configs_folder_is_the_packages():
  assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.realpath(files.PACKAGED)
  at_root = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
  assert at_root - {"__init__"} == {n for n in files.packaged_names() if "/" not in n}
  assert files.resolve("configs/tiny.py") == "configs/tiny.py"     # a path that exists
  assert files.resolve("tiny") == os.path.join(files.PACKAGED, "tiny.py")
  assert files.resolve("mmrec_jax/configs/mini.py:x") == "mmrec_jax/configs/mini.py:x"


def test_every_size_has_a_config_with_all_sections():
  names = [n for n in files.packaged_names() if "/" not in n]
  assert set(SIZES) <= set(names)
  for name in names:
    c = files.load_file(name)
    for section in ("model", "data", "train", "checkpoint", "mesh"):
      assert section in c
    assert models.make_config(c.model).kind == c.model.kind == "mmrec"
    # configs/*.py set only the numbers of their size: every other model field is the
    # schema's default.
    defaults = models.schema(c.model.kind)().to_dict()
    assert set(c.model.to_dict()) == set(defaults)


def test_parameter_counts_per_config():
  tiny = _total("tiny")
  assert abs(tiny - 1_960_832) / 1_960_832 < 0.05
  assert 6.5e9 <= _total("7b") <= 7.5e9
  sizes = [_total(n) for n in SIZES]
  assert sizes == sorted(sizes)


def test_baseline_configs_match_mmrec_sizes_within_5_percent():
  for size in ("tiny", "mini"):
    mm, tf = _total(f"configs/{size}.py"), _total(f"configs/baselines/transformer_{size}.py")
    assert abs(tf - mm) / mm < 0.05, (size, mm, tf)
