#!/usr/bin/env bash
# Train on a (multi-host) Cloud TPU VM: runs the same command on every worker.
#
#   launch/tpu_vm.sh TPU_NAME ZONE [train flags...]
#   e.g. launch/tpu_vm.sh my-v5e-16 us-west4-a --config=configs/small.py --workdir=gs://b/runs/small
#
# Every worker needs this repo at $REPO_DIR with its venv (.venv). MMREC_DISTRIBUTED=1
# makes mmrec_jax.train call jax.distributed.initialize(), which discovers the
# coordinator and process ids from the TPU metadata. Rerunning the same command
# resumes from the latest checkpoint in --workdir (use a path all workers share).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
REPO_DIR=${REPO_DIR:-'~/mmrec_jax'}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="cd $REPO_DIR && . .venv/bin/activate && \
    MMREC_DISTRIBUTED=1 python -m mmrec_jax.train$ARGS 2>&1 | tee -a train_\$(hostname).log"
