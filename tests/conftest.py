"""Shared test setup: 8 host CPU devices (set before JAX loads) and small shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Token caches of tests never touch the user's cache."""
  monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token_cache"))
