"""apply_selection: the op's kept/assign applied to another tensor (Qwen3-VL's DeepStack planes).

Compared with the torch backend's own merged tokens (bitwise), with an independent float64 loop
(the SPEC's uniform mean per slot), and with keep-all / merge=False identities."""

from __future__ import annotations

import pytest
import torch

import apet_kernels as A


def _loop_reference(x: torch.Tensor, kept: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """out_j = mean of x[t] over assign[t] == j, in float64, one slot at a time."""
    out = []
    for j, k in enumerate(kept.tolist()):
        members = (assign == j).nonzero().flatten()
        rows = x[members].double() if members.numel() else x[k : k + 1].double()
        out.append(rows.mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
def test_equals_the_ops_merged_tokens_bitwise(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(700, 64, generator=g)
        seqlens, keep = [300, 0, 256, 144], [40, 0, 64, 144]
        c = A.compress_varlen(x, seqlens, keep, backend="torch")
        assert torch.equal(A.apply_selection(x, c.kept, c.assign), c.tokens)
        d = A.compress(x[:576].view(2, 288, 64), 50, backend="torch")
        assert torch.equal(A.apply_selection(x[:576].view(2, 288, 64), d.kept, d.assign), d.tokens)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_planes_follow_the_groups(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 32, generator=g)
    plane = torch.randn(400, 48, generator=g).to(dtype)  # another width, another dtype
    c = A.compress_varlen(x, [250, 150], [30, 20], backend="torch")
    got = A.apply_selection(plane, c.kept, c.assign)
    assert got.dtype == dtype and got.shape == (50, 48)
    want = _loop_reference(plane, c.kept, c.assign)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # negative control: the groups of another compression give other planes
    other = A.compress_varlen(x.flip(0), [250, 150], [30, 20], backend="torch")
    assert not torch.allclose(A.apply_selection(plane, other.kept, other.assign).double(), want)


def test_keep_all_and_no_merge_are_exact_copies():
    x = torch.randn(2, 40, 16)
    plane = torch.randn(2, 40, 8)
    plane[0, 3, 1] = -0.0
    c = A.compress(x, 40, backend="torch")
    out = A.apply_selection(plane, c.kept, c.assign)
    assert torch.equal(out, plane) and torch.signbit(out[0, 3, 1])
    c = A.compress(x, 10, merge=False, backend="torch")
    want = torch.gather(plane, 1, c.kept[..., None].expand(-1, -1, 8))
    assert torch.equal(A.apply_selection(plane, c.kept, c.assign), want)


def test_bad_arguments_name_themselves():
    x = torch.randn(10, 4)
    c = A.compress_varlen(x, [10], [3], backend="torch")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        A.apply_selection(x.numpy(), c.kept, c.assign)
    with pytest.raises(ValueError, match="kept must be an int64"):
        A.apply_selection(x, c.kept.int(), c.assign)
    with pytest.raises(ValueError, match="assign must have one entry per token"):
        A.apply_selection(x[:9], c.kept, c.assign[:9].clone()[:8])
    with pytest.raises(TypeError, match="floating"):
        A.apply_selection(x.long(), c.kept, c.assign)
