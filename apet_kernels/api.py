"""The Python entry points: argument handling around ``torch.ops.apet.*`` and the budget helper."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._validation import _is_int, check_backend, check_dense, check_tensor, check_varlen


class Compressed(NamedTuple):
    """What the op returns.

    Dense: ``tokens (S, K, D)`` in x's dtype, ``kept (S, K)`` int64 ascending token indices,
    ``assign (S, N)`` int64 output slot of every token (-1 for dropped tokens when not merging).
    Varlen: ``tokens (ΣK_s, D)``, ``kept (ΣK_s,)`` global rows of x, ``assign (T,)`` global
    output rows, segments in input order.
    """

    tokens: torch.Tensor
    kept: torch.Tensor
    assign: torch.Tensor


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept from a segment of ``n`` tokens at ``ratio``.

    ``clamp(floor(ratio·n + 0.5), 1, n)`` for n >= 1 and 0 for n = 0 (SPEC.md). A pure function
    of host numbers, so a serving engine can size placeholders before the vision encoder runs.
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    if n == 0:
        return 0
    return min(max(math.floor(ratio * n + 0.5), 1), n)


def _prepare(x: torch.Tensor, check_finite: bool) -> torch.Tensor:
    if check_finite and not bool(torch.isfinite(x).all()):  # syncs: opt-in only
        raise ValueError("x contains NaN or Inf values (check_finite=True)")
    return x.detach()  # inference-only: never record autograd history


def compress(
    x: torch.Tensor,
    keep: int,
    *,
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
) -> Compressed:
    """Compress each of S segments of N tokens to K tokens (SPEC.md). Inference-only.

    Args:
        x: ``(S, N, D)`` float16/bfloat16/float32 (float64 on the torch backend), any strides.
            Detached: no gradient flows through the op.
        keep: K, tokens kept per segment, ``1 <= K <= N``.
        num_basis: M, basis tokens drawn by farthest point sampling (m = min(M, K)).
        ridge: relative ridge of the Gram solve (λ = ridge · trace(G)/m + FLT_MIN).
        merge: fold each dropped token into its most cosine-similar kept token (uniform mean).
        backend: "auto", "torch", "triton" or "cuda"; "auto" reads ``APET_BACKEND`` first.
        check_finite: raise ``ValueError`` on NaN/Inf in x (syncs with the device).

    Returns:
        ``Compressed(tokens (S, K, D) x.dtype, kept (S, K) int64, assign (S, N) int64)``.

    Example:
        >>> x = torch.randn(1, 576, 1024)
        >>> out = compress(x, 96)
        >>> out.tokens.shape, out.kept.shape, out.assign.shape
        (torch.Size([1, 96, 1024]), torch.Size([1, 96]), torch.Size([1, 576]))
    """
    # Validate here too: the dispatcher's schema check would reject a float keep with a less
    # helpful message before the op's own validation runs.
    check_dense(x, keep, num_basis, ridge)
    check_backend(backend)
    x = _prepare(x, check_finite)
    return Compressed(*torch.ops.apet.compress(x, keep, num_basis, ridge, merge, backend))


def compress_varlen(
    x: torch.Tensor,
    seqlens: Sequence[int],
    keep: int | Sequence[int],
    *,
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
) -> Compressed:
    """Compress ragged segments packed along the first dim of ``x`` (SPEC.md, varlen).

    Args:
        x: ``(T, D)``, segment s occupying rows ``sum(seqlens[:s]) .. + seqlens[s]``.
        seqlens: host ints N_s >= 0 summing to T (zero-length segments are allowed).
        keep: one int for every segment (clamped to each segment's length, 0 for empty ones),
            or a list of K_s with ``1 <= K_s <= N_s`` (``K_s = 0`` exactly when ``N_s = 0``).
        num_basis, ridge, merge, backend, check_finite: as in :func:`compress`.

    Returns:
        ``Compressed(tokens (ΣK_s, D), kept (ΣK_s,) global rows of x, assign (T,) global output
        rows)``, segments in input order.
    """
    check_tensor(x, 2, "(T, D)")
    check_backend(backend)
    seqlens = list(seqlens) if isinstance(seqlens, Sequence) else seqlens
    if _is_int(keep):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if isinstance(seqlens, list) and all(_is_int(n) for n in seqlens):
            keep = [min(keep, n) for n in seqlens]
    elif isinstance(keep, Sequence):
        keep = list(keep)
    check_varlen(x, seqlens, keep, num_basis, ridge)
    x = _prepare(x, check_finite)
    return Compressed(
        *torch.ops.apet.compress_varlen(x, seqlens, keep, num_basis, ridge, merge, backend)
    )
