"""Qwen3-VL (``model_type == "qwen3_vl"``): Qwen2.5-VL's data path plus DeepStack.

Stage 1 runs per image on the vision merger's output and per temporal slice of a video (in the
prompt each slice is its own group of placeholders after its timestamp text). Positions default
to "original": kept tokens keep their M-RoPE (t, h, w) ids from ``get_rope_index`` (which gives
every slice its own grid), timestamps keep theirs, and decoding continues from the uncompressed
maximum position + 1.

DeepStack: the vision tower also merges the hidden states of the blocks in
``vision_config.deepstack_visual_indexes`` into planes ``(T, D_text)`` (one row per visual token,
like the merger output), and the decoder stack adds plane i to the visual tokens' hidden states
after decoder layer i. Each plane is compressed with the kept indices and merge groups of the
main visual tokens (:func:`apet_kernels.apply_selection`), so every kept token gets the plane
features of its own group, and passed to the decoder stack as ``visual_pos_masks (B, L1)`` and
``deepstack_visual_embeds`` (planes in sequence order, images and videos interleaved as they sit
in the prompt). Qwen3-VL's multimodal forward builds those two only from pixel values, and the
shim feeds it ``inputs_embeds``, so a pre-hook on the decoder stack passes them.

Stage 2 must come after the last DeepStack layer: the decoder adds every plane through one mask
over the stage-1 sequence, so ``layer`` (stage 2 runs before it) must be at least the number of
planes; ``apply_apet`` refuses an earlier one.
"""

from __future__ import annotations

import torch

from ._compat import packed_planes
from ._config import ApetConfig
from ._interface import Placeholder, VisualInput
from ._selection import UnitInfo
from .qwen2_5_vl import Qwen25VLShim


class Qwen3VLShim(Qwen25VLShim):
    """Qwen3-VL: one unit per image, one per temporal slice of a video; DeepStack planes follow
    their tokens."""

    model_types = ("qwen3_vl",)
    visual_keys = tuple(k for k in Qwen25VLShim.visual_keys if k != "second_per_grid_ts")
    default_preset = "qwen3-vl/30%"
    # Ours, not the paper's (it has no Qwen3-VL row): Qwen2.5-VL's ratios, 30% of each image's
    # tokens, then a third of those before layer 18 (the middle of the 4B / 8B decoders' 36;
    # well after the DeepStack layers 0-2).
    presets = {"qwen3-vl/30%": ApetConfig(0.30, layer=18, layer_keep=1 / 3)}
    has_planes = True

    def check(self, model, config: ApetConfig) -> None:
        planes = len(self.base(model).config.vision_config.deepstack_visual_indexes)
        if config.layer is not None and config.layer < planes:
            raise ValueError(
                f"layer must be >= {planes} for this Qwen3-VL, got {config.layer}: its decoder "
                f"adds {planes} DeepStack planes after layers 0..{planes - 1} through one mask "
                "over the stage-1 sequence, so stage 2 must run after the last DeepStack layer "
                f"({planes - 1})"
            )

    def visual_input(self, model, kwargs) -> VisualInput:
        base = self.base(model)
        cfg = base.config
        merge = cfg.vision_config.spatial_merge_size
        feats, planes, seqlens, infos, placeholders, start = [], [], [], [], [], 0
        for kind, pixels, thw, token_id, encode in (
            (
                "image",
                "pixel_values",
                "image_grid_thw",
                cfg.image_token_id,
                base.get_image_features,
            ),
            (
                "video",
                "pixel_values_videos",
                "video_grid_thw",
                cfg.video_token_id,
                base.get_video_features,
            ),
        ):
            pixels, thw = kwargs.get(pixels), kwargs.get(thw)
            if pixels is None or pixels.numel() == 0:
                continue
            out = encode(pixels, thw, return_dict=True)
            embeds = out.pooler_output  # per item (t * h/m * w/m, D)
            planes.append(packed_planes(out.deepstack_features))  # per plane (items' rows, D)
            for item, (e, (t, h, w)) in enumerate(zip(embeds, thw.tolist(), strict=True)):
                grid = (h // merge, w // merge)
                slices = [e] if kind == "image" else list(e.view(t, -1, e.shape[-1]))
                for index, x in enumerate(slices):
                    unit = "image" if kind == "image" else "video_frame"
                    flat = x.shape[0] == grid[0] * grid[1]
                    infos.append(UnitInfo(unit, item, index, grid if flat else None))
                    seqlens.append(x.shape[0])
                    feats.append(x)
            total = sum(e.shape[0] for e in embeds)
            layout = torch.arange(start, start + total, device=embeds[0].device)
            placeholders.append(Placeholder(token_id, layout))
            start += total
        # every plane packed like the features: the image rows, then the video rows
        planes = [torch.cat(rows) for rows in zip(*planes, strict=True)]
        return VisualInput(torch.cat(feats), seqlens, infos, lambda x: x, placeholders, planes)

    def plane_kwargs(self, visual, planes):
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": planes}

    def original_positions(self, model, input_ids, mask, kwargs):
        cfg = model.config
        types = kwargs.get("mm_token_type_ids")
        if types is None:  # what the processor would have produced
            types = (input_ids == cfg.image_token_id).int() + 2 * (
                input_ids == cfg.video_token_id
            ).int()
        pos, _ = model.get_rope_index(
            input_ids,
            types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask.long(),
        )
        next_pos = pos.masked_fill(~mask[None], 0).amax(dim=(0, 2)) + 1
        return pos, next_pos
