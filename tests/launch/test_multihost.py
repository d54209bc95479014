"""Multi-host on one machine: 2 processes x 4 CPU devices over JAX's distributed runtime
(mmrec_jax.launch.local) against 1 process x 8 devices and 1 device; checkpoints restored
onto other process counts and meshes; a tensor-parallel mesh and gradient accumulation
train as one device does."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmrec_jax import config as config_lib
from mmrec_jax.io import checkpoint as ckpt_lib
from mmrec_jax.training import loop
from mmrec_jax.training import state as ts_lib
from tests.support import REPO, TINY
STEPS = 4
OVERRIDES = {
    "model.vocab_size": 300, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "model.chunk_size": 16, "model.mem_slots": 4, "model.mem_levels": 2,
    "train.seq_len": 32, "train.batch_size": 8, "train.steps": STEPS, "train.warmup_steps": 2,
    "train.eval_every": STEPS, "train.eval_batches": 2, "train.log_every": 1,
    "train.samples": 0, "checkpoint.every": STEPS, "data.val_fraction": 0.1,
}
# The same global layout three ways: 2 processes (hybrid mesh, one node each), 8 devices
# in one process, one device.
MESH_2PROC = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1, "mesh.dcn_data": 2}
MESH_8 = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}
MESH_1 = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}

# Run by every process of the 2-process job: trains, then process 0 writes the final
# parameters (gathered from all processes) for the test to compare.
WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from flax import traverse_util
    from jax.experimental import multihost_utils
    import jax
    from mmrec_jax import config as config_lib
    from mmrec_jax.training import loop as loop
    from mmrec_jax.training import sharding as sharding
    sharding.maybe_initialize_distributed()
    workdir, overrides, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    r = loop.run(config_lib.load(sys.argv[4], overrides), workdir, quiet=True)
    params = multihost_utils.process_allgather(r.params, tiled=True)
    if jax.process_index() == 0:
      flat = traverse_util.flatten_dict(params, sep="/")
      np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})
      print("processes", jax.process_count(), "devices", jax.device_count(), r.reason)
""")


def make_config(corpus, **kw):
  return config_lib.load(TINY, {**OVERRIDES, "data.path": corpus, **kw})


def records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def flat(tree):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory):
  """The 2-process x 4-device run: (workdir, {param path: final value}, its output)."""
  tmp = tmp_path_factory.mktemp("mh2")
  (tmp / "mh_worker.py").write_text(WORKER)
  workdir, out = str(tmp / "run"), str(tmp / "params.npz")
  overrides = {**OVERRIDES, "data.path": corpus, **MESH_2PROC}
  env = dict(os.environ, PYTHONPATH=f"{tmp}{os.pathsep}{REPO}")
  cmd = [sys.executable, "-m", "mmrec_jax.launch.local", "--processes=2",
         "--devices_per_process=4", "--module=mh_worker", f"--output_dir={tmp / 'logs'}",
         "--", workdir, json.dumps(overrides), out, TINY]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  text = proc.stdout + proc.stderr
  assert proc.returncode == 0, text[-4000:]
  assert "processes 2 devices 8 done" in text, text[-4000:]
  with np.load(out) as z:
    params = dict(z)
  return workdir, params, text


@pytest.fixture(scope="module")
def one_process_runs(corpus, tmp_path_factory):
  """The same run in this process on 8 devices and on 1 device: {n: (workdir, Result)}."""
  out = {}
  for n, mesh in ((8, MESH_8), (1, MESH_1)):
    workdir = str(tmp_path_factory.mktemp(f"mh{n}") / "run")
    out[n] = workdir, loop.run(make_config(corpus, **mesh), workdir, jax.devices()[:n],
                               quiet=True)
  return out


@pytest.mark.slow
def test_two_processes_match_one_process_and_one_device(two_process_run, one_process_runs):
  workdir2, _, _ = two_process_run
  train2, val2 = records(workdir2, "train"), records(workdir2, "val")
  assert [r["step"] for r in train2] == list(range(1, STEPS + 1))
  for n, (workdir, result) in one_process_runs.items():
    assert result.reason == "done"
    train, val = records(workdir, "train"), records(workdir, "val")
    np.testing.assert_allclose([r["loss"] for r in train2], [r["loss"] for r in train],
                               atol=1e-5, rtol=0, err_msg=f"{n} devices")
    # every metric global: tokens and bits per byte are over all processes' rows
    assert [r["tokens"] for r in val2] == [r["tokens"] for r in val]
    for k in ("loss", "bits_per_byte", "token_accuracy"):
      np.testing.assert_allclose(val2[-1][k], val[-1][k], atol=1e-5, rtol=0, err_msg=k)
  # one process wrote the run's files; the others only their share of the checkpoint
  assert sorted(os.listdir(workdir2)) == sorted(os.listdir(one_process_runs[1][0]))


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(two_process_run, corpus):
  workdir2, params2, _ = two_process_run
  for n, mesh in ((1, MESH_1), (8, MESH_8)):
    s = ts_lib.setup(make_config(corpus, **mesh), jax.devices()[:n])
    mngr = ckpt_lib.make_manager(workdir2, async_save=False)
    a = s.abstract_state
    params, opt_state, _, data, meta = ckpt_lib.restore(mngr, STEPS, a.params, a.opt_state,
                                                        a.rng)
    mngr.close()
    assert meta["step"] == STEPS and data == {"next_index": STEPS}
    got = flat(params)
    assert got.keys() == params2.keys()
    for k, v in got.items():
      np.testing.assert_array_equal(v, params2[k], err_msg=k)
    assert jax.tree.leaves(params)[0].sharding.mesh.devices.size == n
    del opt_state


@pytest.mark.slow
def test_one_device_checkpoint_restores_on_a_2x2x2_mesh(one_process_runs, corpus):
  workdir1, result = one_process_runs[1]
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  s = ts_lib.setup(make_config(corpus, **mesh), jax.devices()[:8])
  mngr = ckpt_lib.make_manager(workdir1, async_save=False)
  a = s.abstract_state
  params, opt_state, _, _, _ = ckpt_lib.restore(mngr, STEPS, a.params, a.opt_state, a.rng)
  mngr.close()
  want = flat(result.params)
  for k, v in flat(params).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  assert dict(s.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  sharded = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
  assert sharded, "nothing is sharded on the 2x2x2 mesh"
  assert any(len(x.sharding.device_set) == 8 for x in sharded)
  del opt_state


@pytest.mark.slow
def test_tensor_parallel_mesh_and_grad_accum_train_as_one_device(one_process_runs, corpus,
                                                                 tmp_path):
  """A 2x2x2 mesh (tensor parallelism too) and gradient accumulation over 2 micro-batches
  give the 1-device run's losses."""
  want = [l for _, l in one_process_runs[1][1].train_losses]
  assert len(want) == STEPS
  for name, n, kw in (("2x2x2", 8, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
                      ("accum", 1, {**MESH_1, "train.grad_accum": 2})):
    r = loop.run(make_config(corpus, **kw), str(tmp_path / name), jax.devices()[:n], quiet=True)
    np.testing.assert_allclose([l for _, l in r.train_losses], want, atol=1e-5, rtol=0,
                               err_msg=name)
