#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: each step of a run is a subcommand.
#
#   launch/tpu_vm.sh [--dry-run] SUBCOMMAND NAME [args...]
#
#   create NAME                 create the slice (TYPE, default v5p-8; QUEUED=1 uses a
#                               queued resource and waits until it is ACTIVE)
#   install NAME                copy this repository (git HEAD) to every worker, build its venv
#   mount NAME                  mount BUCKET on every worker at MOUNT with gcsfuse (the
#                               shared workdir: checkpoints, metrics, tokenizer)
#   train NAME [train flags]    run python -m mmrec_jax.train on all workers (--worker=all)
#                               with MMREC_DISTRIBUTED=1; the log streams here and is kept
#                               in ~/train.log on each worker
#   logs NAME                   follow worker 0's ~/train.log
#   delete NAME                 delete the slice (and its queued resource)
#
# Environment: ZONE (required), PROJECT, TYPE (accelerator type, e.g. v5p-64),
# VERSION (TPU software version), QUEUED=1, SPOT=1, REPO_DIR (on the workers,
# default mmrec_jax), BUCKET (gs://name) and MOUNT (default /tmp/mmrec_bucket): with
# a BUCKET, --workdir defaults to $MOUNT/runs/NAME. The workdir must be one path every
# worker shares; rerunning `train` resumes from its latest checkpoint.
# --dry-run prints the exact commands and runs nothing.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
CMD=$1
NAME=$2
shift 2

: "${ZONE:?set ZONE, e.g. ZONE=us-east5-a}"
TYPE=${TYPE:-v5p-8}
VERSION=${VERSION:-v2-alpha-tpuv5}
REPO_DIR=${REPO_DIR:-mmrec_jax}
MOUNT=${MOUNT:-/tmp/mmrec_bucket}
GCLOUD=(gcloud compute tpus)
COMMON=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  COMMON+=(--project="$PROJECT")
fi

# Prints the command (shell-quoted); runs it unless --dry-run.
run() {
  printf '%q ' "$@"
  printf '\n'
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

ssh_all() {
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command="$1"
}

case "$CMD" in
  create)
    if [[ "${QUEUED:-0}" == "1" ]]; then
      extra=()
      if [[ "${SPOT:-0}" == "1" ]]; then
        extra+=(--spot)
      fi
      run "${GCLOUD[@]}" queued-resources create "$NAME" "${COMMON[@]}" --node-id="$NAME" \
        --accelerator-type="$TYPE" --runtime-version="$VERSION" "${extra[@]}"
      if [[ $DRY_RUN -eq 0 ]]; then
        until [[ "$("${GCLOUD[@]}" queued-resources describe "$NAME" "${COMMON[@]}" \
                    --format='value(state.state)')" == "ACTIVE" ]]; do
          echo "waiting for queued resource $NAME ..." >&2
          sleep 30
        done
      fi
    else
      extra=()
      if [[ "${SPOT:-0}" == "1" ]]; then
        extra+=(--spot)
      fi
      run "${GCLOUD[@]}" tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type="$TYPE" \
        --version="$VERSION" "${extra[@]}"
    fi
    ;;
  install)
    archive=${TMPDIR:-/tmp}/mmrec_jax-$NAME.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    run "${GCLOUD[@]}" tpu-vm scp "$archive" "$NAME:mmrec_jax.tar.gz" "${COMMON[@]}" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar -xzf mmrec_jax.tar.gz -C $REPO_DIR && cd $REPO_DIR && \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  mount)
    : "${BUCKET:?set BUCKET=gs://name}"
    ssh_all "set -e; if ! command -v gcsfuse >/dev/null; then \
echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | \
sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
mkdir -p $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT)"
    ;;
  train)
    args=("$@")
    have_workdir=0
    for a in "$@"; do
      if [[ "$a" == --workdir=* ]]; then
        have_workdir=1
      fi
    done
    if [[ $have_workdir -eq 0 && -n "${BUCKET:-}" ]]; then
      args+=("--workdir=$MOUNT/runs/$NAME")
    fi
    quoted=$(printf ' %q' "${args[@]}")
    ssh_all "cd $REPO_DIR && . .venv/bin/activate && MMREC_DISTRIBUTED=1 \
python -m mmrec_jax.train$quoted 2>&1 | tee ~/train.log; exit \${PIPESTATUS[0]}"
    ;;
  logs)
    run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=0 --command="tail -n +1 -F ~/train.log"
    ;;
  delete)
    if [[ "${QUEUED:-0}" == "1" ]]; then
      run "${GCLOUD[@]}" queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
    else
      run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
    fi
    ;;
  *)
    usage
    ;;
esac
