"""The torch backend against SPEC.md: an independent transcription, each rule, and invariances."""

from __future__ import annotations

import backend_checks
import pytest
import spec_transcription as spec
import torch
from backend_checks import VALUE_TOL

import apet_kernels
from apet_kernels.ops import reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return backend_checks.gaussian(*shape, seed=seed, dtype=dtype)


def run(x: torch.Tensor, keep: int, **kwargs) -> apet_kernels.Compressed:
    return apet_kernels.compress(x, keep, backend="torch", **kwargs)


@pytest.mark.parametrize(
    "S,N,D,K,M",
    [
        (2, 40, 8, 12, 5),
        (1, 33, 16, 3, 10),
        (3, 25, 6, 25, 4),
        (1, 50, 4, 20, 3),
        (2, 17, 5, 1, 10),
    ],
)
@pytest.mark.parametrize("merge", [True, False])
def test_matches_spec_transcription(S, N, D, K, M, merge):
    x = gaussian(S, N, D, seed=N + K)
    want = spec.compress_dense(x, K, M, 1e-4, merge)
    got = run(x, K, num_basis=M, merge=merge)
    assert torch.equal(got.kept, want[1])
    assert torch.equal(got.assign, want[2])
    torch.testing.assert_close(got.tokens, want[0], atol=1e-12, rtol=1e-12)


def test_fps_order_and_lowest_index_ties():
    # Four points on the unit circle: every distance to the mean ties (pick 0), the opposite point
    # is farthest (pick 1), then points 2 and 3 tie at squared distance 2 (pick 2).
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    basis, sqnorm, dots = reference.fps(x[None], valid, 4)
    assert basis.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(sqnorm, torch.ones(1, 4, dtype=torch.float64))
    torch.testing.assert_close(dots[0], x @ x[[0, 1, 2, 3]].T)
    assert run(x[None], 3).kept.tolist() == [[0, 1, 2]]
    assert run(x[None], 1).kept.tolist() == [[0]]


def test_first_pick_is_farthest_from_mean():
    x = gaussian(1, 30, 5, seed=3)
    x[0, 17] *= 10.0
    assert run(x, 1).kept.tolist() == [[17]]


def test_ridge_formula_is_relative_to_trace():
    v = gaussian(12, 6, seed=4)
    basis = spec.fps_picks(v, 3)
    ridge = 0.3  # large, so the λ term visibly changes the errors
    valid = torch.ones(1, 12, dtype=torch.bool)
    b, sqnorm, dots = reference.fps(v[None], valid, 3)
    assert b[0].tolist() == basis
    err2 = reference.residual(sqnorm, dots, b, torch.tensor([3]), ridge)
    torch.testing.assert_close(err2[0].sqrt(), spec.errors(v, basis, ridge), atol=1e-10, rtol=1e-9)
    # A different λ gives different errors: the formula is really exercised.
    assert not torch.allclose(spec.errors(v, basis, ridge), spec.errors(v, basis, 1e-6))


def test_scaling_keeps_selection():
    x = gaussian(2, 60, 12, seed=5)
    want = run(x, 20)
    for scale in (3.7, 1e-3, 250.0):
        got = run(x * scale, 20)
        assert torch.equal(got.kept, want.kept)
        assert torch.equal(got.assign, want.assign)


def test_kept_is_basis_plus_largest_errors_ascending():
    x = gaussian(1, 64, 10, seed=6)
    K, M = 24, 6
    got = run(x, K, num_basis=M)
    kept = got.kept[0].tolist()
    assert kept == sorted(set(kept)) and len(kept) == K
    basis = spec.fps_picks(x[0], M)
    assert set(basis) <= set(kept)
    e = spec.errors(x[0], basis, 1e-4)
    rest = [i for i in range(64) if i not in basis]
    kept_rest = [i for i in rest if i in kept]
    dropped = [i for i in rest if i not in kept]
    assert min(e[kept_rest]) > max(e[dropped])


