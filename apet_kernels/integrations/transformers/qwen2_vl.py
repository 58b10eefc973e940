"""Qwen2-VL (``model_type == "qwen2_vl"``): Qwen2.5-VL's data path with another vision tower.

The base model's ``get_image_features`` / ``get_video_features`` return the merger's output per
item as Qwen2.5-VL's do, so stage 1 runs on the same units (one per image, one per temporal slice
of a video) and positions default to "original" (kept tokens keep their M-RoPE (t, h, w) ids).
What differs: ``get_rope_index`` takes no ``second_per_grid_ts`` (Qwen2-VL's temporal ids step by
one per slice). It still receives Qwen2.5-VL's ``second_per_grid_ts=None`` keyword, which its
``**kwargs`` ignores on every transformers version tested (5.17, 5.19, 5.24).
"""

from __future__ import annotations

from ._config import ApetConfig
from .qwen2_5_vl import Qwen25VLShim


class Qwen2VLShim(Qwen25VLShim):
    """Qwen2-VL: one unit per image, one per temporal slice of a video."""

    model_types = ("qwen2_vl",)
    visual_keys = tuple(k for k in Qwen25VLShim.visual_keys if k != "second_per_grid_ts")
    default_preset = "qwen2-vl/30%"
    # Ours, not the paper's (it has no Qwen2-VL row): Qwen2.5-VL's ratios, 30% of each image's
    # tokens, then a third of those before layer 14 (the middle of the 2B / 7B decoders' 28).
    presets = {"qwen2-vl/30%": ApetConfig(0.30, layer=14, layer_keep=1 / 3)}
