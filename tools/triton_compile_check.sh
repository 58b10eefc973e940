#!/usr/bin/env bash
# Compile every Triton kernel variant to sm_90 cubins with another triton release, no GPU needed
# (the same check as tests/ops/test_triton.py::test_kernels_compile_for_sm90, which uses the
# installed triton). Usage: tools/triton_compile_check.sh 3.6.0   (the GPU image's triton)
# The release is installed into a temporary directory put first on PYTHONPATH; the venv's
# torch is used as is. Interpreter runs need triton >= 3.8 (older interpreters fail with
# numpy 2.x), so only compilation is checked here.
set -euo pipefail
version="${1:?usage: $0 TRITON_VERSION}"
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-deps --target "$site" "triton==$version"
unset TRITON_INTERPRET
export TRITON_CACHE_DIR="$site/cache"  # compile for real, not from an earlier run's cache
PYTHONPATH="$site:$root:$root/tests" "$python" - "$root" <<'PY'
import runpy, sys, time
import triton
print(f"triton {triton.__version__} from {triton.__file__}", flush=True)
start = time.perf_counter()
runpy.run_path(f"{sys.argv[1]}/tests/ops/test_triton.py", run_name="__main__")
print(f"every kernel variant compiled for sm_90 in {time.perf_counter() - start:.0f} s")
PY
