"""SPEC.md transcribed line by line: one segment at a time, Python loops, float64.

An oracle independent of ``apet_kernels.ops.reference``: it shares no code with it and takes
the direct routes the spec states (explicit min over basis distances, the ridge rule's Cholesky
written out scalar by scalar and the residual ``||v - Bᵀα||`` rather than the norm identity, a
per-token loop for the merge).
Slow on purpose; use small shapes.
"""

from __future__ import annotations

import torch

FLT_MIN = 1.17549435e-38


def _argmax_lowest(values: list[float], allowed: list[bool]) -> int:
    best, best_i = None, -1
    for i, (value, ok) in enumerate(zip(values, allowed, strict=True)):
        if ok and (best is None or value > best):
            best, best_i = value, i
    return best_i


def fps_picks(v: torch.Tensor, m: int) -> list[int]:
    """Farthest point sampling picks in order for one segment ``v (N, D)`` float64."""
    n = v.shape[0]
    mu = v.mean(0)
    first = [float(((v[i] - mu) ** 2).sum()) for i in range(n)]
    picks = [_argmax_lowest(first, [True] * n)]
    while len(picks) < m:
        dist = [min(float(((v[i] - v[b]) ** 2).sum()) for b in picks) for i in range(n)]
        picks.append(_argmax_lowest(dist, [i not in picks for i in range(n)]))
    return picks


def ruled_solve(A: list[list[float]], c: list[float], tau: float) -> list[float]:
    """α = A⁻¹c by docs/SPEC.md's ridge rule, scalar by scalar: Cholesky in column order with
    each pivot p_k < τ replaced by τ, then forward and back substitution."""
    m = len(A)
    L = [[0.0] * m for _ in range(m)]
    for k in range(m):
        p = A[k][k] - sum(L[k][j] ** 2 for j in range(k))
        L[k][k] = (tau if p < tau else p) ** 0.5
        for i in range(k + 1, m):
            L[i][k] = (A[i][k] - sum(L[i][j] * L[k][j] for j in range(k))) / L[k][k]
    y = [0.0] * m
    for r in range(m):
        y[r] = (c[r] - sum(L[r][k] * y[k] for k in range(r))) / L[r][r]
    alpha = [0.0] * m
    for r in reversed(range(m)):
        alpha[r] = (y[r] - sum(L[k][r] * alpha[k] for k in range(r + 1, m))) / L[r][r]
    return alpha


def errors(v: torch.Tensor, basis: list[int], ridge: float) -> torch.Tensor:
    """``e_i = ||v_i - Bᵀα_i||`` with ``α_i = (G + λI)^-1 B v_i`` (by the ridge rule) for one
    segment, ``(N,)``."""
    B = v[basis]
    m = len(basis)
    G = B @ B.T
    mean_diag = float(torch.trace(G)) / m
    lam = ridge * mean_diag + FLT_MIN
    tau = max(lam, 2.0**-16 * mean_diag)
    A = (G + lam * torch.eye(m, dtype=v.dtype)).tolist()
    C = (B @ v.T).T.tolist()  # (N, m): c_i = B v_i
    alpha = torch.tensor([ruled_solve(A, c, tau) for c in C], dtype=v.dtype)  # (N, m)
    return (v - alpha @ B).norm(dim=1)


def compress_segment(
    v: torch.Tensor, keep: int, num_basis: int = 10, ridge: float = 1e-4, merge: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md steps 1-5 for one segment ``v (N, D)`` float64.

    Returns ``out (K, D)``, ``kept (K,)``, ``assign (N,)``.
    """
    n = v.shape[0]
    m = min(num_basis, keep)
    basis = fps_picks(v, m)
    kept = list(basis)
    if keep > m:
        e = errors(v, basis, ridge).tolist()
        candidates = sorted((i for i in range(n) if i not in basis), key=lambda i: (-e[i], i))
        kept += candidates[: keep - m]
    kept.sort()
    assign = [-1] * n
    for j, i in enumerate(kept):
        assign[i] = j
    members: list[list[int]] = [[i] for i in kept]
    if merge:
        for i in range(n):
            if assign[i] >= 0:
                continue
            cos = [float(v[i] @ v[k]) / max(float(v[i].norm() * v[k].norm()), 1e-12) for k in kept]
            assign[i] = _argmax_lowest(cos, [True] * len(kept))
            members[assign[i]].append(i)
    out = torch.stack([v[idx].sum(0) / len(idx) for idx in members])
    return out, torch.tensor(kept), torch.tensor(assign)


def compress_dense(
    x: torch.Tensor, keep: int, num_basis: int = 10, ridge: float = 1e-4, merge: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense op, segment by segment: ``x (S, N, D)`` -> stacked per-segment results."""
    results = [compress_segment(seg.double(), keep, num_basis, ridge, merge) for seg in x]
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))
