"""Stage 1 (prefill): compress every image unit's vision features, drop the placeholder columns
of the dropped tokens from the prompt, re-pad the batch to L1 columns and embed it.

``input_ids`` (B, L0) holds one placeholder per visual token (and, for LLaVA-NeXT, per newline
filler); after stage 1 the row keeps its text, its fillers and one column per kept token, in the
original order. Padding columns are dropped too, so a row's layout never depends on its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...selection import apply_selection
from ._config import ApetConfig
from ._interface import VisualInput
from ._layout import Relayout
from ._selection import RawSelection
from ._squeeze import place, squeeze


class Stage1(NamedTuple):
    """The stage-1 sequence.

    Attributes:
        lay: the :class:`Relayout` from the ``(B, L0)`` prompt to the ``(B, L1)`` sequence.
        embeds: ``(B, L1, D)`` input embeddings.
        tok_row, tok_col: ``(T1,)`` where each stage-1 token (in the op's output order) sits.
        unit_rows: host ints, the batch row of every unit (-1 for a unit without tokens).
        raw: the selection record (stage 2 fills in its part).
        planes: the shim's planes compressed as the visual tokens were, each ``(T1, D_p)`` in
            the op's output order (row i belongs to the token at ``tok_row[i], tok_col[i]``).
    """

    lay: Relayout
    embeds: torch.Tensor
    tok_row: torch.Tensor
    tok_col: torch.Tensor
    unit_rows: list[int]
    raw: RawSelection
    planes: list[torch.Tensor]


def stage1(
    cfg: ApetConfig,
    embed: nn.Module,
    vis: VisualInput,
    input_ids: torch.Tensor,
    mask0: torch.Tensor,
    left: bool,
) -> Stage1:
    """Compress, drop, re-pad, embed.

    Args:
        embed: the model's input embeddings.
        vis: the shim's vision stage output.
        input_ids: ``(B, L0)``.
        mask0: ``(B, L0)`` bool attention mask.
        left: re-pad on the left (else the right).
    """
    device = input_ids.device  # the vision tower may sit on another device (device_map)
    total = vis.features.shape[0]
    tok_row0 = torch.zeros(total, dtype=torch.long, device=device)
    tok_col0 = torch.zeros(total, dtype=torch.long, device=device)
    stay = mask0.clone()
    fillers = []
    for ph in vis.placeholders:
        where = input_ids == ph.token_id
        stay &= ~where
        pos = where.nonzero()  # a sync, once per placeholder kind: checks the count
        layout = ph.layout.to(device)
        if pos.shape[0] != layout.numel():
            raise ValueError(
                f"input_ids hold {pos.shape[0]} placeholder tokens {ph.token_id} but the visual "
                f"inputs need {layout.numel()}"
            )
        is_tok = layout >= 0
        tok_row0[layout[is_tok]] = pos[is_tok, 0]
        tok_col0[layout[is_tok]] = pos[is_tok, 1]
        if ph.filler is not None:  # fillers (LLaVA-NeXT's newlines) always stay
            stay[pos[~is_tok, 0], pos[~is_tok, 1]] = True
            fillers.append((ph.filler, pos[~is_tok]))
    keep1 = [cfg.stage1_keep(n) for n in vis.seqlens]
    sq = squeeze(cfg, vis.features, vis.seqlens, keep1, tok_row0, tok_col0, stay, left)
    lay = sq.lay
    embeds = embed(input_ids.gather(1, lay.index))
    for filler, pos in fillers:
        embeds[pos[:, 0], lay.newcol[pos[:, 0], pos[:, 1]]] = filler.to(embeds)
    place(embeds, sq, vis.project(sq.tokens))
    # each kept token gets the plane features of its own merge group, as its main features did
    planes = [apply_selection(p, sq.kept.to(p.device), sq.assign.to(p.device)) for p in vis.planes]
    # The row of every unit, from its first token, read back with the row counts' sync.
    starts = torch.tensor([0, *vis.seqlens[:-1]], device=device).cumsum(0).clamp(max=total - 1)
    has = torch.tensor([n > 0 for n in vis.seqlens], device=device)
    unit_rows = torch.where(has, tok_row0[starts], -1) if total else torch.full_like(starts, -1)
    raw = RawSelection(vis.infos, unit_rows, list(vis.seqlens), keep1, sq.kept, sq.assign)
    return Stage1(lay, embeds, sq.rows, sq.cols, unit_rows.tolist(), raw, planes)
