"""Test-wide setup.

TRITON_INTERPRET must be set before triton is first imported, so that the Triton backend runs on
CPU tensors here (CI has no GPU). Shared helpers (spec_transcription) live beside the tests.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
