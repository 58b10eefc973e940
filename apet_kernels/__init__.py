"""apet_kernels: ApET visual-token compression (arXiv 2602.19870) as a fast, exact, batched op.

Public API (inference-only):
    compress(x (S, N, D), keep, ...) -> Compressed(tokens (S, K, D), kept (S, K), assign (S, N))
    compress_varlen(x (T, D), seqlens, keep, ...)
        -> Compressed(tokens (ΣK, D), kept (ΣK,), assign (T,))
    keep_count(n, ratio) -> int
    apply_selection(x, kept, assign): carry other features (Qwen3-VL's DeepStack planes)
        through a compression the op made: same kept tokens, same merge groups.
    backends(device) -> {name: "available" | reason}
    apply_apet / remove_apet: Hugging Face shims, imported lazily from apet_kernels.integrations.

Importing this package registers ``torch.ops.apet.*`` and touches no CUDA, triton or
transformers: backends are imported on first use.
"""

from __future__ import annotations

from . import _library  # noqa: F401  (registers torch.ops.apet.*)
from .api import Compressed, compress, compress_varlen, keep_count
from .dispatch import backends
from .selection import apply_selection

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "apply_apet",
    "apply_selection",
    "backends",
    "compress",
    "compress_varlen",
    "keep_count",
    "remove_apet",
]


def __getattr__(name: str):
    # The shims import transformers; keep that cost (and dependency) off the plain import.
    if name in ("apply_apet", "remove_apet"):
        from .integrations import transformers as shims

        return getattr(shims, name)
    raise AttributeError(f"module 'apet_kernels' has no attribute {name!r}")
