"""Test-wide setup.

Without a GPU, the Triton backend is tested on CPU tensors under its interpreter, which must be
switched on before triton is first imported. With a GPU it stays off, so that the GPU tests
(tests/ops/test_gpu.py) run the compiled kernels, not the interpreter. Shared helpers
(spec_transcription, backend_checks) live beside the tests.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
