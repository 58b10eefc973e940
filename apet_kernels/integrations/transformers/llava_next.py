"""LLaVA-NeXT (``model_type == "llava_next"``): stage 1 per crop, base image included, on the
CLIP features before the projector.

The layout the LLM sees is the model's own: the base image's tokens, then the crops arranged on
the anyres grid, unpadded to the image's aspect ratio, with an ``image_newline`` token ending each
row. The shim runs the model's ``pack_image_features`` on token *indices* instead of features to
get that layout, so a unit is the crop's tokens that survive unpadding (N_s <= h*w, ragged: the
op's varlen path). Kept tokens stay in their slots and every newline token stays, so a compressed
image costs K per crop plus one newline per grid row; with keep-all the layout is unchanged.
"""

from __future__ import annotations

import torch

from ._common import Placeholder, Shim, VisualInput, tower_features
from ._config import ApetConfig
from ._selection import UnitInfo


class LlavaNextShim(Shim):
    """LLaVA-NeXT: one unit per crop (the base image is crop 0)."""

    model_types = ("llava_next",)
    visual_keys = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )
    default_preset = "llava-next/640"
    # Per crop: 192 after the vision stage and 64 after layer 16 (128 on average, 640 over five
    # crops). The 320/160 rows split their budget the same way (1.5x, 0.5x).
    presets = {
        "llava-next/640": ApetConfig(192, layer=16, layer_keep=64),
        "llava-next/320": ApetConfig(96, layer=16, layer_keep=32),
        "llava-next/160": ApetConfig(48, layer=16, layer_keep=16),
    }

    def visual_input(self, model, kwargs) -> VisualInput:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        base = self.base(model)
        cfg = base.config
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        crops_per_image = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=cfg.image_grid_pinpoints,
                patch_size=cfg.vision_config.image_size,
            )
            for size in image_sizes
        ]
        if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded along crops
            pixel_values = torch.cat(
                [p[:n] for p, n in zip(pixel_values, crops_per_image, strict=True)]
            )
        feats = tower_features(base.vision_tower, pixel_values, kwargs, cfg)
        crops, n, dim = feats.shape
        strategy = (
            kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        )
        # float64 holds the indices exactly; -1 marks the newline slots.
        ids = torch.arange(crops * n, dtype=torch.float64, device=feats.device).view(crops, n, 1)
        packed, _ = base.pack_image_features(
            list(torch.split(ids, crops_per_image)),
            image_sizes,
            vision_feature_select_strategy=strategy,
            image_newline=ids.new_full((1,), -1.0),
        )
        cells = torch.cat([p[:, 0] for p in packed]).long()  # crop * n + cell, or -1
        present = torch.zeros(crops * n, dtype=torch.bool, device=feats.device)
        present[cells[cells >= 0]] = True
        row_of = present.long().cumsum(0) - 1
        layout = torch.where(cells >= 0, row_of[cells.clamp(min=0)], cells)
        present = present.view(crops, n)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        grid = (side, side) if n == side * side else None
        infos, crop = [], 0
        for item, count in enumerate(crops_per_image):
            for index in range(count):
                kept_cells = present[crop].nonzero()[:, 0]
                token_index = None if len(kept_cells) == n else kept_cells.cpu()
                kind = "base" if index == 0 else "crop"
                infos.append(UnitInfo(kind, item, index, grid, token_index))
                crop += 1
        return VisualInput(
            feats.reshape(crops * n, dim)[present.reshape(-1)],
            present.sum(1).tolist(),
            infos,
            base.multi_modal_projector,
            [Placeholder(cfg.image_token_id, layout, filler=base.image_newline)],
        )
