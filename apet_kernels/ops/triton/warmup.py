"""Compile the Triton kernels before serving: ``warmup(D, dtype)``.

Triton compiles a kernel variant on the first launch with a new specialization key: its
constexprs (block sizes, dense/varlen, merge, the basis tile), the dtypes of its pointers, the
16-byte alignment of each pointer and, for integer scalars not marked ``do_not_specialize``,
whether the value is 1 or a multiple of 16. The kernels mark every scalar that changes with the
batch (token and block counts, n_div, the segment stride, the step) ``do_not_specialize``, so
what remains is a function of x's dtype, width D and strides, num_basis and merge, plus the
select stage's two blocks (segments up to 1024 tokens, longer). One tiny call per variant
therefore compiles everything later calls of any batch composition need; a compile takes
seconds and would otherwise land mid-serving or inside a CUDA-graph capture.

Not covered (each compiles once on first use): non-contiguous x (other strides), segments whose
in-segment offsets pass 2**31 elements (int64 offsets), and more than 2**31 tokens in one call
(int64 scalars).
"""

from __future__ import annotations

import torch


def warmup(
    D: int,
    dtype: torch.dtype,
    device: torch.device | str = "cuda",
    *,
    num_basis: int = 10,
    merge: tuple[bool, ...] = (True, False),
    dense: tuple[bool, ...] = (True, False),
    long_segments: bool = False,
    ridge: float = 1e-4,
) -> int:
    """Compile every kernel variant that contiguous inputs of this ``dtype``, width ``D`` and
    ``num_basis`` need, for the ``merge`` settings and op kinds (``dense``: True for
    ``compress``, False for ``compress_varlen``) listed; ``long_segments`` also compiles the
    variant for segments longer than 1024 tokens. Runs the op on zeros (one tiny call per
    variant) and returns the number of calls made.

    This compiles kernels only; a CUDA-graph capture additionally needs the call shape's index
    tables on the device: run the captured shape once eagerly, or pass a ``Plan``.
    """
    from .launcher import run

    if not isinstance(D, int) or D < 1:
        raise ValueError(f"D: a positive int, got {D!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype: float16, bfloat16 or float32, got {dtype}")
    if not isinstance(num_basis, int) or num_basis < 1:
        raise ValueError(f"num_basis: a positive int, got {num_basis!r}")
    lengths = [num_basis + 2] + ([1025] if long_segments else [])
    calls = 0
    for n in lengths:
        keep = num_basis + 1  # > m = num_basis: the residual runs with the full basis tile
        for is_dense in dense:
            shape = (1, n, D) if is_dense else (n, D)
            x = torch.zeros(shape, dtype=dtype, device=device)
            for do_merge in merge:
                run(x, [n], [keep], num_basis, ridge, do_merge, dense=is_dense)
                calls += 1
    return calls
