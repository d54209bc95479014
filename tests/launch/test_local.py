"""The local multi-process launcher (`launch/local.py`): exit status of the job,
each process's environment, the dry run."""
import subprocess
import sys

from mmrec_jax.launch import local
from tests.support import REPO


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
