"""Argument checks shared by the op implementations, the fake kernels and the Python wrappers.

Every check runs on host metadata only (shapes, dtypes, host ints): no device sync. Errors name
the argument and the value received, as SPEC.md requires. Checks use comparisons only (no
``math.isfinite``), so they trace on the symbolic ints and floats of
``torch.compile(dynamic=True)``. Python ints and floats, numpy scalars and torch's symbolic
numbers are accepted; bools are not numbers here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The CUDA backend holds M in a C int; m = min(M, K) makes any larger M mean the same anyway.
MAX_NUM_BASIS = 2**31 - 1
# A relative ridge this large already makes α ≈ 0 (e_i within m·1e-6 of ||v_i||); larger ones
# only risk λ = ridge · trace(G)/m overflowing float32 (ridge=1e300 made λ inf and every error
# NaN, which silently kept the lowest indices).
MAX_RIDGE = 1e6


def _is_int(value: object) -> bool:
    if isinstance(value, (bool, torch.SymBool)):
        return False
    return isinstance(value, (int, torch.SymInt, numbers.Integral))


def _is_real(value: object) -> bool:
    if isinstance(value, (bool, torch.SymBool)):
        return False
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat, numbers.Real))


def is_flag(value: object) -> bool:
    """A Python bool or a numpy bool (matched by type name: numpy is not imported)."""
    if isinstance(value, bool):
        return True
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


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
    """``num_basis`` an int in [1, MAX_NUM_BASIS] and ``ridge`` a float in [0, MAX_RIDGE]."""
    if not _is_int(num_basis):
        raise TypeError(f"num_basis must be an int, got {num_basis!r}")
    if not 1 <= num_basis <= MAX_NUM_BASIS:
        raise ValueError(
            f"num_basis must satisfy 1 <= num_basis <= {MAX_NUM_BASIS}, got {num_basis}"
        )
    if not _is_real(ridge):
        raise TypeError(f"ridge must be a float, got {ridge!r}")
    if not 0 <= ridge <= MAX_RIDGE:  # also False for NaN
        raise ValueError(f"ridge must be a finite float in [0, {MAX_RIDGE:g}], got {ridge}")


def check_flag(value: object, name: str) -> None:
    """``value`` must be a bool (Python or numpy): 1, None and "no" are refused."""
    if not is_flag(value):
        raise TypeError(f"{name} must be a bool, got {value!r}")


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
