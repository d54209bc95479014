"""Activation shardings on 8 host devices: the compiled step of a small model on a
2 x 2 x 2 mesh never rematerialises a tensor involuntarily, its per-device
temporaries do not grow with the device count at the same per-device batch, and its
loss is the one-device loss. One child process compiles every case (one JAX start)."""
import json
import subprocess
import sys

import pytest

from tests import support

CHILD = r"""
import json, sys
import jax, numpy as np
from mmrec_jax import bench, config as config_lib
from mmrec_jax.training import sharding as shard_lib, state as ts_lib
for name, mesh, rows in json.loads(sys.argv[1]):
  n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  over = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
          "model.vocab_size": 256, "model.scan_layers": True, "train.seq_len": 64,
          "train.batch_size": rows * mesh["data"] * mesh["fsdp"],
          **{f"mesh.{k}": v for k, v in mesh.items()}}
  if name == "tiny":
    over.update({"model.chunk_size": 16, "model.mem_slots": 4, "model.mem_levels": 2})
  c = config_lib.load(name, over)
  s = ts_lib.setup(c, jax.devices()[:n])
  state = ts_lib.create(s)
  batch = shard_lib.put_batch(bench.random_batch(np.random.default_rng(0),
                                                 c.train.batch_size, 64, 256), s.mesh)
  print("CASE", name, json.dumps(mesh), file=sys.stderr, flush=True)
  compiled = s.train_step.lower(state, batch).compile()
  _, m = compiled(state, batch)
  print("RESULT", json.dumps({"loss": float(m["loss"]),
                              "temp": compiled.memory_analysis().temp_size_in_bytes}),
        flush=True)
print("CASE end", file=sys.stderr, flush=True)
"""

ONE = {"data": 1, "fsdp": 1, "tensor": 1}
CUBE = {"data": 2, "fsdp": 2, "tensor": 2}
CASES = [("tiny", ONE, 8), ("tiny", CUBE, 2),
         ("tiny", {"data": 1, "fsdp": 2, "tensor": 1}, 2),
         ("tiny", {"data": 1, "fsdp": 8, "tensor": 1}, 2)]


@pytest.fixture(scope="module")
def compiled_cases():
  """Per case: (loss, per-device temporaries in bytes, what XLA logged compiling it)."""
  env = support.one_device_env(TF_CPP_MIN_LOG_LEVEL="0")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], capture_output=True,
                     text=True, env=env, cwd=support.REPO, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  results = [json.loads(l[len("RESULT "):]) for l in r.stdout.splitlines()
             if l.startswith("RESULT ")]
  logs = r.stderr.split("CASE ")[1:-1]
  assert len(results) == len(logs) == len(CASES), r.stderr[-3000:]
  return [(x["loss"], x["temp"], log) for x, log in zip(results, logs)]


@pytest.mark.slow
def test_a_sharded_step_has_no_involuntary_remat_and_the_one_device_loss(compiled_cases):
  (one_loss, _, _), (cube_loss, _, log) = compiled_cases[:2]
  assert "Involuntary full rematerialization" not in log, log[-3000:]
  assert abs(cube_loss - one_loss) < 1e-5


@pytest.mark.slow
def test_per_device_temporaries_do_not_grow_with_the_device_count(compiled_cases):
  (_, two, _), (_, eight, _) = compiled_cases[2:4]
  assert eight <= two, (two, eight)
