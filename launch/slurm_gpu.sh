#!/usr/bin/env bash
# Train on SLURM GPU nodes: one process per GPU, jax.distributed over all of them.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config=configs/small.py --workdir=/shared/runs/small
#
# SLURM sends SIGTERM 120 s before the time limit (--signal below); mmrec_jax.train
# then finishes the current step, saves a checkpoint and exits with status 143
# (128 + SIGTERM; 130 after Ctrl-C, 0 when finished, 1 or 2 on failure); on 143
# the job requeues itself and the same command resumes from the latest checkpoint.
#SBATCH --job-name=mmrec
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${REPO_DIR:-$SLURM_SUBMIT_DIR}"
# shellcheck source=/dev/null
. .venv/bin/activate

# jax.distributed.initialize() reads the SLURM environment (coordinator = first
# node, process id = SLURM_PROCID, one local GPU per task).
export MMREC_DISTRIBUTED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

status=0
srun --kill-on-bad-exit=1 python -m mmrec_jax.train "$@" || status=$?
if [[ $status -eq 143 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "mmrec: stopped by SIGTERM (status 143) after saving; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
