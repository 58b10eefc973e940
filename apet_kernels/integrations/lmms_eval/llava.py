"""``apet_llava`` (alias ``apet_llava_next``): lmms-eval's ``llava_hf`` wrapper with ApET, for
LLaVA-1.5 and LLaVA-NeXT checkpoints in the Hugging Face format (``llava-hf/...``)."""

from __future__ import annotations

import os

from lmms_eval.models.simple.llava_hf import LlavaHf

from .base import ApetWrapper


class ApetLlava(ApetWrapper, LlavaHf):
    """``llava_hf`` with the model patched by ``apply_apet`` (default preset: ``llava-1.5/64``
    for LLaVA-1.5, ``llava-next/640`` for LLaVA-NeXT). The stock wrapper's own arguments
    (``device``, ``dtype``, ``attn_implementation``, ``chat_template``, ...) pass through."""

    model_name = "apet_llava"
    model_types = ("llava", "llava_next")

    def _load_stock(self, **kwargs) -> None:
        # The stock default device_map="" is rejected by transformers 5 ("When passing device_map
        # as a string, the value needs to be a device name"); in a single process it means
        # "load onto `device`", so say that. Under accelerate (WORLD_SIZE > 1) the stock code
        # picks cuda:<local rank> from the empty value itself, so it is left as it is.
        if not kwargs.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            kwargs["device_map"] = str(kwargs.get("device") or self._stock_default("device"))
        super()._load_stock(**kwargs)
