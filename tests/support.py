"""Helpers the tests share (their fixtures are in `conftest.py`): paths, small
configs, random tokens, the train CLI in a subprocess, tree comparisons."""
import json
import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
from flax import linen as nn

from mmrec_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
WORDS = ("the quick brown fox jumps over a lazy dog while birds sing in tall trees and "
         "every cat sat on the mat then ran away from the rain at night").split()

# Small-model overrides of the training runs, shared by in-process configs and CLI runs.
OVERRIDES = {
    "model.vocab_size": 300, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.chunk_size": 16, "model.mem_slots": 4, "model.mem_levels": 2,
    "train.seq_len": 32, "train.batch_size": 4, "train.steps": 12, "train.warmup_steps": 2,
    "train.eval_every": 4, "train.eval_batches": 2, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 4, "checkpoint.keep": 2, "data.val_fraction": 0.1,
    "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
}

# The same for runs with `train.carry_state`: each row reads consecutive windows, its
# state carried from one step to the next.
CARRY_OVERRIDES = {
    "model.vocab_size": 280, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.chunk_size": 8, "model.mem_slots": 2, "model.mem_levels": 2,
    "train.seq_len": 16, "train.batch_size": 2, "train.steps": 6, "train.warmup_steps": 1,
    "train.eval_every": 6, "train.eval_batches": 1, "train.log_every": 1, "train.samples": 0,
    "checkpoint.every": 3, "data.val_fraction": 0.1, "train.carry_state": True,
    "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
}


def write_corpus(d, docs=24, lines=50, words=12, seed=0, vocab=WORDS):
  """`docs` text files of `lines` sentences of `words` random words; returns the folder."""
  rnd = random.Random(seed)
  for i in range(docs):
    text = (" ".join(rnd.choice(vocab) for _ in range(words)) + "." for _ in range(lines))
    (d / f"doc{i}.txt").write_text("\n".join(text) + "\n")
  return str(d)


def make_config(corpus, **kw):
  """configs/tiny.py with `OVERRIDES`, the corpus and `kw` ({"SECTION.FIELD": value})."""
  return config_lib.load(TINY, {**OVERRIDES, "data.path": corpus, **kw})


def carry_config(corpus, **kw):
  """configs/tiny.py with `CARRY_OVERRIDES`, the corpus and `kw`."""
  return config_lib.load(TINY, {**CARRY_OVERRIDES, "data.path": corpus, **kw})


def cli_args(corpus, workdir=None, **kw):
  """The train CLI's flags for `make_config(corpus, **kw)`."""
  args = [f"--config={TINY}"] + ([f"--workdir={workdir}"] if workdir else [])
  return args + [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.path": corpus,
                                                    **kw}.items()]


def one_device_env(**extra):
  """The environment of a subprocess: the repository importable, one CPU device."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
  env.pop("XLA_FLAGS", None)  # subprocesses: a single CPU device (fast)
  return env


def launch(args, cwd=REPO, slow_steps=0.0, **env):
  """The train CLI in a subprocess (one CPU device); `slow_steps` seconds of sleep after
  every step (tests/slow_train.py) give a test time to signal or kill it mid-run."""
  cmd = ([os.path.join(REPO, "tests", "slow_train.py"), str(slow_steps)] if slow_steps
         else ["-m", "mmrec_jax.train"])
  return subprocess.Popen([sys.executable, *cmd, *args], cwd=cwd,
                          env=one_device_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def train_steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    recs = [json.loads(l) for l in f if l.strip()]
  return max([r["step"] for r in recs if r["split"] == "train"], default=0)


def wait_for_step(proc, workdir, step, timeout=180):
  t0 = time.time()
  while train_steps_logged(workdir) < step:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - t0 < timeout, "run did not reach the step in time"
    time.sleep(0.05)


def assert_trees_close(a, b, atol=1e-6):
  """Same structure, leaves equal within `atol` (0: bitwise)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def close_trees(a, b, atol=2e-5):
  """Leaves of `a` and `b` (in float32) equal within `atol`, naming the first that is not."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def random_tokens(B, T, seed=1, vocab=64, low=0):
  """int32 [B, T] tokens uniform in [low, vocab)."""
  return jax.random.randint(jax.random.key(seed), (B, T), low, vocab)


def boxed_param_tree():
  """Abstract parameters with logical axis names, one of each kind the optimizer and
  the shardings treat differently (embedding, norm scale, kernel, bias, decay, lam)."""
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32),
                                                     names)
  return {"embed": box((300, 32), ("vocab", "embed")),
          "blocks": {"norm": {"scale": box((2, 32), ("layers", "embed"))},
                     "mlp": {"kernel": box((2, 32, 128), ("layers", "embed", "mlp")),
                             "bias": box((2, 128), ("layers", "mlp"))},
                     "gate_decay": {"w": box((2, 32, 32), ("layers", "embed", "kv"))},
                     "lam": box((2, 32), ("layers", "embed")),
                     "mem": {"kernel": box((2, 30, 30), ("layers", "kv", "kv_out"))}}}


def run_module(*args, stdin=None, timeout=120):
  """`python -m ARGS` from the repository on CPU: the finished process (output captured)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, input=stdin, timeout=timeout, check=False)
