"""The shim interface: what each model file (llava.py, llava_next.py, llava_onevision.py,
video_llava.py, qwen2_5_vl.py, qwen2_vl.py, qwen3_vl.py) tells the shared stages about its vision
stage, placeholders, positions and extra per-token planes (Qwen3-VL's DeepStack)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._config import ApetConfig
from ._layout import mask_positions
from ._selection import UnitInfo


@dataclass
class Placeholder:
    """One kind of placeholder token and what each of its occurrences holds.

    Attributes:
        token_id: the placeholder id in input_ids.
        layout: ``(P,)`` int64, one entry per occurrence of ``token_id`` in input_ids (row-major
            order): the packed stage-1 token row it shows, or -1 for a filler embedding.
        filler: ``(D_text,)`` embedding of the -1 entries (LLaVA-NeXT's image_newline), or None.
    """

    token_id: int
    layout: torch.Tensor
    filler: torch.Tensor | None = None


@dataclass
class VisualInput:
    """What a shim's vision stage hands to stage 1.

    Attributes:
        features: ``(T, D_v)`` stage-1 tokens of every unit, packed unit after unit.
        seqlens: N_s of every unit (host ints summing to T).
        infos: one :class:`UnitInfo` per unit.
        project: maps kept tokens ``(T1, D_v)`` to text embeddings ``(T1, D_text)``.
        placeholders: one :class:`Placeholder` per placeholder token id.
        planes: extra per-token feature tensors, each ``(T, D_p)`` with the rows of
            ``features`` (Qwen3-VL's DeepStack planes). Stage 1 compresses each with the kept
            indices and merge groups of ``features`` (:func:`apet_kernels.apply_selection`) and
            hands them to :meth:`Shim.plane_kwargs`. Empty for most models.
    """

    features: torch.Tensor
    seqlens: list[int]
    infos: list[UnitInfo]
    project: Callable[[torch.Tensor], torch.Tensor]
    placeholders: list[Placeholder]
    planes: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ItemGroup:
    """One kind of visual item (image, video) in a forward's inputs, so that ``generate`` can
    repeat each batch row's items with the row (beam search, num_return_sequences).

    Attributes:
        token_id: the placeholder id of this kind in input_ids.
        tokens: placeholder tokens of each item, in input order.
        tensors: per-item forward arguments of this kind: name -> rows of dim 0 of each item.
    """

    token_id: int
    tokens: list[int]
    tensors: dict[str, list[int]]


class Shim:
    """Model-specific parts; subclasses live in the model files. Positions are handled as
    ``(P, B, L)`` int64 internally: P = 1 for the LLaVA family, 3 (t, h, w) for the Qwen
    models' M-RoPE."""

    model_types: tuple[str, ...] = ()
    default_positions = "compact"
    pos_axes = 1
    #: forward arguments whose presence means "this forward has visual inputs".
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    #: forward arguments consumed by the vision stage (not passed on after stage 1).
    visual_keys: tuple[str, ...] = ()
    #: the paper's setting for this model family, and named budget rows.
    default_preset: str = ""
    presets: dict[str, ApetConfig] = {}
    #: whether the vision stage yields planes (``VisualInput.planes``) that the decoder stack's
    #: forward takes as keyword arguments (:meth:`plane_kwargs`; a pre-hook on it passes them).
    has_planes: bool = False

    def base(self, model: nn.Module) -> nn.Module:
        """The multimodal base model (``model.model`` of a *ForConditionalGeneration)."""
        return model.model if hasattr(model, "lm_head") else model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (has ``layers``, ``rotary_emb`` and ``config``)."""
        return self.base(model).language_model

    def check(self, model: nn.Module, config: ApetConfig) -> None:
        """Refuse a config this model cannot run (raise ValueError naming the field); called by
        ``apply_apet`` after the generic checks."""

    def plane_kwargs(self, visual: torch.Tensor, planes: list[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of the decoder stack's forward that carry the stage-1 planes.

        Args:
            visual: ``(B, L1)`` bool, the columns of the stage-1 visual tokens.
            planes: the compressed planes, each ``(V, D_p)``: one row per True entry of
                ``visual``, in row-major order (the order ``hidden[visual]`` reads).
        """
        raise NotImplementedError

    def has_visual(self, kwargs: dict[str, Any]) -> bool:
        """Whether this forward carries visual inputs to compress."""
        return any(kwargs.get(k) is not None and kwargs[k].numel() > 0 for k in self.pixel_keys)

    def visual_input(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualInput:
        """Run the vision encoder and describe the units and placeholders."""
        raise NotImplementedError

    def items(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> list[ItemGroup]:
        """The visual items of a forward's inputs, one :class:`ItemGroup` per kind present
        (no vision encoder run)."""
        raise NotImplementedError

    def original_positions(
        self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncompressed positions ``(P, B, L0)`` and each row's next position ``(B,)``.

        ``model`` is the base model; ``mask (B, L0)`` is bool. The LLaVA family numbers the valid
        tokens of a row 0, 1, ... (what generate does), so padding never shifts a row.
        """
        return mask_positions(mask)[None], mask.sum(1)

    def position_kwarg(self, pos: torch.Tensor) -> torch.Tensor:
        """``position_ids`` for the model's forward, from ``(P, B, L)`` positions."""
        return pos[0]

    def layer_position_ids(self, pos: torch.Tensor) -> torch.Tensor | None:
        """``position_ids`` the decoder layers receive. Only flash-attention reads them, to detect
        packed sequences when there is no padding mask: it splits where the position equals the
        row's minimum, which "original" positions (increasing, with gaps) never repeat."""
        return pos[0]

    def rotary(self, lm: nn.Module, hidden: torch.Tensor, pos: torch.Tensor):
        """``(cos, sin)`` of the decoder stack's rotary embedding at ``pos (P, B, L)``."""
        return lm.rotary_emb(hidden, self.position_kwarg(pos))
