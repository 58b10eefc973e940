"""Correctness checks of the GPU plan: a backend against the float64 oracle, batch against single,
eager against CUDA-graph replay. Each returns a record of figures and a verdict; none raises on a
wrong result (the plan goes on and reports it).

The oracle is the torch backend in float64 on the same device and the same (rounded) input.
A result passes when, as in ``tests/backend_checks.assert_consistent``:
``kept`` is identical; a dropped token goes to another kept token than the oracle's only on a
cosine near-tie (the two similarities within ``COS_TIE``), for at most 0.1% of tokens; ``tokens``
equal the uniform means that the backend's own ``assign`` implies, within two ulps of the dtype
(the output is one rounding of an fp32 mean; bf16 casts may truncate); every value is finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import apet_kernels

COS_TIE = 1e-5
MAX_TIE_FRACTION = 1e-3

Flat = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens (R, D), kept (R,), assign (T,)


def value_tol(dtype: torch.dtype) -> float:
    """Two ulps of ``dtype`` at 1 (fp16 2e-3, bf16 1.6e-2), at least 1e-5 (fp32)."""
    return max(2 * torch.finfo(dtype).eps, 1e-5)


def spread_input(S: int, N: int, D: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """``(S, N, D)`` Gaussian tokens with per-token scales spread over [1, 10] in random order:
    ~1e-2 relative gaps between approximation errors, so fp32 rounding cannot flip a selection
    (plain Gaussian tokens at D = 4096 have errors within ~1e-4 of each other)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(S, N, D, generator=gen, device=device, dtype=torch.float32)
    order = torch.argsort(torch.rand(S, N, generator=gen, device=device), dim=1).float()
    return (x * (1 + 9 * order / max(N - 1, 1))[..., None]).to(dtype)


