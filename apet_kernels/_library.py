"""The ``apet`` torch.library namespace: schemas, device implementations and fake kernels.

``torch.ops.apet.compress`` and ``torch.ops.apet.compress_varlen`` are registered here and
nowhere else (define + impl + register_fake, not ``@custom_op``, which adds per-call overhead).
Both ops are inference-only: the forward runs on tensors that require grad, but a backward
through them raises.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._validation import check_backend, check_dense, check_varlen

_lib = torch.library.Library("apet", "DEF")
# Every impl below takes the schema's defaults too: the dispatcher may pass defaulted arguments
# by keyword (it does through the autograd kernel) or leave them out.
_lib.define(
    "compress(Tensor x, int keep, int num_basis=10, float ridge=1e-4, bool merge=True, "
    "str backend='auto') -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "compress_varlen(Tensor x, int[] seqlens, int[] keep, int num_basis=10, float ridge=1e-4, "
    "bool merge=True, str backend='auto') -> (Tensor, Tensor, Tensor)"
)

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _empty_dense(x: torch.Tensor, keep: int) -> Outputs:
    S, N, D = x.shape
    long = dict(dtype=torch.long, device=x.device)
    return x.new_empty(S, keep, D), torch.empty(S, keep, **long), torch.empty(S, N, **long)


def _empty_varlen(x: torch.Tensor, keep: list[int]) -> Outputs:
    T, D = x.shape
    total = sum(keep)
    long = dict(dtype=torch.long, device=x.device)
    return x.new_empty(total, D), torch.empty(total, **long), torch.empty(T, **long)


def _compress_impl(
    x: torch.Tensor,
    keep: int,
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
) -> Outputs:
    check_dense(x, keep, num_basis, ridge)
    check_backend(backend)
    if x.shape[0] == 0:
        return _empty_dense(x, keep)
    module = dispatch.resolve(backend, x, basis=min(num_basis, keep))
    return module.compress_dense(x, keep, num_basis, ridge, merge)


def _compress_varlen_impl(
    x: torch.Tensor,
    seqlens: list[int],
    keep: list[int],
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
) -> Outputs:
    check_varlen(x, seqlens, keep, num_basis, ridge)
    check_backend(backend)
    if x.shape[0] == 0:
        return _empty_varlen(x, keep)
    module = dispatch.resolve(backend, x, basis=min(num_basis, max(keep)))
    return module.compress_varlen(x, list(seqlens), list(keep), num_basis, ridge, merge)


def _compress_fake(
    x: torch.Tensor,
    keep: int,
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
) -> Outputs:
    check_dense(x, keep, num_basis, ridge)
    return _empty_dense(x, keep)


def _compress_varlen_fake(
    x: torch.Tensor,
    seqlens: list[int],
    keep: list[int],
    num_basis: int = 10,
    ridge: float = 1e-4,
    merge: bool = True,
    backend: str = "auto",
) -> Outputs:
    check_varlen(x, seqlens, keep, num_basis, ridge)
    return _empty_varlen(x, keep)


def _setup_context(ctx, inputs, output) -> None:
    _, kept, assign = output
    ctx.mark_non_differentiable(kept, assign)


def _inference_only_backward(ctx, *grads):
    raise RuntimeError(
        "apet.compress is inference-only: it has no backward. Call it under torch.no_grad() or "
        "on x.detach()."
    )


for _name, _impl, _fake in (
    ("compress", _compress_impl, _compress_fake),
    ("compress_varlen", _compress_varlen_impl, _compress_varlen_fake),
):
    _lib.impl(_name, _impl, "CPU")
    _lib.impl(_name, _impl, "CUDA")
    torch.library.register_fake(f"apet::{_name}", _fake, lib=_lib)
    torch.library.register_autograd(
        f"apet::{_name}", _inference_only_backward, setup_context=_setup_context, lib=_lib
    )
