"""Shared test setup: 8 host CPU devices (set before JAX loads) and small shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run small steps a few times each, so compiling dominates them: XLA's cheap
# compile mode (the same semantics, less optimised code) took two test files from
# 221 s to 151 s. Inherited by the subprocesses tests start; the README command's
# test turns it off, so one run compiles exactly as a user's does.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache per test process, shared with the subprocesses it
  starts: tests that compile the same step (same shapes, same config) compile it once."""
  path = str(tmp_path_factory.getbasetemp() / "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  yield path
  jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Token caches of tests never touch the user's cache."""
  monkeypatch.setenv("MMREC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token_cache"))
