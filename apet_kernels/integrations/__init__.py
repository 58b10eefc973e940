"""Framework integrations. Nothing here is imported by ``import apet_kernels``: the Hugging Face
shims (which import transformers) load on first use of one of their names.

    >>> from apet_kernels.integrations import apply_apet, last_selection
"""

from __future__ import annotations

_TRANSFORMERS_NAMES = (
    "ApetConfig",
    "Selection",
    "SUPPORTED_TRANSFORMERS",
    "UnitSelection",
    "apply_apet",
    "is_patched",
    "last_selection",
    "presets",
    "remove_apet",
    "supported_model_types",
)

__all__ = list(_TRANSFORMERS_NAMES)


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        from . import transformers as shims

        return getattr(shims, name)
    raise AttributeError(f"module 'apet_kernels.integrations' has no attribute {name!r}")
