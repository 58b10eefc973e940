"""Argument checks shared by the op implementations, the fake kernels and the Python wrappers.

Every check runs on host metadata only (shapes, dtypes, host ints): no device sync. Errors name
the argument and the value received, as SPEC.md requires.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def check_tensor(x: object, rank: int, layout: str) -> None:
    """``x`` must be a floating tensor of the given rank (``layout`` names the dims for errors)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"x must have shape {layout} (rank {rank}), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"x must have dtype in ({names}), got {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature (D >= 1), got shape {tuple(x.shape)}")


def check_hyper(num_basis: object, ridge: object) -> None:
    """``num_basis`` an int >= 1 and ``ridge`` a finite float >= 0."""
    if not _is_int(num_basis):
        raise TypeError(f"num_basis must be an int, got {num_basis!r}")
    if num_basis < 1:
        raise ValueError(f"num_basis must be >= 1, got {num_basis}")
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool):
        raise TypeError(f"ridge must be a float, got {ridge!r}")
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge}")


def check_dense(x: object, keep: object, num_basis: object, ridge: object) -> None:
    """Validate the dense op's arguments: ``x (S, N, D)``, ``1 <= keep <= N``."""
    check_tensor(x, 3, "(S, N, D)")
    check_hyper(num_basis, ridge)
    if not _is_int(keep):
        raise TypeError(f"keep must be an int, got {keep!r}")
    n = x.shape[1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must satisfy 1 <= keep <= N = {n}, got {keep}")


def check_varlen(
    x: object, seqlens: object, keep: object, num_basis: object, ridge: object
) -> None:
    """Validate the varlen op's arguments: ``x (T, D)``, ``seqlens`` summing to T, one K_s per
    segment with ``0 <= K_s <= N_s`` and ``K_s = 0`` exactly when ``N_s = 0``."""
    check_tensor(x, 2, "(T, D)")
    check_hyper(num_basis, ridge)
    if not isinstance(seqlens, Sequence) or not all(_is_int(n) for n in seqlens):
        raise TypeError(f"seqlens must be a list of host ints, got {seqlens!r}")
    if any(n < 0 for n in seqlens):
        raise ValueError(f"seqlens must be >= 0, got {list(seqlens)}")
    total = sum(seqlens)
    if total != x.shape[0]:
        raise ValueError(f"seqlens must sum to T = {x.shape[0]}, got sum {total} ({list(seqlens)})")
    if not isinstance(keep, Sequence) or not all(_is_int(k) for k in keep):
        raise TypeError(f"keep must be a list of host ints (one per segment), got {keep!r}")
    if len(keep) != len(seqlens):
        raise ValueError(
            f"keep must have one entry per segment ({len(seqlens)}), got {len(keep)}: {list(keep)}"
        )
    for s, (k, n) in enumerate(zip(keep, seqlens, strict=True)):
        if not (1 <= k <= n or k == n == 0):
            raise ValueError(
                f"keep[{s}] must satisfy 1 <= keep <= seqlens[{s}] = {n} (0 only for an empty "
                f"segment), got {k}"
            )


def check_backend(backend: object) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
