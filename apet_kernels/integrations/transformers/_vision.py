"""Helpers the LLaVA-family shims share: CLIP tower features, unit grids, same-size items."""

from __future__ import annotations

import torch
from torch import nn

from ._interface import ItemGroup


def tower_features(
    tower: nn.Module, pixel_values: torch.Tensor, kwargs: dict, config, strip_cls: bool = True
) -> torch.Tensor:
    """The LLaVA family's vision features: hidden states of ``vision_feature_layer`` (several
    layers are concatenated on features), without the CLS token under the "default" strategy
    (when ``strip_cls``; Video-LLaVA keeps it for videos).

    Args:
        tower: the CLIP-like vision tower.
        pixel_values: ``(num_images, C, H, W)``.
        kwargs: the forward's arguments (may override the two config fields).
        config: the multimodal config (``vision_feature_layer``,
            ``vision_feature_select_strategy``).

    Returns:
        ``(num_images, N, D_v)`` features before the projector.
    """
    layer = kwargs.get("vision_feature_layer")
    layer = config.vision_feature_layer if layer is None else layer
    strategy = kwargs.get("vision_feature_select_strategy")
    strategy = (
        getattr(config, "vision_feature_select_strategy", None) if strategy is None else strategy
    )
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
    pool = [out.hidden_states[i] for i in ([layer] if isinstance(layer, int) else layer)]
    if strip_cls and strategy == "default":
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def same_size_items(
    token_id: int, input_ids: torch.Tensor, count: int, names: tuple[str, ...]
) -> ItemGroup:
    """The :class:`ItemGroup` of ``count`` items that take the same number of placeholders each
    (LLaVA-1.5, Video-LLaVA), one dim-0 row per item in each argument of ``names``."""
    tokens = int((input_ids == token_id).sum()) // max(count, 1)
    return ItemGroup(token_id, [tokens] * count, {name: [1] * count for name in names})


def clip_unit_grid(vision_config, n: int) -> tuple[tuple[int, int] | None, torch.Tensor | None]:
    """``(grid, token_index)`` of a CLIP unit of ``n`` tokens (square grid, maybe a CLS first)."""
    side = vision_config.image_size // vision_config.patch_size
    if n == side * side:
        return (side, side), None
    if n == side * side + 1:
        return (side, side), torch.arange(-1, side * side)
    return None, None
