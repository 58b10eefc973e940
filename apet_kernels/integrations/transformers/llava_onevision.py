"""LLaVA-OneVision (``model_type == "llava_onevision"``): stage 1 on the LLM tokens the model's
own ``get_image_features`` / ``get_video_features`` produce, i.e. after the projector, unpadding,
resampling and pooling.

Why not before the projector, as for LLaVA-NeXT: OneVision runs the (non-linear) projector
before ``pack_image_features``, which unpads the anyres grid and, when
``sqrt(h * w / (max_crops * side**2)) > 1.1``, bilinearly resamples it, and videos are 2x
bilinearly pooled after the projector: an LLM token then mixes several projected tower tokens,
so compressing tower tokens and mapping the layout by index cannot keep keep-all exact. On the
model's output it is exact by construction.

Units, per image: the base view (``side x side`` tokens; SigLIP has no CLS token) and, when the
image is tiled (a prompt with one image: anyres; with several images the model uses one crop
each), the packed anyres grid (``h x w`` tokens after unpadding/resampling: the crops are mixed
there, so the grid is one unit). Every ``image_newline`` (one per grid row, one after an untiled
image, one after each video) stays. Per video: one unit per frame (``ceil(side/2)**2`` pooled
tokens). Positions default to "compact" as for the LLaVA family.
"""

from __future__ import annotations

import math

import torch

from ._config import ApetConfig
from ._interface import ItemGroup, Placeholder, Shim, VisualInput
from ._selection import UnitInfo


