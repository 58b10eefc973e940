"""Helpers shared by the backend test files: inputs, the per-dtype tolerance, oracle comparison."""

from __future__ import annotations

import torch

from apet_kernels.ops import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tolerance of an op's output against the float64 oracle run on the same (rounded) input: the
# output is one rounding of an fp32 mean to the input dtype, so about one ulp of that dtype (a
# full bf16 ulp, as the Triton interpreter's fp32->bf16 cast truncates).
VALUE_TOL = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values drawn in float64 from ``seed``, then rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def assert_matches(got, want, dtype: torch.dtype) -> None:
    """Indices identical, values within the dtype's tolerance of the float64 oracle ``want``."""
    out, kept, assign = (t.cpu() for t in got)
    assert out.dtype == dtype and kept.dtype == torch.int64 and assign.dtype == torch.int64
    assert out.is_contiguous() and kept.is_contiguous() and assign.is_contiguous()
    assert torch.equal(kept, want[1]), (kept.tolist(), want[1].tolist())
    assert torch.equal(assign, want[2])
    torch.testing.assert_close(out.double(), want[0].double(), **VALUE_TOL[dtype])


def oracle_varlen(x, seqlens, keeps, num_basis=10, ridge=1e-4, merge=True):
    return reference.compress_varlen(x.double(), seqlens, keeps, num_basis, ridge, merge)


def oracle_dense(x, keep, num_basis=10, ridge=1e-4, merge=True):
    return reference.compress_dense(x.double(), keep, num_basis, ridge, merge)


def assert_valid_indices(kept, assign, seqlens, keeps):
    """SPEC.md NaN policy (varlen, global ids): per segment, kept unique, ascending and inside the
    segment; assign inside the segment's output rows (or -1)."""
    kept, assign = kept.cpu(), assign.cpu()
    tok = out = 0
    for n, k in zip(seqlens, keeps, strict=True):
        seg_kept = kept[out : out + k]
        assert torch.all(seg_kept[1:] > seg_kept[:-1])
        assert torch.all((seg_kept >= tok) & (seg_kept < tok + n))
        seg_assign = assign[tok : tok + n]
        assert torch.all((seg_assign == -1) | ((seg_assign >= out) & (seg_assign < out + k)))
        tok, out = tok + n, out + k


def spread(S: int, N: int, D: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(S, N, D)`` Gaussian tokens with per-token scales spread over [1, 10] in a random order.

    At real sizes (N in the thousands, D = 4096) plain Gaussian tokens have approximation errors
    within ~1e-4 of each other, close enough for fp32 rounding to flip a choice at the selection
    boundary; spreading the scales puts ~1e-2 relative gaps between them instead.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(S, N, generator=generator), dim=1)
    scale = 1.0 + 9.0 * order.to(torch.float64) / max(N - 1, 1)
    return (gaussian(S, N, D, seed=seed, dtype=torch.float64) * scale[..., None]).to(dtype)


def assert_consistent(got, x: torch.Tensor, want, dtype: torch.dtype) -> None:
    """Dense results at real sizes against the float64 oracle ``want``, up to cosine near-ties.

    ``kept`` must be identical. A dropped token may go to a different kept token than the oracle's
    only when the two cosine similarities agree to 1e-5 (a near-tie that fp32 rounding may
    resolve either way), and no more than 0.1% of tokens may do so. ``tokens`` must be the
    uniform mean that the backend's own ``assign`` implies, within the dtype's tolerance.
    """
    out, kept, assign = got
    dev = out.device
    assert out.dtype == dtype and kept.dtype == torch.int64 and assign.dtype == torch.int64
    assert torch.equal(kept, want[1].to(dev))
    v = x.to(dev, torch.float64)
    S, N, D = v.shape
    K = kept.shape[1]
    differ = assign != want[2].to(dev)
    assert int(differ.sum()) <= max(1, N * S // 1000), f"{int(differ.sum())} assignments differ"
    if bool(differ.any()):
        unit = torch.nn.functional.normalize(v, dim=-1)
        kept_unit = torch.gather(unit, 1, kept[..., None].expand(S, K, D))
        cos = torch.bmm(unit, kept_unit.transpose(1, 2))  # (S, N, K)
        best = cos.gather(2, want[2].to(dev)[..., None])[..., 0]
        chosen = cos.gather(2, assign.clamp_min(0)[..., None])[..., 0]
        assert bool(((best - chosen)[differ] <= 1e-5).all())
    rows = (assign + torch.arange(S, device=dev)[:, None] * K).reshape(-1)
    sums = torch.zeros(S * K, D, dtype=torch.float64, device=dev).index_add_(
        0, rows, v.reshape(-1, D)
    )
    counts = torch.bincount(rows, minlength=S * K).to(torch.float64)
    implied = (sums / counts[:, None]).view(S, K, D)
    torch.testing.assert_close(out.double(), implied, **VALUE_TOL[dtype])


def rank_deficient(
    n_span: int = 48, n_off: int = 8, D: int = 16, rank: int = 3, seed: int = 0
) -> torch.Tensor:
    """``(n_span + n_off, D)`` float64 tokens for the ridge = 0 rule (SPEC.md, docs/SPEC.md).

    ``n_span`` tokens of norm ~10 lie in a ``rank``-dim subspace (the second half duplicates the
    first), ``n_off`` tokens sit off it by 0.3..3 along distinct orthogonal directions, shuffled.
    FPS with num_basis > rank draws a basis whose Gram matrix is singular, so at ridge = 0 the
    pivot rule decides whether the errors stay finite, and the off-span tokens' errors stand well
    clear of rounding noise (the kept set is not decided by rounding).
    """
    generator = torch.Generator().manual_seed(seed)
    randn = dict(generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(D, D, **randn))[0]
    inside = (torch.randn(n_span, rank, **randn) * 10) @ q[:, :rank].T
    inside[n_span // 2 :] = inside[: n_span - n_span // 2]
    size = torch.linspace(0.3, 3.0, n_off, dtype=torch.float64)
    away = q[:, rank + torch.arange(n_off) % (D - rank)].T  # (n_off, D) unit, orthogonal to span
    off = torch.randn(n_off, rank, **randn) @ q[:, :rank].T + size[:, None] * away
    x = torch.cat([inside, off])
    return x[torch.randperm(len(x), generator=generator)]
