#!/usr/bin/env bash
# Train on SLURM GPU nodes with jax.distributed: one process per GPU (default) or per node.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config=configs/small.py --workdir=/shared/runs/small
#   PER=node sbatch --nodes=8 --ntasks-per-node=1 launch/slurm_gpu.sh --config=configs/7b.py ...
#   launch/slurm_gpu.sh --dry-run --config=...   (outside a job: prints what each task runs)
#
# Every task gets JAX_COORDINATOR_ADDRESS (the job's first node, port $PORT, default
# 12355), MMREC_NUM_PROCESSES=$SLURM_NTASKS and MMREC_PROCESS_ID=$SLURM_PROCID; with
# PER=gpu each task sees one GPU (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID). For a mesh
# across nodes set e.g. --config.mesh.dcn_data=$SLURM_NNODES (data parallel between
# nodes, fsdp/tensor inside a node). The workdir must be on a file system all nodes share.
#
# SLURM sends SIGTERM 120 s before the time limit or on preemption (--signal below);
# every process stops at the same step, a checkpoint is saved and the tasks exit with
# status 143 (128 + SIGTERM; 130 after Ctrl-C, 0 when finished, 1 or 2 on failure); on
# 143 the job requeues itself and the same command resumes from the latest checkpoint.
#SBATCH --job-name=mmrec
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
PER=${PER:-gpu}
PORT=${PORT:-12355}
if [[ "$PER" != gpu && "$PER" != node ]]; then
  echo "error: PER=$PER must be gpu or node" >&2
  exit 2
fi
if [[ $DRY_RUN -eq 1 ]]; then
  # Outside a job: a 2-node example allocation.
  SLURM_JOB_ID=${SLURM_JOB_ID:-JOBID}
  SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-node[01-02]}
  SLURM_SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
  COORD=${COORD:-node01}
else
  : "${SLURM_JOB_ID:?run this through sbatch (or pass --dry-run first)}"
  COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

# What each task runs: its ids come from srun's per-task SLURM variables.
# shellcheck disable=SC2016
TASK='export MMREC_PROCESS_ID=$SLURM_PROCID MMREC_NUM_PROCESSES=$SLURM_NTASKS'
if [[ "$PER" == gpu ]]; then
  # shellcheck disable=SC2016
  TASK+=' CUDA_VISIBLE_DEVICES=$SLURM_LOCALID'
fi
TASK+='; exec python -m mmrec_jax.train "$@"'
ENV=(MMREC_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=$COORD:$PORT"
     "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
CMD=(srun --kill-on-bad-exit=1 env "${ENV[@]}" bash -c "$TASK" mmrec "$@")

cd "${REPO_DIR:-$SLURM_SUBMIT_DIR}"
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"
  printf '\n'
  echo "# on status 143: scontrol requeue $SLURM_JOB_ID"
  exit 0
fi
# shellcheck source=/dev/null
. .venv/bin/activate
status=0
"${CMD[@]}" || status=$?
if [[ $status -eq 143 ]]; then
  echo "mmrec: stopped by SIGTERM (status 143) after saving; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