def tie_input(S: int, N: int, D: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """``(S, N, D)`` tokens drawn from 24 distinct rows of small integers per segment, each
    repeated and a few scaled by 2: exact distance ties in FPS, exact cosine ties in the merge,
    near-ties everywhere. The data on which a reduction order would show."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randint(-2, 3, (S, 24, D), generator=gen, device=device).float()
    pick = torch.randint(0, 24, (S, N), generator=gen, device=device)
    scale = 1 + (torch.rand(S, N, generator=gen, device=device) < 0.1).float()
    x = torch.gather(rows, 1, pick[..., None].expand(S, N, D)) * scale[..., None]
    return x.to(dtype)


def flatten_dense(out: torch.Tensor, kept: torch.Tensor, assign: torch.Tensor) -> Flat:
    """Dense ``(S, K, D), (S, K), (S, N)`` local indices -> packed global rows (varlen form)."""
    S, N = assign.shape
    K = kept.shape[1]
    seg = torch.arange(S, device=kept.device)[:, None]
    glob_assign = torch.where(assign >= 0, assign + seg * K, assign)
    return out.reshape(S * K, -1), (kept + seg * N).reshape(-1), glob_assign.reshape(-1)


def compare(x: torch.Tensor, got: Flat, want: Flat) -> dict:
    """Figures and verdict of ``got`` against the oracle ``want`` on packed ``x (T, D)``."""
    out, kept, assign = got
    problems = []
    kept_equal = bool(torch.equal(kept, want[1].to(kept.device)))
    if not kept_equal:
        problems.append("kept differs")
    v = x.to(kept.device, torch.float64)
    finite = bool(torch.isfinite(out).all())
    if not finite:
        problems.append("non-finite tokens")
    valid = (assign >= 0) & (assign < out.shape[0])
    if not bool(valid.all()):
        problems.append(f"{int((~valid).sum())} assign out of range")
        return _record(problems, kept_equal, None, None, None, None)
    differ = assign != want[2].to(assign.device)
    diffs = int(differ.sum())
    gap = 0.0
    if diffs and kept_equal:
        unit = F.normalize(v, dim=-1)
        target = unit[kept]  # (R, D): the kept token behind each output row

        def cos(rows: torch.Tensor) -> torch.Tensor:
            return (unit * target[rows]).sum(-1)

        gap = float((cos(want[2].to(assign.device)) - cos(assign))[differ].max())
        if gap > COS_TIE:
            problems.append(f"assignment off by cosine {gap:.3g} (> {COS_TIE})")
    if diffs > max(1, int(MAX_TIE_FRACTION * assign.numel())):
        problems.append(f"{diffs} of {assign.numel()} assignments differ")
    sums = torch.zeros(out.shape[0], v.shape[1], dtype=torch.float64, device=v.device)
    sums.index_add_(0, assign, v)
    counts = torch.bincount(assign, minlength=out.shape[0]).to(torch.float64)
    implied = sums / counts.clamp_min(1)[:, None]
    err = (out.double() - implied).abs()
    tol = value_tol(out.dtype)
    implied_err = float((err / (tol + tol * implied.abs())).max()) if err.numel() else 0.0
    if implied_err > 1:
        problems.append(f"tokens off their implied means by {implied_err:.3g} x tolerance")
    ref = want[0].to(out.device).double()
    rel = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)) if ref.numel() else 0.0
    return _record(problems, kept_equal, diffs, gap, implied_err, rel)


def _record(problems, kept_equal, diffs, gap, implied_err, rel) -> dict:
    return dict(
        ok=not problems,
        problems=problems or None,
        kept_equal=kept_equal,
        assign_diffs=diffs,
        max_cos_gap=gap,
        implied_err_over_tol=implied_err,
        rel_err=rel,
    )


def bitwise(a: Flat, b: Flat) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def dense_vs_oracle(x: torch.Tensor, keep: int, backend: str) -> tuple[dict, Flat]:
    """The dense op on ``x (S, N, D)`` against the oracle, plus a second call that must be
    bitwise identical (determinism). Returns the record and the flat result."""
    got = flatten_dense(*apet_kernels.compress(x, keep, backend=backend))
    again = flatten_dense(*apet_kernels.compress(x, keep, backend=backend))
    want = flatten_dense(*apet_kernels.compress(x.double(), keep, backend="torch"))
    record = compare(x.reshape(-1, x.shape[-1]), got, want)
    record["deterministic"] = bitwise(got, again)
    if not record["deterministic"]:
        record["ok"] = False
        record["problems"] = (record["problems"] or []) + ["second call differs"]
    return record, got


def varlen_vs_oracle(
    x: torch.Tensor, seqlens: list[int], keeps: list[int], backend: str
) -> tuple[dict, Flat]:
    """The varlen op on packed ``x (T, D)`` against the oracle."""
    got = tuple(apet_kernels.compress_varlen(x, seqlens, keeps, backend=backend))
    want = tuple(apet_kernels.compress_varlen(x.double(), seqlens, keeps, backend="torch"))
    return compare(x, got, want), got


def batch_vs_single(x: torch.Tensor, keep: int, backend: str) -> dict:
    """Segment s of a batch call equals the call on segment s alone, bitwise, dense and varlen
    (and varlen with the segments in reverse order)."""
    S, N, D = x.shape
    batch = apet_kernels.compress(x, keep, backend=backend)
    dense_bad, varlen_bad = [], []
    packed_rev = torch.flip(x, dims=[0]).reshape(S * N, D)
    rev = apet_kernels.compress_varlen(packed_rev, [N] * S, [keep] * S, backend=backend)
    for s in range(S):
        single = apet_kernels.compress(x[s : s + 1].contiguous(), keep, backend=backend)
        same = (
            torch.equal(batch.tokens[s], single.tokens[0])
            and torch.equal(batch.kept[s], single.kept[0])
            and torch.equal(batch.assign[s], single.assign[0])
        )
        if not same:
            dense_bad.append(s)
        r = S - 1 - s  # segment s sits at position r of the reversed pack
        rows = slice(r * keep, (r + 1) * keep)
        same_v = (
            torch.equal(rev.tokens[rows], single.tokens[0])
            and torch.equal(rev.kept[rows] - r * N, single.kept[0])
            and torch.equal(rev.assign[r * N : (r + 1) * N] - r * keep, single.assign[0])
        )
        if not same_v:
            varlen_bad.append(s)
    problems = []
    if dense_bad:
        problems.append(f"dense batch differs from single at segments {dense_bad}")
    if varlen_bad:
        problems.append(f"reversed varlen differs from single at segments {varlen_bad}")
    return dict(ok=not problems, problems=problems or None)


def graph_capture(call: Callable[[], Flat], refill: Callable[[], None]) -> dict:
    """Capture ``call`` in a CUDA graph after an eager warm-up at the same shapes; the replay must
    equal the eager result bitwise, and after ``refill()`` (new data in the same input buffer) a
    replay must equal a fresh eager call."""
    eager = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = call()
    except Exception as exc:  # capture failure is a finding, not a crash
        torch.cuda.synchronize()
        return dict(ok=False, problems=[f"capture failed: {type(exc).__name__}: {exc}"[:300]])
    graph.replay()
    torch.cuda.synchronize()
    problems = [] if bitwise(eager, captured) else ["replay differs from eager"]
    refill()
    graph.replay()
    torch.cuda.synchronize()
    if not bitwise(call(), captured):
        problems.append("replay on new data differs from eager")
    return dict(ok=not problems, problems=problems or None)
