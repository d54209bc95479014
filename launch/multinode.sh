#!/usr/bin/env bash
# Train on several machines without SLURM: one process per machine over ssh.
#
#   launch/multinode.sh [--dry-run] HOST1,HOST2,... [train flags...]
#   e.g. launch/multinode.sh gpu1,gpu2 --config=configs/small.py --workdir=/shared/runs/small \
#          --config.mesh.dcn_data=2
#
# The first host is the coordinator (port $PORT, default 12355; it must be reachable
# from the others); process i runs on host i with MMREC_PROCESS_ID=i, using all of
# that host's accelerators. Each host needs this repository at $REPO_DIR (default:
# this checkout's path) with its venv, and the workdir on a shared file system.
# Output: every line prefixed with its host; the exit status is the worst of the
# hosts' (a failure over 143/130 over 0). Ctrl-C or SIGTERM here is sent on to every
# host's process, which stop together at the same step and save a checkpoint.
# --dry-run prints the exact ssh commands and runs nothing.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 [--dry-run] HOST1,HOST2,... [train flags...]" >&2
  exit 2
fi
IFS=, read -r -a HOSTS <<< "$1"
shift
N=${#HOSTS[@]}
PORT=${PORT:-12355}
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
SSH=(ssh -o BatchMode=yes)
ARGS=$(printf ' %q' "$@")
PIDFILE=/tmp/mmrec_multinode_$PORT.pid

remote_cmd() {  # the command host $1 runs
  printf 'cd %q && . .venv/bin/activate && echo $$ > %s && exec env MMREC_DISTRIBUTED=1 ' \
    "$REPO_DIR" "$PIDFILE"
  printf 'JAX_COORDINATOR_ADDRESS=%q MMREC_NUM_PROCESSES=%d MMREC_PROCESS_ID=%d ' \
    "${HOSTS[0]}:$PORT" "$N" "$1"
  printf 'python -m mmrec_jax.train%s' "$ARGS"
}

if [[ $DRY_RUN -eq 1 ]]; then
  for i in "${!HOSTS[@]}"; do
    printf '%q ' "${SSH[@]}" "${HOSTS[$i]}" "$(remote_cmd "$i")"
    printf '\n'
  done
  exit 0
fi

PIDS=()
# shellcheck disable=SC2329  # called by the traps
forward() {  # signal every host's training process (it saves and exits)
  for h in "${HOSTS[@]}"; do
    "${SSH[@]}" "$h" "kill -$1 \$(cat $PIDFILE)" || true
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
for i in "${!HOSTS[@]}"; do
  h=${HOSTS[$i]}
  "${SSH[@]}" "$h" "$(remote_cmd "$i")" 2>&1 | sed -u "s/^/[$h] /" &
  PIDS+=($!)
done
worst=0
for p in "${PIDS[@]}"; do
  s=0
  while true; do   # `wait` returns early when a trapped signal arrives: wait again
    wait "$p" && s=0 || s=$?
    kill -0 "$p" 2>/dev/null || break
  done
  if [[ $s -ne 0 && ( $worst -eq 0 || $worst -eq 130 || $worst -eq 143 ) ]]; then
    worst=$s
  fi
done
exit "$worst"