def test_merge_assignment_and_uniform_mean():
    x = gaussian(2, 50, 7, seed=7)
    got = run(x, 9)
    for s in range(2):
        v, kept, assign = x[s], got.kept[s], got.assign[s]
        assert torch.equal(assign[kept], torch.arange(9))
        cos = (
            torch.nn.functional.normalize(v, dim=1)
            @ torch.nn.functional.normalize(v[kept], dim=1).T
        )
        dropped = torch.ones(50, dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(assign[dropped], cos[dropped].argmax(1))
        for j in range(9):
            members = (assign == j).nonzero()[:, 0]
            torch.testing.assert_close(got.tokens[s, j], v[members].mean(0))


def test_no_merge_returns_kept_rows_and_minus_one():
    x = gaussian(2, 40, 6, seed=8, dtype=torch.float32)
    got = run(x, 11, merge=False)
    assert torch.equal(got.tokens, torch.gather(x, 1, got.kept[..., None].expand(2, 11, 6)))
    dropped = torch.ones(2, 40, dtype=torch.bool).scatter_(1, got.kept, False)
    assert (got.assign[dropped] == -1).all()
    assert torch.equal(got.assign.gather(1, got.kept), torch.arange(11).expand(2, 11))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("merge", [True, False])
def test_keep_all_is_bitwise_identity(dtype, merge):
    x = gaussian(3, 21, 9, seed=9, dtype=dtype)
    got = run(x, 21, merge=merge)
    assert torch.equal(got.tokens, x)
    assert torch.equal(got.kept, torch.arange(21).expand(3, 21))
    assert torch.equal(got.assign, torch.arange(21).expand(3, 21))


@pytest.mark.parametrize("K", [1, 4, 10])
def test_keep_at_most_num_basis_is_sorted_fps_prefix(K):
    x = gaussian(2, 30, 5, seed=10)
    got = run(x, K, num_basis=10)
    for s in range(2):
        assert got.kept[s].tolist() == sorted(spec.fps_picks(x[s], K))


def test_single_token_segments():
    x = gaussian(4, 1, 7, seed=11, dtype=torch.float32)
    got = run(x, 1)
    assert torch.equal(got.tokens, x)
    assert got.kept.tolist() == [[0]] * 4 and got.assign.tolist() == [[0]] * 4


def test_duplicate_tokens_follow_lowest_index():
    x = torch.ones(1, 12, 4, dtype=torch.float32)
    got = run(x, 5)
    assert torch.isfinite(got.tokens).all()
    assert got.kept.tolist() == [[0, 1, 2, 3, 4]]
    torch.testing.assert_close(got.tokens, torch.ones(1, 5, 4))
    assert got.assign[0, 5:].tolist() == [0] * 7  # all cosines tie: lowest slot


def test_all_zero_tokens_and_rank_deficient_basis():
    zeros = torch.zeros(2, 16, 8)
    got = run(zeros, 12)
    assert torch.equal(got.tokens, torch.zeros(2, 12, 8))
    assert got.kept.tolist() == [list(range(12))] * 2
    # 30 tokens in a 2-D subspace of R^16 with 10 basis tokens: a singular Gram matrix.
    low_rank = gaussian(1, 30, 2, seed=12) @ gaussian(2, 16, seed=13)
    got = run(low_rank, 15)
    assert torch.isfinite(got.tokens).all()
    assert got.kept[0].unique().numel() == 15


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["one", "row", "all"])
def test_non_finite_input_keeps_indices_valid(bad, where):
    x = gaussian(2, 40, 6, seed=14, dtype=torch.float32)
    if where == "one":
        x[0, 3, 2] = bad
    elif where == "row":
        x[1, 7] = bad
    else:
        x[:] = bad
    for merge in (True, False):
        got = run(x, 13, merge=merge)
        for s in range(2):
            kept = got.kept[s]
            assert kept.unique().numel() == 13 and torch.equal(kept, kept.sort().values)
            assert 0 <= kept.min() and kept.max() < 40
            assert -1 <= got.assign[s].min() and got.assign[s].max() < 13
            assert torch.equal(got.assign[s][kept], torch.arange(13))
    with pytest.raises(ValueError, match="NaN or Inf"):
        apet_kernels.compress(x, 13, backend="torch", check_finite=True)


