#!/usr/bin/env bash
# The GPU figures of the README in one command (issue 14), for one NVIDIA GPU:
#
#   bash launch/gpu_bench.sh            # from the repository root; writes runs/gpu_bench/
#
# - bench.train: small and base in bfloat16, tokens/s and MFU against the measured
#   bf16 matmul peak and the vendor peak;
# - bench.scan: the three scan implementations at base width (8 x 1024), T = 1K..32K,
#   forward and forward+backward, each against an elementwise pass over the same
#   bytes (the scan is memory-bound: that pass is its roofline on this device);
# - bench.train again for small with model.remat=dots, projections and full (is recomputing the
#   saved activations cheaper than storing them?);
# - bench.decode: small and base, batch 1 and 16, prefill.
# - bench.profile: where small's bfloat16 train step spends its time (with XLA's
#   command buffers off, so that each kernel is visible).
#
# Needs a Python with JAX for CUDA (PYTHON=..., default python3) and the project's
# dependencies; on a machine without network, carry the missing ones as wheels and
# put them on PYTHONPATH first. Each step has its own time limit, so one failure
# does not lose the others; everything is also in runs/gpu_bench/gpu_bench.log.
# On an image with jax, flax, optax, orbax and chex but no ml_collections (as the
# README's H200 figures were taken):
#   pip download --no-deps -d .whl ml_collections==1.1.0      # where pip works
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site LIMIT=70 OUTDIR=/some/dir bash launch/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUTDIR:-runs/gpu_bench}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-240}   # seconds per step
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_bench.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
step() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$LOG"; timeout "$LIMIT" "$PY" -m "$@" 2>&1 | tee -a "$LOG"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } 2>&1 | tee -a "$LOG"
# Most telling first: with a short device lease, what runs out of time is the least needed.
step mmrec_jax.bench.train --config=configs/small.py --config.model.dtype=bfloat16 \
  --batch=32 --seq_len=2048 --steps=10 --peak_reps=21
step mmrec_jax.bench.decode --configs=small --contexts=1024,8192 --peak_reps=21
for remat in projections dots full; do   # the step is bound by saved activations: recompute them?
  step mmrec_jax.bench.train --config=configs/small.py --config.model.dtype=bfloat16 \
    --config.model.remat=$remat --batch=32 --seq_len=2048 --steps=10 --peak_reps=5
done
step mmrec_jax.bench.train --config=configs/base.py --config.model.dtype=bfloat16 \
  --batch=16 --seq_len=2048 --steps=10 --peak_reps=21
step mmrec_jax.bench.scan --sizes=base --min_len=1024 --max_len=32768 --factor=2 --impls=sequential,associative,chunked,pallas
step mmrec_jax.bench.scan --sizes=base --min_len=1024 --max_len=32768 --factor=2 --grad --impls=sequential,associative,chunked,pallas
XLA_FLAGS=--xla_gpu_enable_command_buffer= step mmrec_jax.bench.profile --config=configs/small.py --config.model.dtype=bfloat16 \
  --batch=32 --seq_len=2048 --steps=3
step mmrec_jax.bench.decode --configs=base --contexts=1024 --peak_reps=21
echo "== done; log in $LOG"
