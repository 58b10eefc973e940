"""ApET for Hugging Face VLMs: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Video-LLaVA, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

``apply_apet(model)`` patches a model instance (or class) in place so that its forward and
``generate`` compress visual tokens in two stages (arXiv 2602.19870):

* stage 1, per image unit, where the paper puts it: on the vision features before the projector
  (LLaVA family; LLaVA-NeXT per crop, Video-LLaVA per frame) or on the merger output
  (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Placeholder tokens in input_ids, attention_mask and labels
  shrink to match. Per-token planes a model adds inside the decoder (Qwen3-VL's DeepStack) are
  compressed with the same kept tokens and merge groups and follow them.
* stage 2 (optional), on the visual hidden states before decoder layer ``layer``. Positions,
  rotary embeddings, masks and the per-layer KV cache stay consistent through prefill and decode.

Outputs (logits, hidden states, loss) cover the compressed sequence. ``last_selection(model)``
tells which tokens each stage kept and maps every output row to its prompt column
(``output_columns``, ``stage1_columns``; per thread). Supported transformers:
``SUPPORTED_TRANSFORMERS`` (tested with 5.17, 5.19 and 5.24; what differs between releases is
detected by feature in ``_compat``); attention: "sdpa", "eager" (tested) and "flash_attention_2"
(untested);
caches: ``DynamicCache`` (what ``generate`` uses by default). The op is inference-only (it
detaches): a loss reaches the decoder, the text embeddings and the LLaVA projector, never the
vision stage, and the visual tokens compressed at ``layer`` pass no gradient back before it.

The KV cache is shorter than the sequence ``generate`` tracks, so what sizes its inputs by the
cache length (continuing ``generate`` from a returned cache, assisted decoding) is not supported:
decode steps check the cache lengths against the attention mask and refuse several tokens at
once without one, so these raise rather than feed the wrong tokens. A manual decode loop that
feeds several tokens at once passes the full (uncompressed) attention mask. Beam search and
``num_return_sequences`` work: each copy of a row gets that row's images.

Concurrent forwards (threads) on one patched model are independent: each call's state travels
with the call. Gradient checkpointing works (tested on every tested release).

Data path, one file per step: ``_interface`` (what a model shim provides) -> the model files
(vision stage) -> ``_stage1`` (compress units, drop placeholder columns, re-pad, embed; the
compress -> relayout -> scatter step both stages share is ``_squeeze``; planes go through
``apet_kernels.apply_selection``) -> ``_stage2`` (decoder layer hooks, and the decoder stack's
pre-hook that passes the planes) -> ``_decode`` (decode steps on the compressed cache);
``_forward`` routes a call, ``_generate`` repeats visual items for beams, ``_state`` holds
per-model/per-call/per-cache state, ``_patch`` is the public API.

Example:
    >>> from apet_kernels.integrations import apply_apet, last_selection
    >>> model = apply_apet(LlavaForConditionalGeneration.from_pretrained(...))  # 96 -> 32 @ 16
    >>> out = model.generate(**inputs, max_new_tokens=32)
    >>> last_selection(model).units[0].kept  # stage-1 kept token indices of the first image
"""

from __future__ import annotations

from ._config import ApetConfig
from ._patch import (
    SUPPORTED_TRANSFORMERS,
    apply_apet,
    is_patched,
    last_selection,
    presets,
    remove_apet,
    supported_model_types,
)
from ._selection import Selection, UnitInfo, UnitSelection

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "ApetConfig",
    "Selection",
    "UnitInfo",
    "UnitSelection",
    "apply_apet",
    "is_patched",
    "last_selection",
    "presets",
    "remove_apet",
    "supported_model_types",
]
