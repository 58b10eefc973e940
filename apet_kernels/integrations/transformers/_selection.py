"""What a compressing forward kept, per image unit, readable after the call.

The shims store the op's packed outputs of the last forward that compressed (a prefill) on the
patch record; :func:`last_selection` unpacks them into one :class:`UnitSelection` per image unit
(CPU tensors), for visualisation and debugging, and the map from output rows to prompt columns.
Decode steps never overwrite it. Each thread sees its own last selection (two threads generating
on one model each read theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class UnitInfo:
    """Where an image unit comes from (filled in by the model shim).

    Attributes:
        kind: "image", "video_frame" (Video-LLaVA, Qwen2.5-VL videos: one temporal slice),
            "base" or "crop" (LLaVA-NeXT).
        item: index of the image (or video) among the forward's images (or videos), in input
            order, batch row after batch row.
        index: index of the unit within its item (frame or crop index; 0 for a plain image).
        grid: ``(h, w)`` of the token grid the unit's tokens sit on, when known.
        token_index: ``(N,)`` int64 cell (``row * w + col``) of each of the unit's N tokens in
            ``grid``, -1 for a token with no cell (a CLS token); ``None`` when token i is cell i.
    """

    kind: str
    item: int
    index: int
    grid: tuple[int, int] | None
    token_index: torch.Tensor | None = None


@dataclass(frozen=True)
class UnitSelection:
    """One image unit's selections.

    Attributes:
        row: batch row the unit sits in.
        info: :class:`UnitInfo` (kind, item, index, grid, token_index).
        num_tokens: N, the unit's tokens entering stage 1.
        kept: ``(K1,)`` int64 ascending indices in [0, N) of the tokens kept at stage 1.
        assign: ``(N,)`` int64 stage-1 slot (index into ``kept``) each token was merged into,
            -1 for dropped tokens when merging is off.
        layer_kept: ``(K2,)`` int64 ascending indices into ``kept`` (the stage-1 tokens) kept at
            stage 2, or ``None`` without stage 2. ``kept[layer_kept]`` are unit token indices.
        layer_assign: ``(K1,)`` int64 stage-2 slot of each stage-1 token, or ``None``.
    """

    row: int
    info: UnitInfo
    num_tokens: int
    kept: torch.Tensor
    assign: torch.Tensor
    layer_kept: torch.Tensor | None = None
    layer_assign: torch.Tensor | None = None


@dataclass(frozen=True)
class Selection:
    """The selections of one compressing forward.

    The forward's outputs cover the compressed sequence, not the prompt: ``logits[b, i]`` is
    the output at prompt column ``output_columns[b, i]`` of ``input_ids`` (-1: a padding row).
    ``hidden_states[j]`` covers the stage-1 sequence (``stage1_columns``) for ``j <= layer``
    (the embeddings and the outputs of the layers before ``layer``) and the final sequence
    (``output_columns``) after; without stage 2 both maps are the same. To line up logits with
    prompt offsets: ``logits[b][output_columns[b] == c]`` is column ``c``'s, if it was kept.

    Attributes:
        units: one :class:`UnitSelection` per unit, in packed order: all images (in input order,
            batch row after batch row), then all videos; the units of an item in order.
        layer: the stage-2 layer, None if stage 2 was off.
        output_columns: ``(B, L_out)`` int64 prompt column of every output row (-1: padding).
        stage1_columns: ``(B, L1)`` int64 prompt column of every row of the stage-1 sequence.
    """

    units: list[UnitSelection]
    layer: int | None
    output_columns: torch.Tensor | None = None
    stage1_columns: torch.Tensor | None = None


@dataclass
class RawSelection:
    """The op outputs as the shims produce them (device tensors, no sync until read)."""

    infos: list[UnitInfo]
    rows: torch.Tensor  # (S,) batch row of each unit
    seqlens: list[int]  # N_s
    keep1: list[int]  # K1_s
    kept1: torch.Tensor  # (ΣK1,) global rows into the packed stage-1 tokens
    assign1: torch.Tensor  # (ΣN,) global output rows
    layer: int | None = None
    keep2: list[int] = field(default_factory=list)
    kept2: torch.Tensor | None = None  # (ΣK2,) global rows into the packed stage-1 outputs
    assign2: torch.Tensor | None = None  # (ΣK1,)
    columns1: torch.Tensor | None = None  # (B, L1) prompt column of each stage-1 row, -1 pad
    columns: torch.Tensor | None = None  # (B, L_out) prompt column of each output row, -1 pad

    def unpack(self) -> Selection:
        """Per-unit CPU tensors with unit-local indices."""
        rows = self.rows.tolist()
        kept1, assign1 = self.kept1.cpu(), self.assign1.cpu()
        kept2 = None if self.kept2 is None else self.kept2.cpu()
        assign2 = None if self.assign2 is None else self.assign2.cpu()
        units = []
        n0 = k0 = j0 = 0
        for s, info in enumerate(self.infos):
            n, k = self.seqlens[s], self.keep1[s]
            lk = la = None
            if kept2 is not None:
                k2 = self.keep2[s]
                lk = kept2[j0 : j0 + k2] - k0
                la = assign2[k0 : k0 + k]
                la = torch.where(la >= 0, la - j0, la)
                j0 += k2
            a = assign1[n0 : n0 + n]
            units.append(
                UnitSelection(
                    row=rows[s],
                    info=info,
                    num_tokens=n,
                    kept=kept1[k0 : k0 + k] - n0,
                    assign=torch.where(a >= 0, a - k0, a),
                    layer_kept=lk,
                    layer_assign=la,
                )
            )
            n0 += n
            k0 += k
        return Selection(
            units=units,
            layer=self.layer if kept2 is not None else None,
            output_columns=None if self.columns is None else self.columns.cpu(),
            stage1_columns=None if self.columns1 is None else self.columns1.cpu(),
        )