def _crops(cfg, image_sizes, batch_num_images) -> list[int]:
    """Crops (base view included) of each image, as ``get_image_features`` counts them: anyres
    only for a prompt with one image (or when ``batch_num_images`` is not given)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches,
    )

    if batch_num_images is None:
        tile = [True] * len(image_sizes)
    else:
        tile = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=cfg.image_grid_pinpoints,
            patch_size=cfg.vision_config.image_size,
        )
        if t
        else 1
        for size, t in zip(image_sizes, tile, strict=True)
    ]


def _newline_masks(base, crops: list[int], n: int, image_sizes, aspect: str, device):
    """Per image, ``(L_i,)`` bool: which packed tokens are ``image_newline`` (the model's
    ``pack_image_features`` run on zero features with a newline of one)."""
    zeros = torch.zeros(sum(crops), n, 1, device=device)
    packed, _ = base.pack_image_features(
        list(zeros.split(crops)),
        image_sizes,
        image_newline=torch.ones(1, device=device),
        vision_aspect_ratio=aspect,
    )
    return [p[:, 0] > 0.5 for p in packed]


def _tokens_per_crop(cfg, kwargs) -> int:
    """Tower tokens per crop: ``side**2``, plus CLIP's CLS under the "full" strategy, minus the
    first token under "default" (SigLIP, OneVision's tower, has no CLS)."""
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
    cls = int(getattr(cfg.vision_config, "model_type", "") == "clip_vision_model")
    return side * side + cls - int(strategy == "default")


def _feature_kwargs(kwargs) -> dict:
    keys = ("vision_feature_layer", "vision_feature_select_strategy")
    return {k: kwargs[k] for k in keys if kwargs.get(k) is not None}


class LlavaOnevisionShim(Shim):
    """LLaVA-OneVision: base view + anyres grid per image, one unit per video frame."""

    model_types = ("llava_onevision",)
    pixel_keys = ("pixel_values", "pixel_values_videos")
    visual_keys = (
        *pixel_keys,
        "image_sizes",
        "image_sizes_videos",
        "batch_num_images",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
    )
    default_preset = "llava-onevision/30%"
    # Ours, not the paper's (it has no OneVision row): 30% of each unit's tokens, then a third of
    # those before layer 14 (about the middle of the 0.5B (24 layers) and 7B (28) decoders).
    presets = {"llava-onevision/30%": ApetConfig(0.30, layer=14, layer_keep=1 / 3)}

    def _side(self, cfg) -> int:
        return cfg.vision_config.image_size // cfg.vision_config.patch_size

    def visual_input(self, model, kwargs) -> VisualInput:
        base = self.base(model)
        cfg = base.config
        side = self._side(cfg)
        feats, seqlens, infos, placeholders = [], [], [], []
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            sizes, counts = kwargs["image_sizes"], kwargs.get("batch_num_images")
            aspect = kwargs.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
            packed = base.get_image_features(
                pixels,
                sizes,
                batch_num_images=counts,
                vision_aspect_ratio=aspect,
                **_feature_kwargs(kwargs),
            ).pooler_output  # per image (L_i, D): base, grid rows + newline each, or base + newline
            crops = _crops(cfg, sizes, counts)
            n = _tokens_per_crop(cfg, kwargs)
            masks = _newline_masks(base, crops, n, sizes, aspect, packed[0].device)
            if [len(m) for m in masks] != [len(p) for p in packed]:
                raise ValueError(
                    f"apet: llava_onevision images packed to {[len(p) for p in packed]} tokens, "
                    f"expected {[len(m) for m in masks]} for {n} tower tokens per crop "
                    f"(vision_feature_select_strategy, tower {cfg.vision_config.model_type!r})"
                )
            layout, row = [], 0
            for item, (p, newline, c) in enumerate(zip(packed, masks, crops, strict=True)):
                nb = n  # the base view comes first, tiled or not
                grid_rows = int(newline[nb:].sum())
                pieces = [("base", p[:nb], (side, side) if nb == side * side else None)]
                if c > 1:  # the anyres grid: grid_rows rows of w tokens + a newline each
                    w = (p.shape[0] - nb) // grid_rows - 1
                    pieces.append(("crop", p[nb:][~newline[nb:]], (grid_rows, w)))
                for index, (kind, x, grid) in enumerate(pieces):
                    infos.append(UnitInfo(kind, item, index, grid))
                    seqlens.append(x.shape[0])
                    feats.append(x)
                ids = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
                ids[~newline] = torch.arange(row, row + int((~newline).sum()), device=p.device)
                row += int((~newline).sum())
                layout.append(ids)
            placeholders.append(
                Placeholder(cfg.image_token_id, torch.cat(layout), filler=base.image_newline)
            )
        else:
            row = 0
        videos = kwargs.get("pixel_values_videos")
        if videos is not None and videos.numel() > 0:
            out = base.get_video_features(videos, **_feature_kwargs(kwargs)).pooler_output
            frames = videos.shape[1]
            pooled = math.ceil(side / 2) ** 2
            grid = (math.ceil(side / 2),) * 2
            # transformers >= 5.23 appends the video's newline here, older in the forward
            out = out[:, : frames * pooled]
            layout = []
            for item, v in enumerate(out):
                for index, x in enumerate(v.view(frames, pooled, -1)):
                    infos.append(UnitInfo("video_frame", item, index, grid))
                    seqlens.append(pooled)
                    feats.append(x)
                ids = torch.arange(row, row + frames * pooled + 1, device=v.device)
                ids[-1] = -1  # the newline after the video
                layout.append(ids)
                row += frames * pooled
            placeholders.append(
                Placeholder(cfg.video_token_id, torch.cat(layout), filler=base.image_newline)
            )
        return VisualInput(torch.cat(feats), seqlens, infos, lambda x: x, placeholders)

    def items(self, model, input_ids, kwargs):
        base = self.base(model)
        cfg = base.config
        side = self._side(cfg)
        groups = []
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            sizes, counts = kwargs["image_sizes"], kwargs.get("batch_num_images")
            aspect = kwargs.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
            crops = _crops(cfg, sizes, counts)
            n = _tokens_per_crop(cfg, kwargs)
            masks = _newline_masks(base, crops, n, sizes, aspect, input_ids.device)
            ones = [1] * len(crops)
            # batch_num_images is per batch row: generate's own repeat is right for it
            groups.append(
                ItemGroup(
                    cfg.image_token_id,
                    [len(m) for m in masks],
                    {"pixel_values": ones, "image_sizes": ones},
                )
            )
        videos = kwargs.get("pixel_values_videos")
        if videos is not None and videos.numel() > 0:
            per = videos.shape[1] * math.ceil(side / 2) ** 2 + 1
            ones = [1] * videos.shape[0]
            tensors = {"pixel_values_videos": ones}
            if kwargs.get("image_sizes_videos") is not None:
                tensors["image_sizes_videos"] = ones
            groups.append(ItemGroup(cfg.video_token_id, [per] * videos.shape[0], tensors))
        return groups
