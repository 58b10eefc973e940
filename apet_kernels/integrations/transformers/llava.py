"""LLaVA-1.5 (``model_type == "llava"``): stage 1 per image on the CLIP features before the
projector, so the projector runs on kept tokens only."""

from __future__ import annotations

import torch

from ._config import ApetConfig
from ._interface import Placeholder, Shim, VisualInput
from ._selection import UnitInfo
from ._vision import clip_unit_grid, same_size_items, tower_features


class LlavaShim(Shim):
    """LLaVA-1.5: one unit per image (576 CLIP tokens at 336 px)."""

    model_types = ("llava",)
    visual_keys = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )
    default_preset = "llava-1.5/64"
    # The "64 tokens" row is the paper's (96 after the vision stage, 32 after layer 16: 64 on
    # average over the 32 layers); the 128/192 rows split their budget the same way (1.5x, 0.5x).
    presets = {
        "llava-1.5/64": ApetConfig(96, layer=16, layer_keep=32),
        "llava-1.5/128": ApetConfig(192, layer=16, layer_keep=64),
        "llava-1.5/192": ApetConfig(288, layer=16, layer_keep=96),
    }

    def visual_input(self, model, kwargs) -> VisualInput:
        if kwargs.get("image_sizes") is not None:
            raise NotImplementedError(
                "apet's LLaVA shim does not support image_sizes (Pixtral-style towers)"
            )
        base = self.base(model)
        feats = tower_features(base.vision_tower, kwargs["pixel_values"], kwargs, base.config)
        images, n, dim = feats.shape
        grid, token_index = clip_unit_grid(base.config.vision_config, n)
        infos = [UnitInfo("image", i, 0, grid, token_index) for i in range(images)]
        layout = torch.arange(images * n, device=feats.device)
        return VisualInput(
            feats.reshape(images * n, dim),
            [n] * images,
            infos,
            base.multi_modal_projector,
            [Placeholder(base.config.image_token_id, layout)],
        )

    def items(self, model, input_ids, kwargs):
        token_id = self.base(model).config.image_token_id
        return [
            same_size_items(token_id, input_ids, len(kwargs["pixel_values"]), ("pixel_values",))
        ]
