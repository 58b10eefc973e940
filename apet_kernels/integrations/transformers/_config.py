"""``ApetConfig``: the budget of both compression stages, validated up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...api import keep_count

_POSITIONS = ("original", "compact")
_BACKENDS = ("auto", "torch", "triton", "cuda")


def _check_keep(name: str, value: object) -> None:
    """A keep budget is an int >= 1 or a float ratio in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int >= 1 or a float in (0, 1], got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 when an int, got {value}")
    elif not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] when a float, got {value}")


@dataclass(frozen=True)
class ApetConfig:
    """Budgets of ApET's two stages for one model.

    Attributes:
        vision_keep: tokens kept per image unit at stage 1 (an image for LLaVA-1.5 and
            Qwen2.5-VL, a crop -- base image included -- for LLaVA-NeXT, a frame for Video-LLaVA):
            an int (clamped to the unit's length), or a float ratio in (0, 1] read through
            :func:`apet_kernels.keep_count`.
        layer: index of the decoder layer before which stage 2 compresses the visual hidden
            states again; ``None`` turns stage 2 off. Checked against the model's layer count
            when applied (``1 <= layer < num_hidden_layers``).
        layer_keep: stage-2 tokens per image unit: an int (clamped to the stage-1 count) or a
            float ratio of the unit's stage-1 count. Required when ``layer`` is set, and only then.
        num_basis, ridge, merge: the op's arguments (SPEC.md).
        positions: ``"original"``: kept tokens keep their position ids (Qwen2.5-VL: M-RoPE
            (t, h, w)) and text positions do not move; ``"compact"``: positions are renumbered
            contiguously after each stage. ``None`` takes the model's default (compact for the
            LLaVA family, as the paper's code does; original for Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
        backend: the op's backend ("auto", "torch", "triton", "cuda").
    """

    vision_keep: int | float
    layer: int | None = None
    layer_keep: int | float | None = None
    num_basis: int = 10
    ridge: float = 1e-4
    merge: bool = True
    positions: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_keep("vision_keep", self.vision_keep)
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int):
                raise TypeError(f"layer must be an int or None, got {self.layer!r}")
            if self.layer < 1:
                raise ValueError(
                    f"layer must be >= 1 (stage 2 runs before a decoder layer), got {self.layer}"
                )
            if self.layer_keep is None:
                raise ValueError(f"layer_keep is required when layer is set (layer={self.layer})")
        elif self.layer_keep is not None:
            raise ValueError(
                f"layer_keep={self.layer_keep!r} needs layer (the decoder layer stage 2 runs "
                "before); set layer, or leave layer_keep None to turn stage 2 off"
            )
        if self.layer_keep is not None:
            _check_keep("layer_keep", self.layer_keep)
        if isinstance(self.num_basis, bool) or not isinstance(self.num_basis, int):
            raise TypeError(f"num_basis must be an int, got {self.num_basis!r}")
        if self.num_basis < 1:
            raise ValueError(f"num_basis must be >= 1, got {self.num_basis}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise TypeError(f"ridge must be a float, got {self.ridge!r}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite float >= 0, got {self.ridge}")
        if not isinstance(self.merge, bool):
            raise TypeError(f"merge must be a bool, got {self.merge!r}")
        if self.positions is not None and self.positions not in _POSITIONS:
            raise ValueError(
                f"positions must be one of {_POSITIONS} or None, got {self.positions!r}"
            )
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    def replace(self, **overrides) -> ApetConfig:
        """A copy with some fields changed (validated again); unknown names raise TypeError.
        ``layer=None`` alone turns stage 2 off, dropping ``layer_keep`` with it."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in names:
                raise TypeError(f"unknown ApetConfig field {key!r}; fields are {sorted(names)}")
        if "layer" in overrides and overrides["layer"] is None:
            overrides.setdefault("layer_keep", None)
        return dataclasses.replace(self, **overrides)

    def op_kwargs(self) -> dict:
        """The op's keyword arguments for this config (``num_basis``, ``ridge``, ``merge``,
        ``backend``), so every integration calls ``compress_varlen`` the same way."""
        return {
            "num_basis": self.num_basis,
            "ridge": self.ridge,
            "merge": self.merge,
            "backend": self.backend,
        }

    def stage1_keep(self, n: int) -> int:
        """Stage-1 tokens kept from a unit of ``n`` tokens (0 for an empty unit)."""
        return _budget(self.vision_keep, n)

    def stage2_keep(self, n: int) -> int:
        """Stage-2 tokens kept from a unit that kept ``n`` tokens at stage 1."""
        return _budget(self.layer_keep, n)


def _budget(keep: int | float, n: int) -> int:
    if isinstance(keep, int):
        return min(keep, n)
    return keep_count(n, keep)
