"""Install, into the running interpreter's environment, the packages the project needs that are
missing. Used by the Makefile on a fresh machine.

- torch: pinned to the CPU wheel 2.13.0 when absent (an unpinned torch pulls GBs of CUDA packages).
  A torch already there (the GPU image's 2.11, say) is kept.
- Everything else only when it cannot be imported, so a machine without a package registry but
  with the packages preinstalled (the GPU image) never calls pip for them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

# import name -> pip requirement
REQUIRED = {
    "torch": "torch==2.13.0",
    "triton": "triton>=3.8",  # 3.8+ for the CPU interpreter; a GPU image's 3.6 is kept
    "transformers": "transformers>=5.17",  # newest release; the shims warn outside the tested range
    "pytest": "pytest>=8",
    "pytest_benchmark": "pytest-benchmark>=5",
    "numpy": "numpy",
    "matplotlib": "matplotlib>=3.8",
    "PIL": "pillow>=10",
}


def main() -> int:
    missing = [req for name, req in REQUIRED.items() if importlib.util.find_spec(name) is None]
    if "torch==2.13.0" in missing:  # first and alone, so no other package pulls a CUDA torch
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "torch==2.13.0"])
        missing.remove("torch==2.13.0")
    if missing:
        print("installing:", " ".join(missing), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
    return 0


if __name__ == "__main__":
    sys.exit(main())
