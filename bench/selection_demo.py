"""A picture of what ApET keeps: a scaled-down LLaVA-1.5 (random weights) looks at a synthetic
image through the shims, and ``apet_kernels.viz`` draws ``last_selection(model)`` on it.

With random weights the selection follows the image's local structure (edges, corners, the
uniform background merging into few tokens) rather than semantics; it shows that the recorded
selection, the token grid and the overlay line up.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import models
from .e2e import load_shims

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def synthetic_image(size: int = 336) -> torch.Tensor:
    """``(3, size, size)`` float in [0, 1]: a colour gradient, a bright square, a dark disc."""
    ramp = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    image = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 * torch.ones_like(xx)])
    lo, hi = size // 6, size // 2
    image[:, lo:hi, lo:hi] = torch.tensor([1.0, 0.9, 0.2])[:, None, None]
    disc = (xx - 0.68) ** 2 + (yy - 0.66) ** 2 < 0.18**2
    image[:, disc] = torch.tensor([0.1, 0.1, 0.35])[:, None]
    return image


def render(out_dir: str | Path, device: torch.device) -> tuple[Path | None, str | None]:
    """Write ``selection_llava15.png`` into ``out_dir``; returns (path, None) or (None, reason)."""
    shims, reason = load_shims()
    if shims is None:
        return None, reason
    from apet_kernels.viz import save_unit

    arch = models.llava15(full=False)
    model = arch.build(device, torch.float32, "sdpa")
    preset = shims.presets(model.config.model_type)["llava-1.5/64"]
    layer = max(1, round(preset.layer * arch.num_layers / 32))
    shims.apply_apet(model, preset.replace(layer=layer))
    image = synthetic_image()
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    inputs = arch.make_inputs(1, device, torch.float32)
    inputs["pixel_values"] = ((image - mean) / std)[None].to(device)
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    unit = shims.last_selection(model).units[0]
    side = math.isqrt(unit.num_tokens)
    title = (
        f"LLaVA-1.5 (scaled, random weights) llava-1.5/64: {unit.num_tokens} tokens on a "
        f"{side}x{side} grid -> {unit.kept.numel()} (vision) -> "
        f"{unit.layer_kept.numel() if unit.layer_kept is not None else unit.kept.numel()} "
        f"(layer {layer})"
    )
    path = save_unit(Path(out_dir) / "selection_llava15.png", image, unit, title=title)
    return path, None
