"""The varlen op on the torch backend: packing, global indices, zero-length segments."""

from __future__ import annotations

import pytest
import torch

import apet_kernels


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dense_equals_varlen_with_equal_lengths():
    x = gaussian(3, 40, 8, seed=0)
    dense = apet_kernels.compress(x, 12, backend="torch")
    packed = apet_kernels.compress_varlen(x.reshape(120, 8), [40] * 3, 12, backend="torch")
    assert torch.equal(packed.tokens, dense.tokens.reshape(36, 8))
    offsets = torch.tensor([0, 40, 80])[:, None]
    assert torch.equal(packed.kept, (dense.kept + offsets).reshape(-1))
    out_offsets = torch.tensor([0, 12, 24])[:, None]
    assert torch.equal(packed.assign, (dense.assign + out_offsets).reshape(-1))


@pytest.mark.parametrize("merge", [True, False])
def test_varlen_equals_each_segment_alone(merge):
    seqlens, keeps = [30, 0, 7, 1, 55, 0], [9, 0, 7, 1, 3, 0]
    x = gaussian(sum(seqlens), 6, seed=1)
    got = apet_kernels.compress_varlen(x, seqlens, keeps, merge=merge, backend="torch")
    assert got.tokens.shape == (sum(keeps), 6)
    assert got.kept.shape == (sum(keeps),) and got.assign.shape == (sum(seqlens),)
    start = out_start = 0
    for n, k in zip(seqlens, keeps, strict=True):
        if n:
            alone = apet_kernels.compress(
                x[None, start : start + n], k, merge=merge, backend="torch"
            )
            assert torch.equal(got.tokens[out_start : out_start + k], alone.tokens[0])
            assert torch.equal(got.kept[out_start : out_start + k], alone.kept[0] + start)
            want_assign = torch.where(alone.assign[0] >= 0, alone.assign[0] + out_start, -1)
            assert torch.equal(got.assign[start : start + n], want_assign)
        start, out_start = start + n, out_start + k


def test_int_keep_is_clamped_per_segment():
    seqlens = [5, 0, 40]
    x = gaussian(45, 4, seed=2)
    got = apet_kernels.compress_varlen(x, seqlens, 8, backend="torch")
    explicit = apet_kernels.compress_varlen(x, seqlens, [5, 0, 8], backend="torch")
    for a, b in zip(got, explicit, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.tokens[:5], x[:5])  # keep-all segment is untouched


def test_all_segments_empty():
    got = apet_kernels.compress_varlen(torch.zeros(0, 5), [0, 0], 3, backend="torch")
    assert got.tokens.shape == (0, 5) and got.kept.shape == (0,) and got.assign.shape == (0,)
    none = apet_kernels.compress_varlen(torch.zeros(0, 5), [], [], backend="torch")
    assert none.tokens.shape == (0, 5)


def test_varlen_non_contiguous_input():
    x = gaussian(8, 50, seed=3).T  # (50, 8), not contiguous
    got = apet_kernels.compress_varlen(x, [20, 30], [6, 9], backend="torch")
    want = apet_kernels.compress_varlen(x.contiguous(), [20, 30], [6, 9], backend="torch")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
