"""State that outlives one layer: what a patched model holds (:class:`Patch`), what one forward
call carries through the decoder stack (:class:`CallContext`) and what a compressed KV cache
remembers for decoding (:class:`SeqState`).

Nothing per call is stored on the model: the patched forward hands its :class:`CallContext` to
the decoder layers inside the forward's own keyword arguments (``CALL_KEY``), so concurrent
forwards on one model (two threads generating) never see each other's state, and a layer that
gradient checkpointing replays in the backward gets the same context again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._compat import cache_keyword
from ._config import ApetConfig
from ._interface import Shim
from ._selection import RawSelection

#: the keyword under which a forward's CallContext travels to the decoder layers' pre-hooks
CALL_KEY = "apet_call"
#: the attribute of a KV cache object that holds its SeqState
STATE_ATTR = "_apet_state"


@dataclass
class Group:
    """One cache group (layers before or from ``layer``): its prompt mask and next positions."""

    valid: torch.Tensor  # (B, Lg) bool
    next_pos: torch.Tensor  # (B,) int64


@dataclass
class SeqState:
    """Attached to the KV cache after a compressing prefill; read by every decode step."""

    prompt_len: int  # L0, the uncompressed prompt length generate's mask starts with
    group1: Group
    group2: Group | None = None


@dataclass
class CallContext:
    """What the stage-2 hooks need during one forward of a patched model (one per call).

    Prefill fields describe the stage-1 sequence (B rows, L1 columns, T1 stage-1 tokens);
    ``counts1`` and ``unit_rows`` are host ints, so stage 2 sizes its batch without a sync.
    """

    prefill: bool
    state: SeqState
    extra: torch.Tensor | None = None  # decode: (B, G) mask of the generated part
    q: int = 0
    pos1: torch.Tensor | None = None  # prefill: (P, B, L1)
    tok_row: torch.Tensor | None = None  # prefill: (T1,) row of every stage-1 visual token
    tok_col: torch.Tensor | None = None  # prefill: (T1,) column in the L1 sequence
    visual1: torch.Tensor | None = None  # prefill: (B, L1) bool
    counts1: list[int] | None = None  # prefill: valid tokens of every row of the L1 sequence
    unit_rows: list[int] | None = None  # prefill: batch row of every unit (-1: empty unit)
    left: bool = True
    raw: RawSelection | None = None
    index2: torch.Tensor | None = None  # (B, L2) source columns (in L1) of the stage-2 sequence
    group2_kwargs: dict | None = None
    #: prefill: the decoder stack's extra keyword arguments (Shim.plane_kwargs), or None
    lm_kwargs: dict | None = None


@dataclass
class Patch:
    """Everything apply_apet installed on one model instance (removed by remove_apet); shared by
    every call, so nothing here changes during a forward except the selection records."""

    shim: Shim
    config: ApetConfig
    model: nn.Module
    orig_forward: Callable
    had_instance_forward: bool
    hooks: list = field(default_factory=list)
    #: generate's ``_expand_inputs_for_generation`` that the patch wraps (None: not wrapped).
    orig_expand: Callable | None = None
    #: the last compressing forward's selection, model-wide and per thread
    selection: RawSelection | None = None
    local: threading.local = field(default_factory=threading.local)
    #: the keyword under which ``orig_forward`` takes the KV cache
    cache_kw: str = ""

    def __post_init__(self) -> None:
        self.cache_kw = cache_keyword(self.orig_forward)

    def record(self, raw: RawSelection) -> None:
        self.selection = raw
        self.local.selection = raw

    def last(self) -> RawSelection | None:
        """The calling thread's last selection, else the model's last."""
        mine = getattr(self.local, "selection", None)
        return mine if mine is not None else self.selection
