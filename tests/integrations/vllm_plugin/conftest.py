"""vLLM plugin suite: runs in .venv-vllm (``make test-vllm``); in an env without vLLM only the
pure-parsing tests (test_config.py) run and the engine modules are not collected.

Environment for the engines (set before vLLM is imported; the engine processes vLLM spawns
inherit it): ``VLLM_HOST_IP=127.0.0.1``, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB), and
``VLLM_CACHE_ROOT`` inside the work tree (``.vllm-cache/``, git-ignored), which also holds the
tiny checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
CACHE = ROOT / ".vllm-cache"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

#: modules that start engines or import vLLM; collected only where vLLM is installed
VLLM_MODULES = ["test_llava.py", "test_runner.py", "test_server.py", "test_qwen2_5_vl.py"]
collect_ignore = [] if HAVE_VLLM else VLLM_MODULES

sys.path.insert(0, str(HERE))
if HAVE_VLLM:
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(CACHE / "vllm"))
    # apet's own CPU path is the torch backend; vLLM's processes need no Triton interpreter
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="session")
def checkpoint_root() -> Path:
    """Where the tiny checkpoints live (reused across runs)."""
    path = CACHE / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path