def test_deterministic_run_to_run():
    x = gaussian(4, 300, 32, seed=15, dtype=torch.float32)
    first, second = run(x, 50), run(x, 50)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_permutation_equivariance():
    x = gaussian(1, 80, 9, seed=16)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(0))
    base, permuted = run(x, 25), run(x[:, perm], 25)
    # Token perm[i] of x sits at position i of the permuted input.
    assert torch.equal(perm[permuted.kept[0]].sort().values, base.kept[0])
    order = perm[permuted.kept[0]].argsort()
    torch.testing.assert_close(permuted.tokens[0, order], base.tokens[0])
    slot_map = torch.empty(25, dtype=torch.long)
    slot_map[order] = torch.arange(25)
    assert torch.equal(slot_map[permuted.assign[0]], base.assign[0, perm])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:3])
def test_low_precision_matches_float64_oracle(dtype):
    x = gaussian(2, 577, 64, seed=17, dtype=dtype)
    got = run(x, 96)
    want = reference.compress_dense(x.double(), 96, 10, 1e-4, True)
    assert got.tokens.dtype == dtype
    assert torch.equal(got.kept, want[1])
    assert torch.equal(got.assign, want[2])
    torch.testing.assert_close(got.tokens, want[0].to(dtype), **VALUE_TOL[dtype])


def test_non_contiguous_input():
    base = gaussian(40, 3, 8, seed=18, dtype=torch.float32)
    x = base.transpose(0, 1)  # (3, 40, 8), not contiguous
    assert not x.is_contiguous()
    got, want = run(x, 12), run(x.contiguous(), 12)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    sliced = gaussian(2, 30, 20, seed=19)[:, ::2, 3:17]
    torch.testing.assert_close(run(sliced, 7).tokens, run(sliced.contiguous(), 7).tokens)


@pytest.mark.parametrize(
    "N,D,K",
    [(577, 1024, 96), (729, 1152, 64), pytest.param(2880, 4096, 32, marks=pytest.mark.slow)],
)
def test_real_model_shapes(N, D, K):
    x = gaussian(1, N, D, seed=N, dtype=torch.float32)
    got = run(x, K)
    want = reference.compress_dense(x.double(), K, 10, 1e-4, True)
    assert got.tokens.shape == (1, K, D) and got.assign.shape == (1, N)
    assert torch.equal(got.kept, want[1])
    assert torch.equal(got.assign, want[2])
    torch.testing.assert_close(got.tokens, want[0].float(), **VALUE_TOL[torch.float32])


def test_real_size_consistency_check_accepts_float32_and_rejects_a_wrong_assignment():
    # The GPU suite's comparison (tests/ops/test_gpu.py) exercised on CPU: the float32 torch
    # backend passes it against the float64 oracle, and a corrupted assignment fails it.
    x = backend_checks.spread(2, 700, 256, seed=21, dtype=torch.float32)
    want = tuple(run(x.double(), 70))
    out, kept, assign = run(x, 70)
    backend_checks.assert_consistent((out, kept, assign), x, want, torch.float32)
    victim = int(torch.nonzero(~torch.isin(torch.arange(700), kept[0]))[0])  # a dropped token
    wrong = assign.clone()
    wrong[0, victim] = (wrong[0, victim] + 1) % 70
    with pytest.raises(AssertionError):
        backend_checks.assert_consistent((out, kept, wrong), x, want, torch.float32)
