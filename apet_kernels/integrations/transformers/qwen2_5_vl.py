"""Qwen2.5-VL (``model_type == "qwen2_5_vl"``): stage 1 per image on the vision merger's output
(the merger is Qwen's projector), per temporal slice for videos. Positions default to
"original": kept tokens keep their M-RoPE (t, h, w) ids, and decoding continues from the
uncompressed sequence's maximum position + 1 (what ``rope_deltas`` encodes)."""

from __future__ import annotations

import torch

from ._config import ApetConfig
from ._interface import ItemGroup, Placeholder, Shim, VisualInput
from ._selection import UnitInfo


class Qwen25VLShim(Shim):
    """Qwen2.5-VL: one unit per image, one per temporal slice of a video."""

    model_types = ("qwen2_5_vl",)
    default_positions = "original"
    pos_axes = 3
    pixel_keys = ("pixel_values", "pixel_values_videos")
    visual_keys = (
        *pixel_keys,
        "image_grid_thw",
        "video_grid_thw",
        "mm_token_type_ids",
        "second_per_grid_ts",
    )
    default_preset = "qwen2.5-vl/30%"
    # The paper's setting: 30% of each image's tokens, then 33.3% of those before layer 14.
    presets = {"qwen2.5-vl/30%": ApetConfig(0.30, layer=14, layer_keep=1 / 3)}

    def encode(self, encode, pixels: torch.Tensor, thw: torch.Tensor):
        """Run ``get_image_features`` / ``get_video_features``: the merger output per item
        ``(t * h/m * w/m, D)``, and the items' planes (one ``(rows of every item, D_p)`` tensor
        per plane; none here, Qwen3-VL's DeepStack there)."""
        return encode(pixels, thw).pooler_output, []

    def rope_kwargs(self, kwargs: dict) -> dict:
        """The grid arguments of ``get_rope_index`` besides the image and video grids."""
        return {"second_per_grid_ts": kwargs.get("second_per_grid_ts")}

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
            embeds, item_planes = self.encode(encode, pixels, thw)
            planes.append(item_planes)
            for item, (e, (t, h, w)) in enumerate(zip(embeds, thw.tolist(), strict=True)):
                grid = (h // merge, w // merge)
                # an image is one unit; a video one unit per temporal slice
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

    def items(self, model, input_ids, kwargs):
        cfg = self.base(model).config
        merge = cfg.vision_config.spatial_merge_size**2
        groups = []
        for pixels, thw, extra, token_id in (
            ("pixel_values", "image_grid_thw", (), cfg.image_token_id),
            ("pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",), cfg.video_token_id),
        ):
            if kwargs.get(pixels) is None or kwargs[pixels].numel() == 0:
                continue
            patches = kwargs[thw].prod(-1).tolist()  # pixel rows (patches) of each item
            ones = [1] * len(patches)
            tensors = {pixels: patches, thw: ones}
            tensors.update({key: ones for key in extra if kwargs.get(key) is not None})
            groups.append(ItemGroup(token_id, [p // merge for p in patches], tensors))
        return groups

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
            **self.rope_kwargs(kwargs),
        )
        next_pos = pos.masked_fill(~mask[None], 0).amax(dim=(0, 2)) + 1
        return pos, next_pos

    def position_kwarg(self, pos: torch.Tensor) -> torch.Tensor:
        return pos  # (3, B, L): Qwen's forward takes M-RoPE ids as they are

    def layer_position_ids(self, pos: torch.Tensor) -> None:
        return None  # Qwen passes text positions (none here) to its layers
