"""The step both stages share: compress every unit's visual tokens, drop the dropped tokens'
columns from the batch, re-pad it, and write the kept (merged) tokens into their new columns.

Stage 1 does it to the prompt (placeholder columns of input_ids, before the decoder), stage 2 to
the hidden states entering decoder layer ``layer``; each then builds the rest of its sequence
(text embeddings, or the gathered hidden states) around :class:`Squeezed`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...api import compress_varlen
from ._config import ApetConfig
from ._layout import Relayout, relayout


class Squeezed(NamedTuple):
    """One stage's compression of a ``(B, L)`` batch into ``(B, L')``.

    Attributes:
        tokens: ``(K, D)`` kept (merged) tokens, unit after unit (the op's output).
        kept: ``(K,)`` int64 packed input token of every kept token (ascending per unit).
        assign: ``(T,)`` int64 output row each input token went to.
        lay: the :class:`Relayout` from the ``(B, L)`` to the ``(B, L')`` batch.
        rows: ``(K,)`` batch row of every kept token.
        cols: ``(K,)`` its column in the ``(B, L')`` batch.
    """

    tokens: torch.Tensor
    kept: torch.Tensor
    assign: torch.Tensor
    lay: Relayout
    rows: torch.Tensor
    cols: torch.Tensor


def squeeze(
    cfg: ApetConfig,
    x: torch.Tensor,
    seqlens: list[int],
    keep: list[int],
    tok_row: torch.Tensor,
    tok_col: torch.Tensor,
    stay: torch.Tensor,
    left: bool,
    counts: list[int] | None = None,
) -> Squeezed:
    """Compress ``x`` and lay the batch out again.

    Args:
        cfg: the op's arguments (num_basis, ridge, merge, backend).
        x: ``(T, D)`` visual tokens of every unit, packed unit after unit (``seqlens``).
        keep: tokens to keep per unit (host ints).
        tok_row, tok_col: ``(T,)`` where token t sits in the ``(B, L)`` batch.
        stay: ``(B, L)`` bool, the non-visual columns that stay (text, fillers), not padding.
        left: re-pad on the left (else the right).
        counts: the columns every row keeps when the host knows them (no sync then).
    """
    c = compress_varlen(x, seqlens, keep, **cfg.op_kwargs())
    device = stay.device  # x may sit elsewhere (a vision tower on another device)
    kept = c.kept.to(device)
    rows, cols = tok_row[kept], tok_col[kept]
    stay = stay.clone()
    stay[rows, cols] = True
    lay = relayout(stay, left, counts)
    return Squeezed(c.tokens, kept, c.assign.to(device), lay, rows, lay.newcol[rows, cols])


def place(seq: torch.Tensor, sq: Squeezed, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Write the kept tokens (``sq.tokens``, or ``tokens``: them projected) into ``seq (B, L',
    D)``, the re-laid-out sequence, in place; returns ``seq``."""
    tokens = sq.tokens if tokens is None else tokens
    seq[sq.rows, sq.cols] = tokens.to(seq.device, seq.dtype)
    return seq
