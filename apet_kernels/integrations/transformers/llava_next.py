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

from ._config import ApetConfig
from ._interface import ItemGroup, Placeholder, Shim, VisualInput
from ._selection import UnitInfo
from ._vision import tower_features


def _crops_per_image(cfg, image_sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=cfg.image_grid_pinpoints,
            patch_size=cfg.vision_config.image_size,
        )
        for size in image_sizes
    ]


def _packed_cells(base, crops_per_image: list[int], n: int, image_sizes, strategy, device):
    """Per image, ``(L_i,)`` int64 ``crop * n + cell`` of each token in the LLM's order (crops
    numbered over all images), -1 for a newline: the model's ``pack_image_features`` run on
    token labels (float64 holds them exactly)."""
    labels = torch.arange(sum(crops_per_image) * n, dtype=torch.float64, device=device)
    packed, _ = base.pack_image_features(
        list(labels.view(-1, n, 1).split(crops_per_image)),
        image_sizes,
        vision_feature_select_strategy=strategy,
        image_newline=labels.new_full((1,), -1.0),
    )
    return [p[:, 0].long() for p in packed]


def _strategy(cfg, kwargs) -> str:
    return kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy


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
        base = self.base(model)
        cfg = base.config
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        crops_per_image = _crops_per_image(cfg, image_sizes)
        if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded along crops
            pixel_values = torch.cat(
                [p[:n] for p, n in zip(pixel_values, crops_per_image, strict=True)]
            )
        feats = tower_features(base.vision_tower, pixel_values, kwargs, cfg)
        crops, n, dim = feats.shape
        cells = torch.cat(
            _packed_cells(
                base, crops_per_image, n, image_sizes, _strategy(cfg, kwargs), feats.device
            )
        )
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

    def items(self, model, input_ids, kwargs):
        base = self.base(model)
        cfg, sizes = base.config, kwargs["image_sizes"]
        crops = _crops_per_image(cfg, sizes)
        strategy = _strategy(cfg, kwargs)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n = side * side + (strategy != "default")  # CLS dropped or kept
        packed = _packed_cells(base, crops, n, sizes, strategy, input_ids.device)
        ones = [1] * len(crops)
        return [
            ItemGroup(
                cfg.image_token_id,
                [len(p) for p in packed],
                {"pixel_values": ones, "image_sizes": ones},
            )
        ]
