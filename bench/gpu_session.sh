#!/usr/bin/env bash
# One device-tool call on a lent GPU: the GPU plan (bench/gpu_plan.py) with its output in $OUT.
# The GPU image's system python3 has torch, triton and transformers and no package registry; the
# plan runs from the source tree (no install needed) and builds the CUDA extension itself, for
# sm_90 only, in the background. At most 6 files land in $OUT (the tool returns 8).
#
#   bash bench/gpu_session.sh --commit <sha> [--budget-s 540] [--phases env,merge_dot,...]
#
# Give the device call a timeout_s about 50 s above --budget-s (the plan stops itself at its
# budget and writes its summaries; the margin covers start-up and the last phase's kill).
set -uo pipefail
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m bench.gpu_plan --out "$OUT" "$@"
