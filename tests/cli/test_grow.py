"""`python -m mmrec_jax.grow`: refuses a workdir that is not empty."""
import os
import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.mark.slow
def test_cli_refuses_a_non_empty_workdir(tmp_path):
  (tmp_path / "mini").mkdir()
  (tmp_path / "mini" / "x").write_text("x")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "mmrec_jax.grow", f"--from_workdir={tmp_path}/tiny",
                      "--config=configs/mini.py", f"--workdir={tmp_path}/mini"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().count("\n") == 0 and "is not empty" in r.stderr
