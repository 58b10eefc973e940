#!/usr/bin/env bash
# Check the Triton kernels against another triton release, no GPU needed:
#   1. compile every kernel variant the launcher can pick to sm_90 cubins (the same check as
#      tests/ops/test_triton.py::test_kernels_compile_for_sm90, which uses the installed triton);
#   2. run tests/ops/test_triton.py under that release's interpreter against the oracle.
# Usage: tools/triton_version_check.sh 3.6.0   (the GPU image's triton)
# The release is installed into a temporary directory put first on PYTHONPATH; the venv's torch
# is used as is. Interpreters before triton 3.8 convert 1-element arrays to ints, which numpy
# >= 2.3 refuses, so numpy 2.2 goes into the same directory for them.
set -euo pipefail
version="${1:?usage: $0 TRITON_VERSION}"
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-deps --target "$site" "triton==$version" "numpy>=2,<2.3"
export PYTHONPATH="$site:$root:$root/tests"
export TRITON_CACHE_DIR="$site/cache"  # compile for real, not from an earlier run's cache
unset TRITON_INTERPRET

echo "== compile for sm_90"
"$python" - "$root" <<'PY'
import runpy, sys, time
import triton
print(f"triton {triton.__version__} from {triton.__file__}", flush=True)
start = time.perf_counter()
runpy.run_path(f"{sys.argv[1]}/tests/ops/test_triton.py", run_name="__main__")
print(f"every kernel variant compiled for sm_90 in {time.perf_counter() - start:.0f} s")
PY

echo "== interpreter suite"
TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    "$root/tests/ops/test_triton.py"
