"""``apet_llava`` (alias ``apet_llava_next``): lmms-eval's ``llava_hf`` wrapper with ApET, for
LLaVA-1.5 and LLaVA-NeXT checkpoints in the Hugging Face format (``llava-hf/...``)."""

from __future__ import annotations

from lmms_eval.models.simple.llava_hf import LlavaHf

from .base import ApetWrapper, single_process_device_map


class ApetLlava(ApetWrapper, LlavaHf):
    """``llava_hf`` with the model patched by ``apply_apet`` (default preset: ``llava-1.5/64``
    for LLaVA-1.5, ``llava-next/640`` for LLaVA-NeXT). The stock wrapper's own arguments
    (``device``, ``dtype``, ``attn_implementation``, ``chat_template``, ...) pass through."""

    model_name = "apet_llava"
    model_types = ("llava", "llava_next")

    def _load_stock(self, **kwargs) -> None:
        super()._load_stock(**single_process_device_map(kwargs, self._stock_default("device")))
