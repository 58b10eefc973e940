"""Draw which visual tokens ApET kept (and where the others were merged) on the input image.

One PNG per image unit with a panel per stage: the image, then stage 1 (kept cells outlined,
every dropped cell tinted with the colour of the kept token it was merged into, or darkened
when merging is off), then stage 2 when the unit has one. Works from plain tensors and ints, or
from the shims' ``last_selection(model)`` units. PIL is imported on first use, so
``import apet_kernels`` stays light.

Example:
    >>> from apet_kernels.viz import save_overlay
    >>> save_overlay("kept.png", image, grid=(24, 24), kept=out.kept[0], assign=out.assign[0])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CELL_PX = 16  # panel resolution per token cell when the image is smaller than the grid allows
BORDER = (255, 255, 255)
DIM = 0.35  # brightness of dropped cells when there is no merge assignment


def _palette(n: int) -> torch.Tensor:
    """``(n, 3)`` uint8 distinct colours (golden-angle hues), one per kept slot."""
    hue = (torch.arange(n, dtype=torch.float64) * 0.618033988749895) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6) % 6
    rgb = 1 - 0.85 * torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # HSV with s=0.85, v=1
    return (rgb * 255).round().to(torch.uint8)


def _as_image(image: Any):
    """A PIL RGB image from a PIL image, an ``(H, W, 3)`` uint8 array/tensor, or a ``(3, H, W)``
    float tensor in [0, 1] (any other range is min-max scaled: pixel_values are normalized)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    t = torch.as_tensor(image).detach().cpu()
    if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
        t = t.permute(1, 2, 0)  # CHW -> HWC
    if t.dim() != 3 or t.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W, 3), (3, H, W) or a PIL image, got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = t.float()
        lo, hi = t.min(), t.max()
        if lo < 0 or hi > 1:
            t = (t - lo) / (hi - lo).clamp_min(1e-12)
        t = (t * 255).round().to(torch.uint8)
    t = t.expand(*t.shape[:2], 3).contiguous()
    return Image.frombytes("RGB", (t.shape[1], t.shape[0]), bytes(t.flatten().tolist()))


