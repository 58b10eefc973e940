"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so that the
Triton backend runs on CPU tensors here (CI has no GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
