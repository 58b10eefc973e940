"""The Python entry points: argument handling around ``torch.ops.apet.*`` and the budget helper."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._validation import (
    _is_int,
    _is_real,
    check_backend,
    check_dense,
    check_flag,
    check_tensor,
    check_varlen,
)


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
    if not _is_real(ratio) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    n = operator.index(n)
    if n == 0:
        return 0
    if ratio >= 1:  # ratio·n + 0.5 >= n: the clamp decides, and ratio·n may overflow a float
        return n
    return min(max(math.floor(float(ratio) * n + 0.5), 1), n)


def _host_int(value: object) -> object:
    """numpy integers -> int; ints, torch.SymInt and anything invalid pass through unchanged
    (the checks then name the argument)."""
    if _is_int(value) and not isinstance(value, (int, torch.SymInt)):
        return operator.index(value)
    return value


def _host_float(value: object) -> object:
    """numpy floats and ints -> float; floats, symbolic numbers and invalid values unchanged."""
    if _is_real(value) and not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        return float(value)
    return value


def _host_ints(value: object, name: str) -> object:
    """A sequence of ints, a 1-D integer CPU tensor or a numpy integer array -> list of ints.
    Anything else passes through for the checks to name (a CUDA tensor is refused here: reading
    it would sync with the device)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(
                f"{name} must be host ints, got a tensor on {value.device} (reading it would sync "
                f"with the device): pass {name}.tolist()"
            )
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(
                f"{name} must be a 1-D integer tensor or a list of ints, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        return value.tolist()
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ == "ndarray" and value.dtype.kind in "iu":
        return value.tolist() if value.ndim == 1 else value
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_host_int(v) for v in value]
    return value


def _check_options(merge: object, backend: object, check_finite: object) -> None:
    check_flag(merge, "merge")
    check_backend(backend)
    check_flag(check_finite, "check_finite")


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
        keep: K, tokens kept per segment, ``1 <= K <= N`` (an int; numpy integers accepted).
        num_basis: M, basis tokens drawn by farthest point sampling (m = min(M, K)),
            ``1 <= M <= 2**31 - 1``.
        ridge: relative ridge of the Gram solve (λ = ridge · trace(G)/m + FLT_MIN), in
            ``[0, 1e6]``; 0 is allowed (SPEC.md's pivot rule keeps rank-deficient bases finite).
        merge: fold each dropped token into its most cosine-similar kept token (uniform mean);
            a bool.
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
    # Validate here too: the dispatcher's schema check would reject a float keep or a string
    # merge (or overflow on num_basis=2**63) with a RuntimeError before the op's own checks run.
    keep, num_basis, ridge = _host_int(keep), _host_int(num_basis), _host_float(ridge)
    check_dense(x, keep, num_basis, ridge)
    _check_options(merge, backend, check_finite)
    x = _prepare(x, check_finite)
    merge = bool(merge)
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
        seqlens: host ints N_s >= 0 summing to T (zero-length segments are allowed): a list of
            ints (numpy ints too), a 1-D integer CPU tensor or a numpy integer array.
        keep: one int for every segment (clamped to each segment's length, 0 for empty ones),
            or K_s per segment, as seqlens, with ``1 <= K_s <= N_s`` (``K_s = 0`` exactly when
            ``N_s = 0``).
        num_basis, ridge, merge, backend, check_finite: as in :func:`compress`.

    Returns:
        ``Compressed(tokens (ΣK_s, D), kept (ΣK_s,) global rows of x, assign (T,) global output
        rows)``, segments in input order.
    """
    check_tensor(x, 2, "(T, D)")
    _check_options(merge, backend, check_finite)
    seqlens = _host_ints(seqlens, "seqlens")
    num_basis, ridge = _host_int(num_basis), _host_float(ridge)
    if _is_int(keep):
        keep = _host_int(keep)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if isinstance(seqlens, list) and all(_is_int(n) for n in seqlens):
            keep = [min(keep, n) for n in seqlens]
    else:
        keep = _host_ints(keep, "keep")
    check_varlen(x, seqlens, keep, num_basis, ridge)
    x = _prepare(x, check_finite)
    merge = bool(merge)
    return Compressed(
        *torch.ops.apet.compress_varlen(x, seqlens, keep, num_basis, ridge, merge, backend)
    )