def _panel(base, grid: tuple[int, int], cells: torch.Tensor, slot: torch.Tensor, kept_slots: int):
    """Draw one stage: ``cells (N,)`` grid cell of each token (-1: none), ``slot (N,)`` output slot
    of each token (-1: dropped without merge), kept tokens are those whose slot owner they are."""
    from PIL import Image, ImageDraw

    h, w = grid
    width, height = base.size
    colours = _palette(max(kept_slots, 1)).tolist()
    overlay = Image.new("RGB", base.size)
    mask = Image.new("L", base.size, 0)
    draw_o, draw_m = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
    boxes = []
    for token, (cell, s) in enumerate(zip(cells.tolist(), slot.tolist(), strict=True)):
        if cell < 0:
            continue
        r, c = divmod(cell, w)
        box = (c * width // w, r * height // h, (c + 1) * width // w - 1, (r + 1) * height // h - 1)
        if s < 0:  # dropped, not merged: darken
            draw_o.rectangle(box, fill=(0, 0, 0))
            draw_m.rectangle(box, fill=round(255 * (1 - DIM)))
        else:
            draw_o.rectangle(box, fill=tuple(colours[s]))
            draw_m.rectangle(box, fill=110)
        boxes.append((box, s, token))
    panel = Image.composite(overlay, base, mask)
    draw = ImageDraw.Draw(panel)
    return panel, draw, boxes


def _stage_panel(base, grid, cells, kept: torch.Tensor, assign: torch.Tensor | None):
    """Stage panel: tint by merge slot, outline the kept cells."""
    n = cells.shape[0]
    is_kept = torch.zeros(n, dtype=torch.bool)
    is_kept[kept] = True
    if assign is None:
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[kept] = torch.arange(kept.numel())
    else:
        slot = assign.clone()
    panel, draw, boxes = _panel(base, grid, cells, slot, kept.numel())
    colours = _palette(max(kept.numel(), 1)).tolist()
    for box, s, token in boxes:
        if is_kept[token]:
            draw.rectangle(box, outline=BORDER, width=2)
            inner = (box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2)
            if inner[2] > inner[0] and inner[3] > inner[1]:
                draw.rectangle(inner, outline=tuple(colours[s]), width=1)
    return panel


def save_overlay(
    path: str | Path,
    image: Any,
    grid: tuple[int, int],
    kept: torch.Tensor,
    assign: torch.Tensor | None = None,
    *,
    layer_kept: torch.Tensor | None = None,
    layer_assign: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG: the image, stage 1 and (when given) stage 2 side by side.

    Args:
        path: where to write the PNG (parent folders are created).
        image: PIL image, ``(H, W, 3)`` uint8, or ``(3, H, W)`` float (normalized values are
            min-max scaled for display).
        grid: ``(h, w)`` token grid the unit's tokens sit on.
        kept: ``(K1,)`` int64 stage-1 kept token indices in [0, N).
        assign: ``(N,)`` int64 stage-1 slot each token was merged into (-1: dropped, not
            merged), or None to show the kept tokens only.
        layer_kept: ``(K2,)`` int64 stage-2 kept indices into ``kept``, or None (no stage 2).
        layer_assign: ``(K1,)`` int64 stage-2 slot of each stage-1 token, or None.
        token_index: ``(N,)`` int64 grid cell (``row * w + col``) of each token, -1 for tokens
            with no cell (a CLS token); None when token i sits in cell i (N = h·w).
        title: text drawn above the panels.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    h, w = (int(v) for v in grid)
    kept = torch.as_tensor(kept).long().cpu()
    cells = (
        torch.arange(h * w) if token_index is None else torch.as_tensor(token_index).long().cpu()
    )
    if assign is not None and torch.as_tensor(assign).numel() != cells.numel():
        raise ValueError(
            f"assign must have one entry per token ({cells.numel()}), got "
            f"{torch.as_tensor(assign).numel()}"
        )
    if cells.max() >= h * w:
        raise ValueError(f"token cells must lie in the {h}x{w} grid, got max {int(cells.max())}")
    base = _as_image(image)
    scale = max(1, -(-CELL_PX * max(h, w) // max(base.size)))  # upscale tiny images
    base = base.resize((base.size[0] * scale, base.size[1] * scale), Image.NEAREST)
    assign = None if assign is None else torch.as_tensor(assign).long().cpu()
    panels = [base, _stage_panel(base, (h, w), cells, kept, assign)]
    if layer_kept is not None:
        layer_kept = torch.as_tensor(layer_kept).long().cpu()
        # Compose the stages: token -> stage-1 slot -> stage-2 slot; kept = kept[layer_kept].
        final_assign = None
        if assign is not None and layer_assign is not None:
            layer_assign = torch.as_tensor(layer_assign).long().cpu()
            first = assign.clamp_min(0)
            final_assign = torch.where(assign >= 0, layer_assign[first], assign)
        panels.append(_stage_panel(base, (h, w), cells, kept[layer_kept], final_assign))
    pad, top = 6, 18 if title else 0
    width = sum(p.size[0] for p in panels) + pad * (len(panels) + 1)
    sheet = Image.new("RGB", (width, base.size[1] + 2 * pad + top), (255, 255, 255))
    x = pad
    for p in panels:
        sheet.paste(p, (x, pad + top))
        x += p.size[0] + pad
    if title:
        ImageDraw.Draw(sheet).text((pad, 3), title, fill=(0, 0, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def save_unit(path: str | Path, image: Any, unit: Any, title: str | None = None) -> Path:
    """:func:`save_overlay` for one unit of the shims' ``last_selection(model).units`` (anything
    with ``kept``, ``assign``, ``layer_kept``, ``layer_assign`` and ``info.grid`` /
    ``info.token_index``)."""
    info = unit.info
    if info.grid is None:
        raise ValueError(f"unit {info.kind} {info.index} of item {info.item} has no token grid")
    return save_overlay(
        path,
        image,
        info.grid,
        unit.kept,
        unit.assign,
        layer_kept=unit.layer_kept,
        layer_assign=unit.layer_assign,
        token_index=info.token_index,
        title=title,
    )
