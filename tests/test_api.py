"""The Python wrappers: keep_count, argument errors that name the argument, backends()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import apet_kernels
from apet_kernels import keep_count


@pytest.mark.parametrize(
    "n,ratio,want",
    [
        (576, 1 / 6, 96),
        (576, 0.5, 288),
        (0, 0.5, 0),
        (10, 0.0, 1),
        (10, 1.0, 10),
        (10, 2.0, 10),
        (7, 0.5, 4),
        (5, 0.5, 3),
        (2048, 0.3, 614),
        (1, 1e-9, 1),
        (5, 1e308, 5),  # ratio·n overflows a float: the clamp answers (it raised OverflowError)
        (2**70, 1e300, 2**70),
        (np.int64(576), np.float32(0.5), 288),  # numpy scalars
        (np.int32(2048), np.float64(0.3), 614),
        (10, 1, 10),
    ],
)
def test_keep_count(n, ratio, want):
    got = keep_count(n, ratio)
    assert got == want and type(got) is int


@pytest.mark.parametrize(
    "n,ratio,message",
    [
        (-1, 0.5, "n must be an int >= 0, got -1"),
        (3.0, 0.5, "n must be an int >= 0, got 3.0"),
        (True, 0.5, "n must be an int >= 0, got True"),
        (5, float("nan"), "ratio must be a finite number, got nan"),
        (5, float("inf"), "ratio must be a finite number, got inf"),
        (5, -0.1, "ratio must be >= 0, got -0.1"),
        (5, "0.5", "ratio must be a finite number, got '0.5'"),
    ],
)
def test_keep_count_rejects(n, ratio, message):
    with pytest.raises(ValueError, match=message):
        keep_count(n, ratio)


X = torch.randn(2, 10, 4)
BAD_DENSE = [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(10, 4)), ValueError, r"x must have shape \(S, N, D\)"),
    (dict(x=torch.ones(2, 10, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 10, 0)), ValueError, "at least one feature"),
    (dict(keep=0), ValueError, "keep must satisfy 1 <= keep <= N = 10, got 0"),
    (dict(keep=11), ValueError, "got 11"),
    (dict(keep=2.5), TypeError, "keep must be an int"),
    (dict(keep=True), TypeError, "keep must be an int"),
    (dict(keep=np.float64(2.0)), TypeError, "keep must be an int"),
    (dict(num_basis=0), ValueError, r"num_basis must satisfy 1 <= num_basis <= 2147483647, got 0"),
    # 2**63 overflowed the schema's int64: the dispatcher raised a RuntimeError before.
    (dict(num_basis=2**63), ValueError, "num_basis must satisfy .* got 9223372036854775808"),
    (dict(num_basis=2**31), ValueError, "got 2147483648"),
    (dict(num_basis=4.0), TypeError, "num_basis must be an int, got 4.0"),
    (dict(ridge=-1e-3), ValueError, r"ridge must be a finite float in \[0, 1e\+06\], got -0.001"),
    (dict(ridge=float("nan")), ValueError, "ridge must be a finite float .*, got nan"),
    (dict(ridge=float("inf")), ValueError, "ridge must be a finite float .*, got inf"),
    # λ = ridge·trace(G)/m overflowed float32 and silently kept the lowest indices.
    (dict(ridge=1e300), ValueError, "ridge must be a finite float .*, got 1e[+]300"),
    (dict(ridge="1e-4"), TypeError, "ridge must be a float, got '1e-4'"),
    (dict(ridge=True), TypeError, "ridge must be a float, got True"),
    (dict(merge="no"), TypeError, "merge must be a bool, got 'no'"),  # was a RuntimeError
    (dict(merge=None), TypeError, "merge must be a bool, got None"),  # was silently accepted
    (dict(merge=1), TypeError, "merge must be a bool, got 1"),  # was silently accepted
    (dict(check_finite="no"), TypeError, "check_finite must be a bool, got 'no'"),
    (dict(check_finite=0), TypeError, "check_finite must be a bool, got 0"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
]


@pytest.mark.parametrize("change,error,message", BAD_DENSE)
def test_dense_argument_errors(change, error, message):
    args = dict(x=X, keep=5, num_basis=10, ridge=1e-4, backend="auto")
    args.update(change)
    x, keep = args.pop("x"), args.pop("keep")
    with pytest.raises(error, match=message):
        apet_kernels.compress(x, keep, **args)


def test_numpy_scalars_are_accepted_as_their_python_values():
    x = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(3))
    for keep, num_basis, ridge, merge in [
        (np.int64(9), np.int32(4), np.float64(1e-3), np.bool_(True)),
        (np.int16(9), np.uint8(4), np.float32(1e-3), True),
    ]:
        got = apet_kernels.compress(x, keep, num_basis=num_basis, ridge=ridge, merge=merge)
        # np.float32(1e-3) is not the float 1e-3: compare against its own value.
        ref = apet_kernels.compress(x, 9, num_basis=4, ridge=float(ridge), merge=True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    packed = x.reshape(60, 6)
    want = apet_kernels.compress_varlen(packed, [20, 40], [5, 11], num_basis=4)
    for seqlens, keep in [
        ([np.int64(20), np.int64(40)], [np.int32(5), np.int32(11)]),
        (torch.tensor([20, 40]), torch.tensor([5, 11], dtype=torch.int32)),
        (np.array([20, 40]), np.array([5, 11], dtype=np.uint16)),
        ((20, 40), (5, 11)),
    ]:
        got = apet_kernels.compress_varlen(packed, seqlens, keep, num_basis=np.int64(4))
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    one_keep = apet_kernels.compress_varlen(packed, [20, 40], np.int64(11), num_basis=4)
    ref = apet_kernels.compress_varlen(packed, [20, 40], 11, num_basis=4)
    assert all(torch.equal(a, b) for a, b in zip(one_keep, ref, strict=True))


P = torch.randn(30, 4)
BAD_VARLEN = [
    (dict(x=torch.randn(2, 15, 4)), ValueError, r"x must have shape \(T, D\)"),
    (dict(seqlens=[10, 10]), ValueError, "seqlens must sum to T = 30, got sum 20"),
    (dict(seqlens=[40, -10]), ValueError, "seqlens must be >= 0"),
    (dict(seqlens="ab"), TypeError, "seqlens must be a list of host ints"),
    (dict(keep=[3]), ValueError, "keep must have one entry per segment"),
    (
        dict(keep=[3, 21]),
        ValueError,
        r"keep\[1\] must satisfy 1 <= keep <= seqlens\[1\] = 20 .*, got 21",
    ),
    (dict(keep=[0, 3]), ValueError, r"keep\[0\]"),
    (dict(keep=0), ValueError, "keep must be >= 1, got 0"),
    (dict(keep=[2.0, 3]), TypeError, "keep must be a list of host ints"),
    (dict(seqlens=torch.tensor([10.0, 20.0])), TypeError, "seqlens must be a 1-D integer tensor"),
    (dict(seqlens=torch.tensor([[10, 20]])), TypeError, r"shape \(1, 2\)"),
    (dict(seqlens=torch.tensor([10, 20], device="meta")), TypeError, "reading it would sync"),
    (dict(keep=torch.tensor([3.0, 4.0])), TypeError, "keep must be a 1-D integer tensor"),
    (dict(seqlens=np.array([10.0, 20.0])), TypeError, "seqlens must be a list of host ints"),
    (dict(merge="no"), TypeError, "merge must be a bool, got 'no'"),
    (dict(merge=None), TypeError, "merge must be a bool, got None"),
    (dict(check_finite="no"), TypeError, "check_finite must be a bool, got 'no'"),
    (dict(num_basis=2**63), ValueError, "num_basis must satisfy .* got 9223372036854775808"),
    (dict(ridge=1e300), ValueError, "ridge must be a finite float .*, got 1e[+]300"),
]


@pytest.mark.parametrize("change,error,message", BAD_VARLEN)
def test_varlen_argument_errors(change, error, message):
    args = dict(x=P, seqlens=[10, 20], keep=[3, 4])
    args.update(change)
    x, seqlens, keep = args.pop("x"), args.pop("seqlens"), args.pop("keep")
    with pytest.raises(error, match=message):
        apet_kernels.compress_varlen(x, seqlens, keep, **args)


def test_raw_op_validates_too():
    with pytest.raises(ValueError, match="keep must satisfy"):
        torch.ops.apet.compress(X, 0)
    with pytest.raises(ValueError, match=r"keep\[0\]"):
        torch.ops.apet.compress_varlen(P, [0, 30], [1, 3])


def test_empty_batch():
    got = apet_kernels.compress(torch.randn(0, 10, 4), 3)
    assert (
        got.tokens.shape == (0, 3, 4) and got.kept.shape == (0, 3) and got.assign.shape == (0, 10)
    )
