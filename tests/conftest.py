"""Shared test setup: 8 host CPU devices (set before JAX loads), cheap compiles, one
compilation cache and one token cache per worker, and the shared run directories."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run small steps a few times each, so compiling dominates them: XLA's cheap
# compile mode (the same semantics, less optimised code) took two test files from
# 221 s to 151 s. Inherited by the subprocesses tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import random  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from tests import support  # noqa: E402


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


def _token_cache(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "token_cache")


@pytest.fixture(scope="session", autouse=True)
def _session_token_cache(tmp_path_factory):
  """Token caches of session fixtures (built before any test's own setup) never touch
  the user's cache either."""
  os.environ["MMREC_CACHE_DIR"] = _token_cache(tmp_path_factory)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Token caches of tests never touch the user's cache."""
  monkeypatch.setenv("MMREC_CACHE_DIR", _token_cache(tmp_path_factory))


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """The training tests' corpus: 24 text files of random sentences."""
  return support.write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
  """An uninterrupted 12-step in-process run on one device: (workdir, config, Result)."""
  from mmrec_jax import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  config = support.make_config(corpus)
  result = train.run(config, workdir, devices=jax.devices()[:1], quiet=True)
  return workdir, config, result


# ----------------------------------------------------------------------------- inference

INFERENCE_WORDS = ("def main return for while class import self print value list dict None "
                   "True False if else with open read write data").split()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """A run directory for inference: config.json, tokenizer.json, checkpoints 1 (best)
  and 2 (latest) of random parameters."""
  from mmrec_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mmrec_jax import models  # pylint: disable=import-outside-toplevel
  from mmrec_jax.data import cache  # pylint: disable=import-outside-toplevel
  from mmrec_jax.io import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("inference")
  rnd = random.Random(0)
  docs = [" ".join(rnd.choice(INFERENCE_WORDS) for _ in range(rnd.choice([20, 60, 200])))
          for _ in range(40)]
  (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
  c = config_lib.load(support.TINY, {
      "model.vocab_size": 300, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
      "model.chunk_size": 8, "model.mem_slots": 2, "model.mem_levels": 2,
      "model.mem_out_init": 1.0,   # the memory read from the start
      "train.seq_len": 32, "data.path": str(root / "corpus.txt"), "data.val_fraction": 0.2})
  wd = str(root / "run")
  cache.get_tokenizer(c, wd)   # the run directory needs its tokenizer
  model = models.build(c.model)
  mngr = ckpt_lib.make_manager(wd, keep=2, async_save=False)
  for step, val_loss in ((1, 2.0), (2, 3.0)):
    params = jax.tree.map(lambda x: x * 2.0,  # less uniform logits: varied greedy tokens
                          nn.unbox(models.init_params(model, jax.random.key(step))))
    ckpt_lib.save(mngr, step, params, {"count": np.zeros((), np.int32)},
                  jax.random.key_data(jax.random.key(0)), {}, val_loss=val_loss)
  mngr.wait_until_finished()
  mngr.close()
  ckpt_lib.save_run_config(wd, c)
  return wd


@pytest.fixture(scope="session")
def loaded(run_dir):
  """`load(run_dir, "best")` and a decoder of its model: (model, variables, tok, config, dec)."""
  from mmrec_jax.inference import sampling  # pylint: disable=import-outside-toplevel
  from mmrec_jax.io import loading  # pylint: disable=import-outside-toplevel
  model, variables, tok, config = loading.load(run_dir, "best")
  return model, variables, tok, config, sampling.Decoder(model)
