"""The Python wrappers: keep_count, argument errors that name the argument, backends()."""

from __future__ import annotations

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
    ],
)
def test_keep_count(n, ratio, want):
    assert keep_count(n, ratio) == want


@pytest.mark.parametrize("n,ratio", [(-1, 0.5), (3.0, 0.5), (5, float("nan")), (5, -0.1)])
def test_keep_count_rejects(n, ratio):
    with pytest.raises(ValueError):
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
    (dict(num_basis=0), ValueError, "num_basis must be >= 1, got 0"),
    (dict(ridge=-1e-3), ValueError, "ridge must be a finite float >= 0, got -0.001"),
    (dict(ridge=float("nan")), ValueError, "ridge must be a finite float"),
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
]


@pytest.mark.parametrize("change,error,message", BAD_VARLEN)
def test_varlen_argument_errors(change, error, message):
    args = dict(x=P, seqlens=[10, 20], keep=[3, 4])
    args.update(change)
    with pytest.raises(error, match=message):
        apet_kernels.compress_varlen(args["x"], args["seqlens"], args["keep"])


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
