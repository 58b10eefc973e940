#!/usr/bin/env bash
# Create (or reuse) .venv-lmms: the environment the lmms-eval harness suite runs in (issue 12).
#
# `pip install lmms-eval` pulls torchvision, which replaces a CPU torch with a CUDA build and about
# 5 GB of CUDA libraries, so the install is lean and ordered:
#   1. the CPU torch wheel, alone, first (nothing after it may replace it);
#   2. lmms-eval itself with --no-deps;
#   3. only the dependencies the evaluator and the LLaVA-family wrappers import (list below);
#   4. apet_kernels in editable mode, without dependencies (so its entry point registers).
# A stamp file records a finished install; a present, finished environment is reused as it is.
# About 80-175 s and 1.7 GB on a 2-core machine (175 s measured into an empty directory while the
# machine was busy with other jobs; pip's wheel cache makes a rebuild faster).
#
# Usage: tools/setup_lmms_env.sh [VENV_DIR]   (default .venv-lmms, relative to the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-lmms}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.apet-lmms-installed"

# The tested versions (the `lmms-eval` extra in pyproject.toml names the same ones).
TORCH="torch==2.13.0"
LMMS="lmms-eval==0.7.3"
# transformers: the newest release inside the shims' tested range (SUPPORTED_TRANSFORMERS).
# filelock<4: filelock 4.x breaks the evaluator ("No module named 'filelock._api'").
# pytz is imported by the evaluator but not declared; decord (stock LLaVA and Qwen wrappers) and
# av<16 (stock Video-LLaVA wrapper, its video reader) are imported at module level.
DEPS=(
  "transformers>=5.17,<5.25" "accelerate" "datasets" "evaluate" "loguru" "pyyaml" "pillow"
  "tqdm" "numpy" "filelock<4" "sacrebleu" "pytz" "tenacity" "decord" "av<16" "pytablewriter"
  "pytest>=8" "packaging" "setuptools>=69" "wheel"
)

install_apet() {  # editable, so the entry point in pyproject.toml is registered (a few seconds)
  local log
  # setuptools' deprecation notices are noise here; the output is shown when the install fails.
  if ! log=$(APET_BUILD_CUDA=0 "$VENV/bin/python" -m pip install -q -e . --no-deps \
      --no-build-isolation 2>&1); then
    echo "$log"
    return 1
  fi
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$TORCH $LMMS ${DEPS[*]}" ]; then
  echo "setup_lmms_env: reusing $VENV (re-registering apet_kernels)"
  install_apet
  exit 0
fi

start=$(date +%s)
echo "setup_lmms_env: creating $VENV (CPU torch, $LMMS --no-deps, lean dependencies)"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
echo "setup_lmms_env: [1/4] $TORCH (CPU wheel)"
"$PY" -m pip install -q "$TORCH"
echo "setup_lmms_env: [2/4] $LMMS --no-deps"
"$PY" -m pip install -q --no-deps "$LMMS"
echo "setup_lmms_env: [3/4] ${DEPS[*]}"
# The torch pin again, so that no dependency's resolution may move it. --no-warn-conflicts: pip
# would list lmms-eval's ~30 undeclared-here dependencies, left out on purpose.
"$PY" -m pip install -q --no-warn-conflicts "$TORCH" "${DEPS[@]}"
echo "setup_lmms_env: [4/4] apet_kernels (editable, --no-deps)"
install_apet

# Refuse an environment that a dependency turned into a CUDA one.
"$PY" - <<'EOF'
import importlib.util, sys
import torch
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup_lmms_env: torchvision got installed (it replaces the CPU torch); refusing")
if not torch.__version__.endswith("+cpu"):
    sys.exit(f"setup_lmms_env: torch {torch.__version__} is not the CPU wheel; refusing")
EOF
echo "$TORCH $LMMS ${DEPS[*]}" > "$STAMP"
echo "setup_lmms_env: done in $(( $(date +%s) - start )) s"
