#!/usr/bin/env bash
# One device-tool call on a lent GPU (the GPU image: system python3 with torch/triton/transformers,
# no registry). Everything lands in $OUT (the device tool's output folder; default
# bench/results/gpu-session) so it comes back and can be committed under bench/results/.
#
#   bash bench/gpu_session.sh check   # build the CUDA extension, run the GPU test suite (~minutes)
#   bash bench/gpu_session.sh bench   # the main job (python -m bench.run) at 7B sizes
#   bash bench/gpu_session.sh all     # both, check first
#
# The device tool allows 10 minutes per call: run `check` and `bench` as two calls if needed.
set -uo pipefail
mode=${1:-all}
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version 2>/dev/null | tail -1
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $mode == check || $mode == all ]]; then
  echo "== install (APET_BUILD_CUDA=1: build the CUDA extension; log in build.log)"
  start=$(date +%s)
  if ! APET_BUILD_CUDA=1 "$PY" -m pip install -e . --no-deps --no-build-isolation > "$OUT/build.log" 2>&1; then
    echo "CUDA extension build FAILED (tail of build.log below); installing without it"
    tail -30 "$OUT/build.log"
    APET_BUILD_CUDA=0 "$PY" -m pip install -e . --no-deps --no-build-isolation >> "$OUT/build.log" 2>&1
  fi
  echo "install took $(( $(date +%s) - start )) s"
  "$PY" -c "import apet_kernels; print(apet_kernels.backends('cuda'))" | tee "$OUT/backends.txt"
  echo "== GPU test suite"
  "$PY" -m pytest tests/ops/test_gpu.py tests/ops/test_cuda.py tests/test_library.py -q -rs \
    -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" 2>&1 | tee "$OUT/pytest-gpu.log" | tail -40
fi

if [[ $mode == bench || $mode == all ]]; then
  echo "== main job"
  "$PY" -m bench.run --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
