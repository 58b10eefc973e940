"""Qwen2.5-VL's M-RoPE positions for a prompt whose visual items were compressed by ApET stage 1,
as the Hugging Face shim numbers them (positions "original"). Pure torch, no vLLM import.

Uncompressed (transformers' ``get_rope_index``), an item that starts at position ``s`` puts its
token ``(i, y, x)`` of the LLM grid (temporal slice i, row y, column x) at
``(s + int(i * f), s + y, s + x)`` (f = tokens_per_second * second_per_grid for a video; an
image is one slice, i = 0), and the text after it continues at ``s + max(h, w)``. Compressed,
the kept tokens keep exactly those positions and the text does not move, so:

* text positions and every placeholder's t position are functions of the grids and the budget
  alone (each temporal slice keeps ``keep`` tokens, and all tokens of a slice share one t): the
  prompt's positions are built before the encoder runs (:func:`prompt_positions`);
* only a placeholder's (h, w) depends on which token it holds. The encoder output carries each
  kept token's (t, h, w) offsets in 6 extra channels (:func:`encode_offsets`), which
  :func:`fill_positions` writes into the placeholders of the chunk being prefilled, sync-free.
  The item's start is read back from the placeholder's own (final) t position minus its t
  offset, so nothing is assumed about the tokens around an item, and writing twice is harmless.

The largest t of every video slice survives compression (every slice keeps >= 1 token), so the
prompt's maximum position, and with it the first decode position, does not depend on the
selection either: ``max + 1 - len(prompt)`` is the same before and after the encoder, cached
prefix or not. (One exception: a prompt whose last token is an item's placeholder, with no token
after it, where the uncompressed maximum can sit on a dropped token's h or w. The Qwen processor
and chat template always close an item with ``<|vision_end|>``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: extra channels on each kept token of the encoder output: (t, h, w) as (hi, lo) byte pairs, so
#: (for offsets below 65536) every value is an integer below 256, exact in float16 and bfloat16
#: as well as float32.
CHANNELS = 6
_BYTE = 256


@dataclass(frozen=True)
class Item:
    """One visual item of a prompt, as vLLM's runner knows it before the encoder runs.

    Attributes:
        offset: index of its first placeholder token in the prompt.
        length: its placeholder count (``t * keep``).
        t, h, w: its LLM token grid (temporal slices, rows and columns after the 2x2 merger).
        t_factor: position step between temporal slices (an image has one slice, at t 0).
        keep: tokens kept per temporal slice.
    """

    offset: int
    length: int
    t: int
    h: int
    w: int
    t_factor: float
    keep: int


def slice_t(t: int, t_factor: float) -> torch.Tensor:
    """``(t,)`` int64 t offset of each temporal slice: ``int(i * t_factor)``, as transformers'
    ``get_vision_position_ids`` computes it (``(arange(t) * interval).long()``)."""
    return (torch.arange(t) * t_factor).long()


def item_offsets(t: int, h: int, w: int, t_factor: float) -> torch.Tensor:
    """``(t * h * w, 3)`` int64 (t, h, w) offsets of an uncompressed item's tokens, in the
    merger's output order (slice, row, column)."""
    tt = slice_t(t, t_factor).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def prompt_positions(num_tokens: int, items: Sequence[Item]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of a compressed prompt before the encoder runs, and the decode delta.

    Text tokens get their final positions. A placeholder of slice i gets ``s + int(i * f)`` on
    the t axis (final) and ``s`` on the h and w axes (replaced by :func:`fill_positions` once
    its token is known).

    Args:
        num_tokens: prompt length N (compressed: ``length`` placeholders per item).
        items: the prompt's items in prompt order.

    Returns:
        ``(positions (3, N) int64, delta)`` where ``delta = max position + 1 - N`` of the
        uncompressed numbering (the first decode position is ``N + delta``).
    """
    pos = torch.empty(3, num_tokens, dtype=torch.long)
    cur, st, top = 0, 0, -1
    for it in sorted(items, key=lambda i: i.offset):
        text = it.offset - st
        pos[:, st : it.offset] = torch.arange(cur, cur + text)
        cur += text
        t_off = slice_t(it.t, it.t_factor)
        pos[:, it.offset : it.offset + it.length] = cur
        pos[0, it.offset : it.offset + it.length] = cur + t_off.repeat_interleave(it.keep)
        top = max(top, cur + max(int(t_off[-1]), it.h - 1, it.w - 1))
        cur += max(it.h, it.w)
        st = it.offset + it.length
    pos[:, st:] = torch.arange(cur, cur + num_tokens - st)
    top = max(top, cur + num_tokens - st - 1)
    return pos, top + 1 - num_tokens


def encode_offsets(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(K, 3)`` int64 offsets -> ``(K, CHANNELS)`` channels in ``dtype`` (hi, lo bytes)."""
    hi, lo = offsets.div(_BYTE, rounding_mode="floor"), offsets.remainder(_BYTE)
    return torch.stack([hi, lo], dim=-1).reshape(offsets.shape[0], CHANNELS).to(dtype)


def decode_offsets(channels: torch.Tensor) -> torch.Tensor:
    """``(R, CHANNELS)`` channels -> ``(3, R)`` int64 (t, h, w) offsets."""
    pairs = channels.float().round().long().view(-1, 3, 2)
    return (pairs[..., 0] * _BYTE + pairs[..., 1]).T


def fill_positions(
    input_ids: torch.Tensor,
    placeholder_ids: Sequence[int],
    positions: torch.Tensor,
    offsets: torch.Tensor,
    num_computed_tokens: int,
) -> torch.Tensor:
    """Write the positions of the kept tokens that this prefill step embeds.

    The runner hands over the encoder rows of the step's placeholders in prompt order; they are
    the R placeholders that follow the first ``num_computed_tokens`` prompt tokens (a cached or
    earlier-chunk prefix is skipped, a chunk may start or end inside an item). Each goes to
    ``start + offset``, its item's ``start`` being its t position (final since
    :func:`prompt_positions`) minus its t offset. No host sync: placeholder ranks come from a
    cumulative sum, not from ``nonzero``.

    Args:
        input_ids: ``(N,)`` int64 prompt tokens, on ``positions``' device.
        placeholder_ids: the image and video placeholder token ids.
        positions: ``(3, N)`` int64 current prompt positions (not modified).
        offsets: ``(3, R)`` int64 (t, h, w) offsets of the step's kept tokens, in order.
        num_computed_tokens: prompt tokens already in the KV cache.

    Returns:
        ``(3, N)`` int64 new positions.
    """
    n, r = input_ids.shape[0], offsets.shape[1]
    if r == 0 or n == 0:
        return positions.clone()
    media = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    for tok in placeholder_ids:
        media |= input_ids == tok
    rank = media.long().cumsum(0) - 1  # placeholder rank of every placeholder token
    first = rank[num_computed_tokens - 1] + 1 if num_computed_tokens > 0 else rank.new_zeros(())
    row = rank - first  # its row among the step's offsets
    take = media & (row >= 0) & (row < r)
    off = offsets[:, row.clamp(0, r - 1)]
    new = (positions[0] - off[0]) + off
    return torch.where(take, new, positions)
