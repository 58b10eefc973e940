"""Carry other features through a compression the op already made.

A model may hold several feature tensors per visual token that must shrink together: Qwen3-VL's
DeepStack planes (features of earlier vision layers, added to the first decoder layers at the
visual positions) must keep the same tokens and merge the same groups as the main visual tokens,
so that each kept token gets the features of its own group. :func:`apply_selection` takes the
``kept`` and ``assign`` a :func:`~apet_kernels.compress` / :func:`~apet_kernels.compress_varlen`
call returned and applies them to another tensor with the same token rows.

It computes SPEC.md's merge step with a given assignment: ``out_j = mean of x_t over the tokens t
with assign[t] = j`` (the kept token ``kept_j`` itself included), and ``out_j = x[kept_j]``
bitwise when no token merged into slot j (so keep-all, and merge=False, are exact copies, -0.0
included). Sums add in token order whatever the thread count, the way the torch backend's merge
does, so ``apply_selection(x, c.kept, c.assign)`` equals the torch backend's ``c.tokens``
bitwise on CPU (for every backend it equals them to rounding).
"""

from __future__ import annotations

import torch

from ._validation import SUPPORTED_DTYPES
from .ops.reference import accumulation_dtype, slot_sums


def _check(x: object, kept: object, assign: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (T, D) or (S, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be a floating tensor (float16/32/64, bfloat16), got {x.dtype}")
    for name, t, rank in (("kept", kept, x.dim() - 1), ("assign", assign, x.dim() - 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64 or t.dim() != rank:
            raise ValueError(
                f"{name} must be an int64 tensor of rank {rank} (what compress returned), got "
                f"{t.dtype} of shape {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if assign.shape != x.shape[:-1]:
        raise ValueError(
            f"assign must have one entry per token of x, shape {tuple(x.shape[:-1])}, got "
            f"{tuple(assign.shape)}"
        )
    if x.dim() == 3 and kept.shape[0] != x.shape[0]:
        raise ValueError(
            f"kept must have one row per segment of x ({x.shape[0]}), got shape {tuple(kept.shape)}"
        )


def apply_selection(x: torch.Tensor, kept: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Compress ``x`` as another tensor was: keep rows ``kept``, merge by ``assign``.

    Args:
        x: packed ``(T, D')`` (the rows of the ``compress_varlen`` input) or dense ``(S, N, D')``
            (the segments of the ``compress`` input); D' may differ from the compressed tensor's.
        kept: ``(K,)`` global rows (varlen) or ``(S, K)`` per-segment indices (dense), as the op
            returned them.
        assign: ``(T,)`` global output rows or ``(S, N)`` slots, -1 for tokens not merged.

    Returns:
        ``(K, D')`` or ``(S, K, D')`` in x's dtype (sums in float32, float64 for float64 x).

    The op's outputs are trusted as they come (indices in range); no device sync happens.
    """
    _check(x, kept, assign)
    if x.dim() == 3:
        S, N, D = x.shape
        K = kept.shape[1]
        offsets = torch.arange(S, device=x.device)[:, None]
        flat_kept = (kept + offsets * N).reshape(-1)
        flat_assign = torch.where(assign >= 0, assign + offsets * K, assign).reshape(-1)
        out = apply_selection(x.reshape(S * N, D), flat_kept, flat_assign)
        return out.view(S, K, D)
    T = x.shape[0]
    K = kept.shape[0]
    v = x.detach().to(accumulation_dtype(x.dtype))
    kept_rows = v[kept]
    # Unmerged tokens (assign -1) go to a spare row K, dropped afterwards.
    target = torch.where(assign >= 0, assign, torch.full_like(assign, K))
    sums = slot_sums(v, target, K + 1)  # the torch backend's merge sums, in the same order
    counts = v.new_zeros(K + 1).index_put_((target,), v.new_ones(T), accumulate=True)
    sums, counts = sums[:K], counts[:K, None]
    out = torch.where(counts == 1, kept_rows, sums / counts.clamp_min(1.0))
    return out.to(x.dtype)
