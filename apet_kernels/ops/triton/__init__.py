"""The Triton backend: fused kernels for CUDA tensors (and CPU tensors under the interpreter).

Stages, named as in the reference backend, one module each: ``fps`` (basis + norms + dot
products), ``residual`` (Gram solve, approximation errors as selection keys), ``select``
(threshold select + ascending compaction), ``merge`` (duplicate scan, GEMM-argmax assignment,
deterministic mean); ``launcher`` chains them and owns their device state (``Plan``);
``warmup`` compiles the kernel variants before serving. Importing this module imports triton;
``import apet_kernels`` does not (dispatch imports backends on first use).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # the backend then reports itself unavailable instead of failing
    _IMPORT_ERROR = f"triton is not importable ({exc})"

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Largest m = min(num_basis, K) the residual stage takes: its (MP, MP) register tiles need
# 64 KB of shared memory for layout conversions at MP = 128 (65536 bytes, sm_90, in
# tests/ops/triton_compile_check.py), and a tile of 4x the elements at MP = 256 would need
# about 256 KB, more than an H100 block may use (227 KB). Dispatch reads it: auto falls back to
# the next backend for larger bases.
MAX_BASIS = 128


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on ``x`` (None when it can).

    It runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
    (``TRITON_INTERPRET=1`` set before triton is first imported). float64 is not supported.
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if x.dtype == torch.float64:
        return "float64 is not supported by the triton backend (use backend='torch')"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
            "imported (or use backend='torch')"
        )
    return f"device type {x.device.type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"


def compress_dense(
    x: torch.Tensor, keep: int, num_basis: int, ridge: float, merge: bool, plan=None
) -> Outputs:
    """Dense op: ``x (S, N, D)`` -> ``out (S, K, D)`` x.dtype, ``kept (S, K)`` int64 ascending,
    ``assign (S, N)`` int64 (SPEC.md). Arguments are validated by the caller. ``plan``: a
    ``Plan([N] * S, [keep] * S, num_basis, x.dtype, D, x.device)`` the caller owns (see
    ``launcher``), or None for the module's cache."""
    from .launcher import run

    S, N, D = x.shape
    out, kept, assign = run(x, [N] * S, [keep] * S, num_basis, ridge, merge, True, plan)
    return out.view(S, keep, D), kept.view(S, keep), assign.view(S, N)


def compress_varlen(
    x: torch.Tensor,
    seqlens: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    merge: bool,
    plan=None,
) -> Outputs:
    """Varlen op on packed ``x (T, D)``: ``out (ΣK, D)``, ``kept (ΣK,)`` global rows of x,
    ``assign (T,)`` global output rows (-1 for dropped tokens when not merging). ``plan``: a
    ``Plan(seqlens, keeps, ...)`` the caller owns, or None."""
    from .launcher import run

    return run(x, list(seqlens), list(keeps), num_basis, ridge, merge, False, plan)


def warmup(D: int, dtype: torch.dtype, device="cuda", **options) -> int:
    """Compile the kernel variants for inputs of width D and ``dtype`` before serving or
    capturing (``warmup.warmup`` documents the options)."""
    from .warmup import warmup as _warmup

    return _warmup(D, dtype, device, **options)


def __getattr__(name: str):
    # Plan and release_captured_plans live in the launcher, which imports the kernels: load it
    # on first use so that importing this module stays cheap.
    if name in ("Plan", "release_captured_plans"):
        from . import launcher

        return getattr(launcher, name)
    raise AttributeError(name)
