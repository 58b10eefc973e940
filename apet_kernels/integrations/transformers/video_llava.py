"""Video-LLaVA (``model_type == "video_llava"``): stage 1 per image and per video frame on the
CLIP features before the projector. Images drop CLS under the "default" strategy; video frames
keep it (as the model does), so a frame unit has 1 + h*w tokens."""

from __future__ import annotations

import torch

from ._config import ApetConfig
from ._interface import Placeholder, Shim, VisualInput
from ._selection import UnitInfo
from ._vision import clip_unit_grid, same_size_items, tower_features


class VideoLlavaShim(Shim):
    """Video-LLaVA: one unit per image, one per video frame."""

    model_types = ("video_llava",)
    pixel_keys = ("pixel_values", "pixel_values_images", "pixel_values_videos")
    visual_keys = (*pixel_keys, "vision_feature_layer", "vision_feature_select_strategy")
    default_preset = "video-llava/32"
    presets = {"video-llava/32": ApetConfig(32)}

    def visual_input(self, model, kwargs) -> VisualInput:
        base = self.base(model)
        cfg = base.config
        images = kwargs.get("pixel_values")
        if images is None:  # transformers < 5.23 names it pixel_values_images
            images = kwargs.get("pixel_values_images")
        videos = kwargs.get("pixel_values_videos")
        feats, seqlens, infos, placeholders = [], [], [], []
        start = 0
        for kind, pixels, tower, token_id in (
            ("image", images, base.image_tower, cfg.image_token_id),
            ("video_frame", videos, base.video_tower, cfg.video_token_id),
        ):
            if pixels is None or pixels.numel() == 0:
                continue
            frames = 1 if pixels.dim() == 4 else pixels.shape[1]
            x = tower_features(tower, pixels.flatten(0, -4), kwargs, cfg, strip_cls=kind == "image")
            units, n, _ = x.shape
            grid, token_index = clip_unit_grid(cfg.vision_config, n)
            infos += [
                UnitInfo(kind, u // frames, u % frames, grid, token_index) for u in range(units)
            ]
            seqlens += [n] * units
            feats.append(x.flatten(0, 1))
            placeholders.append(
                Placeholder(token_id, torch.arange(start, start + units * n, device=x.device))
            )
            start += units * n
        return VisualInput(
            torch.cat(feats), seqlens, infos, base.multi_modal_projector, placeholders
        )

    def items(self, model, input_ids, kwargs):
        cfg = self.base(model).config
        groups = []
        for key, token_id in (
            ("pixel_values", cfg.image_token_id),
            ("pixel_values_images", cfg.image_token_id),
            ("pixel_values_videos", cfg.video_token_id),
        ):
            pixels = kwargs.get(key)
            if pixels is not None and pixels.numel() > 0:
                groups.append(same_size_items(token_id, input_ids, len(pixels), (key,)))
        return groups
