#!/usr/bin/env bash
# Check the Triton kernels against another triton release, no GPU needed:
#   1. compile every kernel variant real launches request to sm_90 cubins, with the signatures
#      Triton's JIT builds from the launcher's arguments, and report registers/spills/shared
#      memory per variant; check that warmup() covers other batch compositions
#      (tests/ops/triton_compile_check.py, also run by test_triton.py::test_kernels_compile_for_sm90
#      with the installed triton);
#   2. run the interpreter suites (test_triton.py, test_triton_promises.py) under that release.
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
"$python" "$root/tests/ops/triton_compile_check.py"

echo "== interpreter suites"
TRITON_INTERPRET=1 "$python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    "$root/tests/ops/test_triton.py" "$root/tests/ops/test_triton_promises.py" -k "not compile"
