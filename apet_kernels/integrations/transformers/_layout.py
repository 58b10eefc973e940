"""Sequence bookkeeping shared by both stages: dropping columns and re-padding a batch.

Dropping tokens shortens rows by different amounts (rows hold different numbers of images), so a
compressed batch is re-padded: on the left when the input was left-padded or unpadded (so that
generated tokens stay right-aligned, as ``generate`` needs), on the right otherwise. Padding
columns of the input are dropped too, so a row's layout never depends on its batch neighbours.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Relayout(NamedTuple):
    """A column selection of a ``(B, L)`` batch, re-padded to ``(B, L')``.

    Attributes:
        index: ``(B, L')`` int64 source column of every new column (0 in padding slots).
        valid: ``(B, L')`` bool, False in padding slots (the new attention mask).
        newcol: ``(B, L)`` int64 new column of every source column, -1 where dropped.
        counts: host ints, the kept columns of every row (``L' = max(counts)``).
    """

    index: torch.Tensor
    valid: torch.Tensor
    newcol: torch.Tensor
    counts: list[int]


def relayout(keep: torch.Tensor, left: bool, counts: list[int] | None = None) -> Relayout:
    """Keep the True columns of ``keep (B, L)`` in order, padding rows to the longest on the
    ``left`` (or right).

    Args:
        keep: ``(B, L)`` bool.
        left: pad on the left (else the right).
        counts: the True count of every row when the host knows it (stage 2 does); without it,
            the counts are read back once (a sync).
    """
    batch, length = keep.shape
    count = keep.sum(1)
    if counts is None:
        counts = count.tolist()
    width = max(counts, default=0)
    rank = keep.long().cumsum(1) - 1
    slot = torch.arange(width, device=keep.device)
    if left:
        rank = rank + (width - count)[:, None]
        valid = slot[None] >= (width - count)[:, None]
    else:
        valid = slot[None] < count[:, None]
    newcol = torch.where(keep, rank, torch.full_like(rank, -1))
    # Dropped columns scatter into a scratch column past the end, so no nonzero (a sync).
    target = torch.where(keep, rank, torch.full_like(rank, width))
    source = torch.arange(length, device=keep.device).expand(batch, -1)
    index = keep.new_zeros(batch, width + 1, dtype=torch.long).scatter_(1, target, source)
    return Relayout(index[:, :width], valid, newcol, list(counts))


def is_left_aligned(mask: torch.Tensor | None) -> bool:
    """True when every row ends with a real token (left padding or none)."""
    return mask is None or bool(mask[:, -1].all())


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` contiguous positions of the valid tokens of each row, 0 in padding slots
    (what ``generate`` computes from a 2D attention mask)."""
    pos = mask.long().cumsum(1) - 1
    return pos.masked_fill(~mask.bool(), 0)


def next_positions(next_pos: torch.Tensor, extra: torch.Tensor, q: int) -> torch.Tensor:
    """Positions of the last ``q`` generated tokens: ``(B, q)``.

    Args:
        next_pos: ``(B,)`` position of the first generated token of each row.
        extra: ``(B, G)`` attention mask of the generated part (G >= q, the last q are new).
        q: tokens in this step.
    """
    return next_pos[:, None] + extra.long().cumsum(1)[:, -q:] - 1
