"""`python -m mmrec_jax.params`: the parameter count per module, the total last."""
import subprocess
import sys

import pytest

from mmrec_jax.config import files
from mmrec_jax.params import count_by_module


@pytest.mark.slow
def test_params_command_prints_total_last():
  out = subprocess.run([sys.executable, "-m", "mmrec_jax.params", "--config=configs/tiny.py"],
                       capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert out[-1] == f"total_params: {count_by_module(files.load_file('tiny').model)[1]}"
  assert any(line.strip().startswith("embed") for line in out)
