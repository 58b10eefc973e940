"""apet_kernels.viz: overlays of kept / merged tokens on a synthetic image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import apet_kernels
from apet_kernels.viz import CELL_PX, save_overlay, save_unit

Image = pytest.importorskip("PIL.Image")

GRID = (12, 12)
PATCH = 8


def synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    """A 96x96 uint8 image (gradient + white square) and its 144 patch tokens ``(144, 192)``."""
    h, w = GRID[0] * PATCH, GRID[1] * PATCH
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([xx / w, yy / h, torch.zeros(h, w)], -1)
    image[30:60, 30:60] = 1.0
    tokens = image.reshape(GRID[0], PATCH, GRID[1], PATCH, 3).permute(0, 2, 1, 3, 4)
    return (image * 255).round().to(torch.uint8), tokens.reshape(GRID[0] * GRID[1], -1)


def _panel_pixel(sheet, panel: int, cell: int, offset: tuple[int, int]) -> tuple[int, int, int]:
    """RGB of pixel ``offset`` inside ``cell`` of panel ``panel`` (layout of save_overlay)."""
    side = sheet.size[1] - 12  # pad 6 on both sides, no title
    px = side // GRID[1]
    r, c = divmod(cell, GRID[1])
    x = 6 + panel * (side + 6) + c * px + offset[0]
    y = 6 + r * px + offset[1]
    return sheet.getpixel((x, y))


def test_overlay_two_stages(tmp_path: Path) -> None:
    image, tokens = synthetic()
    first = apet_kernels.compress(tokens[None], 16)
    second = apet_kernels.compress(first.tokens, 6)
    path = save_overlay(
        tmp_path / "sub" / "two.png", image, GRID, first.kept[0], first.assign[0],
        layer_kept=second.kept[0], layer_assign=second.assign[0],
    )  # fmt: skip
    assert path.exists()
    sheet = Image.open(path)
    assert sheet.format == "PNG"
    scale = max(1, -(-CELL_PX * GRID[0] // image.shape[0]))
    side = image.shape[0] * scale
    assert sheet.size == (3 * side + 4 * 6, side + 12)  # image, stage 1, stage 2
    kept = first.kept[0].tolist()
    dropped = next(i for i in range(144) if i not in kept)
    original = _panel_pixel(sheet, 0, dropped, (side // 24, side // 24))
    tinted = _panel_pixel(sheet, 1, dropped, (side // 24, side // 24))
    assert original != tinted  # dropped cells carry their merge slot's tint
    assert _panel_pixel(sheet, 1, kept[0], (0, 0)) == (255, 255, 255)  # kept: white outline


def test_overlay_plain_inputs(tmp_path: Path) -> None:
    """Lists / ints, a CHW float image with normalized values, no assign, one stage."""
    image, _ = synthetic()
    chw = (image.permute(2, 0, 1).float() - 128) / 60  # like normalized pixel_values
    path = save_overlay(tmp_path / "plain.png", chw, (12, 12), [0, 5, 143], title="plain")
    sheet = Image.open(path)
    assert sheet.size[0] > 2 * sheet.size[1] - 60  # two panels side by side


def test_overlay_token_index_with_cls(tmp_path: Path) -> None:
    """Tokens with no grid cell (a CLS token: -1) are skipped; PIL images are accepted."""
    image, tokens = synthetic()
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens])  # CLS first, N = 145
    out = apet_kernels.compress(tokens[None], 20)
    cells = torch.cat([torch.tensor([-1]), torch.arange(144)])
    pil = Image.fromarray(image.numpy())
    path = save_overlay(tmp_path / "cls.png", pil, GRID, out.kept[0], out.assign[0],
                        token_index=cells)  # fmt: skip
    assert Image.open(path).size[1] > 0


def test_overlay_rejects_mismatched_shapes(tmp_path: Path) -> None:
    image, _ = synthetic()
    with pytest.raises(ValueError, match="assign must have one entry per token"):
        save_overlay(tmp_path / "x.png", image, GRID, [0], torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in the"):
        save_overlay(tmp_path / "x.png", image, (2, 2), [0], token_index=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="image must be"):
        save_overlay(tmp_path / "x.png", torch.zeros(4, 4), GRID, [0])


def test_save_unit_from_a_selection_record(tmp_path: Path) -> None:
    """The shape of ``last_selection(model).units[i]``, standalone (no shims needed)."""
    image, tokens = synthetic()
    first = apet_kernels.compress(tokens[None], 16)
    second = apet_kernels.compress(first.tokens, 6)
    unit = SimpleNamespace(
        kept=first.kept[0], assign=first.assign[0],
        layer_kept=second.kept[0], layer_assign=second.assign[0],
        info=SimpleNamespace(kind="image", item=0, index=0, grid=GRID, token_index=None),
    )  # fmt: skip
    assert save_unit(tmp_path / "unit.png", image, unit).exists()
    unit.info.grid = None
    with pytest.raises(ValueError, match="no token grid"):
        save_unit(tmp_path / "unit.png", image, unit)


def test_import_stays_light() -> None:
    """Neither ``import apet_kernels`` nor ``import apet_kernels.viz`` imports PIL/matplotlib."""
    code = (
        "import sys, apet_kernels, apet_kernels.viz; "
        "assert not {'PIL', 'matplotlib'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
