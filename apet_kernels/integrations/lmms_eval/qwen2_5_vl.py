"""``apet_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` wrapper with ApET (Qwen2.5-VL checkpoints).

Its processor needs torchvision (the video processor) and its prompts ``qwen_vl_utils``; neither
is part of the CPU test environment, so on CPU only construction and argument handling are
tested with the real stock code (the processor mocked; see the tests)."""

from __future__ import annotations

from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

from .base import ApetWrapper, single_process_device_map


class ApetQwen2_5_VL(ApetWrapper, Qwen2_5_VL):
    """``qwen2_5_vl`` with the model patched by ``apply_apet`` (default preset
    ``qwen2.5-vl/30%``: 30% per image / video slice, then a third of those from layer 14, with
    the original M-RoPE positions). The stock wrapper's own arguments (``min_pixels``,
    ``max_pixels``, ``max_num_frames``, ``attn_implementation``, ...) pass through; it loads
    bfloat16 weights."""

    model_name = "apet_qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _load_stock(self, **kwargs) -> None:
        super()._load_stock(**single_process_device_map(kwargs, self._stock_default("device")))
