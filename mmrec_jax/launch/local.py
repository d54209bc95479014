"""A multi-process run on this machine, the way a multi-host job runs on a cluster.

    python -m mmrec_jax.launch.local --processes=2 --devices_per_process=4 -- \
        --config=configs/tiny.py --workdir=runs/mh --config.mesh.dcn_data=2

starts `--processes` copies of `python -m mmrec_jax.train <flags after -->`, each
with its own `--devices_per_process` host CPU devices, joined by JAX's distributed
runtime over loopback (process 0 is the coordinator) with CPU collectives (gloo).
Process 0's output is streamed here; the others' goes to `--output_dir`
(process_<i>.log), and its last lines are shown when one of them fails. SIGINT and
SIGTERM are forwarded to every process (they stop at an agreed step and save).
The exit status is the worst of the processes': a failure (e.g. 1 or 2) over an
interruption (130, 143) over success (0). When one process fails, the others are
stopped after `--grace_s` seconds (they would otherwise wait for it forever).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import flags

from mmrec_jax import cli
from mmrec_jax.errors import UsageError

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("processes", 2, "Number of processes (simulated hosts).")
  flags.DEFINE_integer("devices_per_process", 4, "Host CPU devices of each process.")
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
  flags.DEFINE_string("module", "mmrec_jax.train", "Python module every process runs.")
  flags.DEFINE_string("output_dir", "", "Where the output of processes 1.. goes "
                      "(process_<i>.log; default: a new temporary folder).")
  flags.DEFINE_float("grace_s", 10.0, "Seconds the others get to finish after one fails.")
  flags.DEFINE_bool("dry_run", False, "Print each process's environment and command; run "
                    "nothing.")


INTERRUPTED = (130, 143)


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base, i, n, devices, port):
  """The environment of process `i` of `n`."""
  env = dict(base)
  xla = [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(
      XLA_FLAGS=" ".join(xla + [f"--xla_force_host_platform_device_count={devices}"]),
      JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MMREC_DISTRIBUTED="1",
      MMREC_NUM_PROCESSES=str(n), MMREC_PROCESS_ID=str(i))
  return env


def exit_status(codes):
  """The worst exit status: a failure over an interruption over success."""
  codes = [128 - c if c < 0 else c for c in codes]   # killed by signal N -> 128 + N
  rank = lambda c: 0 if c == 0 else (1 if c in INTERRUPTED else 2)
  return max(codes, key=rank) if codes else 0


def tail(path, n=20):
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def launch(n, devices, args, module="mmrec_jax.train", port=0, log_dir="", grace_s=10.0,
           dry_run=False, out=sys.stdout):
  """Runs the job; returns the exit status (see the module doc)."""
  if n < 1 or devices < 1:
    raise UsageError(f"--processes={n} and --devices_per_process={devices} must be >= 1")
  port = port or free_port()
  cmd = [sys.executable, "-m", module, *args]
  envs = [process_env(os.environ, i, n, devices, port) for i in range(n)]
  if dry_run:
    keys = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
            "JAX_COORDINATOR_ADDRESS", "MMREC_DISTRIBUTED", "MMREC_NUM_PROCESSES",
            "MMREC_PROCESS_ID")
    for e in envs:
      print(" ".join(f"{k}={shlex.quote(e[k])}" for k in keys) + " " + shlex.join(cmd),
            file=out)
    return 0
  log_dir = log_dir or tempfile.mkdtemp(prefix="mmrec-local-")
  os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  for i, env in enumerate(envs):
    path = os.path.join(log_dir, f"process_{i}.log")
    logs.append(path)
    f = None if i == 0 else open(path, "w")   # pylint: disable=consider-using-with
    # Own process groups: a terminal's Ctrl-C reaches them once, through us.
    procs.append(subprocess.Popen(cmd, env=env, stdout=f,
                                  stderr=subprocess.STDOUT if f else None,
                                  start_new_session=True))
    if f:
      f.close()

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    failed_at = None
    while any(p.poll() is None for p in procs):
      codes = [p.poll() for p in procs]
      if failed_at is None and any(c not in (None, 0, *INTERRUPTED) for c in codes):
        failed_at = time.time()
      if failed_at is not None and time.time() - failed_at > grace_s:
        for p in procs:
          if p.poll() is None:
            p.terminate()
        deadline = time.time() + 10
        while any(p.poll() is None for p in procs) and time.time() < deadline:
          time.sleep(0.1)
        for p in procs:
          if p.poll() is None:
            p.kill()
        break
      time.sleep(0.1)
    codes = [p.wait() for p in procs]
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  status = exit_status(codes)
  for i, c in enumerate(codes):
    if i and c not in (0, *INTERRUPTED):
      print(f"launch.local: process {i} exited with status {c}; the end of {logs[i]}:\n"
            f"{tail(logs[i])}", file=sys.stderr, flush=True)
  return status


def main(argv):
  del argv
  sys.exit(launch(FLAGS.processes, FLAGS.devices_per_process, _CHILD_ARGS, FLAGS.module,
                  FLAGS.port, FLAGS.output_dir, FLAGS.grace_s, FLAGS.dry_run))


_CHILD_ARGS = []


def entry():
  """Flags before `--` are the launcher's; everything after goes to every process."""
  if "--" in sys.argv:
    i = sys.argv.index("--")
    _CHILD_ARGS[:] = sys.argv[i + 1:]
    sys.argv = sys.argv[:i]
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
