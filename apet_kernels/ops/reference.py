"""The torch backend: the readable oracle of SPEC.md and the CPU implementation in one.

Every stage is vectorized over a padded batch of segments ``(S, N, D)``: the only Python loop is
over the ``m <= num_basis`` farthest-point-sampling steps. Ragged (varlen) input is padded to the
longest segment; a validity mask keeps padding out of every argmax, sort and sum.

Stages, named the same in every backend:
    ``fps``      basis indices + per-token squared norms + dot products with the basis (c_i, G)
    ``residual`` ridge-regularized Gram solve and the per-token approximation error e_i^2
    ``select``   kept = basis ∪ top-(K - m) errors, in ascending index order
    ``merge``    cosine argmax assignment of dropped tokens and the uniform scatter-mean

Accumulation is float32 for half/bfloat16/float32 input and float64 for float64 input.

NaN/Inf policy (SPEC.md leaves values unspecified then, but indices must stay unique and in range):
every score that is NaN ranks as ``+inf`` in FPS and selection and as ``-inf`` in the merge
argmax, so no argmax can land on padding or on an already chosen token.
"""

from __future__ import annotations

import torch

from .upload import upload

FLT_MIN = 1.17549435e-38
COS_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (SPEC.md, Inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nan_as(t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, value), t)


# Below this many elements (S·N·D) the (S, N, D) difference fits in cache and a fused
# subtract-then-norm is fastest; above it cdist's non-matmul mode, which never materializes the
# difference, wins. One CPU thread, ms per FPS step: 1x576x1024 0.11 vs 0.47 (cdist);
# 1x1024x3584 2.2 vs 3.1; 8x256x4096 22.1 vs 7.2; 32x576x1024 58.7 vs 15.3.
_CDIST_MIN_ELEMENTS = 4 * 2**20


def _distance(v: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``(S, N)`` L2 distances of ``v (S, N, D)`` to ``point (S, D)`` as direct differences (not
    ||v||^2 + ||p||^2 - 2 v·p): exact zeros for duplicates, no cancellation. FPS ranks by these
    distances; the square root is monotone, so the argmax is that of the squared distances
    SPEC.md names."""
    if v.numel() < _CDIST_MIN_ELEMENTS:
        return torch.linalg.vector_norm(v - point[:, None, :], dim=-1)
    return torch.cdist(v, point[:, None, :], compute_mode="donot_use_mm_for_euclid_dist")[..., 0]


def fps(
    v: torch.Tensor, valid: torch.Tensor, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Farthest point sampling, per segment, deterministic (lowest index wins ties).

    Args:
        v: ``(S, N, D)`` tokens in the accumulation dtype.
        valid: ``(S, N)`` bool, False on padding.
        num_steps: m_max, the number of basis tokens to draw (callers ignore steps past a
            segment's own m_s; every segment has at least m_max valid tokens or is masked out).

    Returns:
        basis: ``(S, m_max)`` int64 token indices in pick order.
        sqnorm: ``(S, N)`` ||v_i||^2.
        dots: ``(S, N, m_max)`` v_i · v_{b_t}: the c_i of the solve, and G at the basis rows.
    """
    S, N, _ = v.shape
    validf = valid.to(v.dtype)
    count = validf.sum(1).clamp_min(1.0)
    mean = torch.bmm(validf[:, None, :], v)[:, 0] / count[:, None]
    neg_inf = torch.full((), float("-inf"), dtype=v.dtype, device=v.device)

    def next_pick(score: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        score = torch.where(valid & ~chosen, _nan_as(score, float("inf")), neg_inf)
        return score.argmax(1)  # first maximal index: the lowest-index tie-break

    basis = torch.zeros(S, num_steps, dtype=torch.long, device=v.device)
    chosen = torch.zeros(S, N, dtype=torch.bool, device=v.device)
    dist = _distance(v, mean)  # step 1 scores: distance to the mean
    rows = torch.arange(S, device=v.device)
    for t in range(num_steps):
        pick = next_pick(dist, chosen)
        basis[:, t] = pick
        chosen[rows, pick] = True
        if t + 1 < num_steps:  # the last pick needs no distance update
            d_new = _distance(v, v[rows, pick])
            dist = d_new if t == 0 else torch.minimum(dist, d_new)
    # c_i and G for the solve: one GEMM against all basis rows after the loop, not a pass per step.
    basis_rows = torch.gather(v, 1, basis[:, :, None].expand(S, num_steps, v.shape[2]))
    dots = torch.bmm(v, basis_rows.transpose(1, 2))
    sqnorm = (v * v).sum(-1)
    return basis, sqnorm, dots


def residual(
    sqnorm: torch.Tensor,
    dots: torch.Tensor,
    basis: torch.Tensor,
    num_basis: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """Squared approximation error of every token from its segment's basis.

    e_i^2 = ||v_i||^2 - c_iᵀα_i - λ||α_i||^2 (clamped at 0), α_i = (G + λI)^-1 c_i,
    λ = ridge · trace(G)/m + FLT_MIN. Segments with m_s < m_max pad G with an identity block
    and c with zeros, so the padded coordinates solve to α = 0 and change nothing.

    Args:
        sqnorm: ``(S, N)``; dots: ``(S, N, m_max)``; basis: ``(S, m_max)`` int64.
        num_basis: ``(S,)`` int64 m_s per segment (1 <= m_s <= m_max).
        ridge: relative ridge (>= 0).

    Returns:
        ``(S, N)`` e_i^2 in the accumulation dtype.
    """
    S, N, m = dots.shape
    slot_valid = torch.arange(m, device=dots.device)[None, :] < num_basis[:, None]  # (S, m)
    pair_valid = slot_valid[:, :, None] & slot_valid[:, None, :]
    gram = torch.gather(dots, 1, basis[:, :, None].expand(S, m, m))  # (S, m, m), row t = b_t
    gram = 0.5 * (gram + gram.transpose(1, 2))
    gram = torch.where(pair_valid, gram, torch.zeros_like(gram))
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).sum(-1) / num_basis.to(gram.dtype) + FLT_MIN
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    diag_add = torch.where(slot_valid, lam[:, None], torch.ones_like(lam)[:, None])
    system = gram + eye * diag_add[:, :, None]
    c = torch.where(slot_valid[:, None, :], dots, torch.zeros_like(dots))  # (S, N, m)
    chol, _ = torch.linalg.cholesky_ex(system)  # no error on NaN: values unspecified then
    alpha = torch.cholesky_solve(c.transpose(1, 2), chol).transpose(1, 2)  # (S, N, m)
    err2 = sqnorm - (c * alpha).sum(-1) - lam[:, None] * (alpha * alpha).sum(-1)
    return err2.clamp_min(0.0)


def select(
    err2: torch.Tensor | None,
    basis: torch.Tensor,
    num_basis: torch.Tensor,
    valid: torch.Tensor,
    keeps: torch.Tensor,
    max_keep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kept = basis ∪ the (K - m) largest-error non-basis tokens, ascending.

    Args:
        err2: ``(S, N)`` errors, or None when no segment has K > m.
        basis: ``(S, m_max)`` int64; num_basis: ``(S,)`` m_s.
        valid: ``(S, N)`` bool; keeps: ``(S,)`` int64 K_s.
        max_keep: K_max (host int), the width of the output.

    Returns:
        kept: ``(S, K_max)`` int64 ascending; slots >= K_s are unspecified (padding).
        keep_mask: ``(S, N)`` bool, exactly K_s True per segment.
    """
    S, N = valid.shape
    m = basis.shape[1]
    slot_valid = torch.arange(m, device=basis.device)[None, :] < num_basis[:, None]
    # Slots past m_s may repeat indices (short segments run out of tokens), so reduce with
    # "amax" rather than a plain scatter whose winner among duplicates is unspecified.
    is_basis = torch.zeros(S, N, dtype=torch.uint8, device=valid.device)
    is_basis = is_basis.scatter_reduce_(1, basis, slot_valid.to(torch.uint8), "amax").bool()
    keep_mask = is_basis.clone()
    if err2 is not None:
        extra = (keeps - num_basis).clamp_min(0)  # (S,)
        score = torch.where(valid & ~is_basis, _nan_as(err2, float("inf")), float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        ranked = torch.arange(N, device=valid.device)[None, :] < extra[:, None]
        keep_mask |= torch.zeros_like(keep_mask).scatter_(1, order, ranked)
    # Stable sort of "not kept" lists the kept indices first, in ascending order.
    kept = torch.sort((~keep_mask).to(torch.uint8), dim=1, stable=True).indices[:, :max_keep]
    return kept, keep_mask


def merge(
    v: torch.Tensor,
    valid: torch.Tensor,
    kept: torch.Tensor,
    keep_mask: torch.Tensor,
    keeps: torch.Tensor,
    do_merge: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each dropped token to its most cosine-similar kept token and take uniform means.

    The similarity is one batched GEMM ``(S, N, K)`` of raw rows divided by the clamped norm
    product, then an argmax: the ``(N-K) x K x D`` broadcast of the paper's code never exists.
    The mean is an index_put_ accumulate over token order (serial on CPU, sort-based on CUDA),
    so the result is bitwise reproducible.

    Args:
        v: ``(S, N, D)`` accumulation dtype; valid, keep_mask: ``(S, N)`` bool.
        kept: ``(S, K_max)`` int64; keeps: ``(S,)`` int64 K_s.
        do_merge: False keeps the kept tokens unchanged and sets dropped assign to -1.

    Returns:
        out: ``(S, K_max, D)`` accumulation dtype; assign: ``(S, N)`` int64 local slots.
    """
    S, N, D = v.shape
    K = kept.shape[1]
    w = torch.gather(v, 1, kept[:, :, None].expand(S, K, D))
    own_slot = torch.cumsum(keep_mask, dim=1) - 1  # slot of each kept token
    if not do_merge:
        return w, torch.where(keep_mask, own_slot, torch.full_like(own_slot, -1))
    slot_valid = torch.arange(K, device=v.device)[None, :] < keeps[:, None]  # (S, K)
    vnorm = v.norm(dim=-1)
    wnorm = torch.gather(vnorm, 1, kept)
    sim = torch.bmm(v, w.transpose(1, 2))
    sim = sim / (vnorm[:, :, None] * wnorm[:, None, :]).clamp_min(COS_EPS)
    sim = torch.where(slot_valid[:, None, :], _nan_as(sim, float("-inf")), float("-inf"))
    nearest = sim.argmax(-1)  # first maximal slot: the lowest-slot tie-break
    assign = torch.where(keep_mask, own_slot, nearest)
    # Every token, kept ones included, adds itself to its slot: sum = v_kept + Σ dropped and
    # count = 1 + n_j. Padding goes to a spare row per segment that is dropped afterwards.
    target = torch.where(valid, assign, torch.full_like(assign, K))
    flat = (target + torch.arange(S, device=v.device)[:, None] * (K + 1)).reshape(-1)
    sums = v.new_zeros(S * (K + 1), D).index_put_((flat,), v.reshape(S * N, D), accumulate=True)
    counts = v.new_zeros(S * (K + 1)).index_put_((flat,), v.new_ones(S * N), accumulate=True)
    out = (sums / counts.clamp_min(1.0)[:, None]).view(S, K + 1, D)[:, :K]
    return out, assign


def _segment_ints(
    lengths: list[int], keeps: list[int], m_host: list[int], device: torch.device
) -> list[torch.Tensor]:
    """``(S,)`` int64 N_s, K_s, m_s on ``device``. Equal values (every dense call) are filled on
    the device rather than copied from the host, so the dense op can be captured in a CUDA
    graph; ragged ones go up in one asynchronous copy."""
    columns = (lengths, keeps, m_host)
    if all(all(v == col[0] for v in col) for col in columns if col):
        S = len(lengths)
        return [torch.full((S,), col[0] if col else 0, dtype=torch.long, device=device)
                for col in columns]  # fmt: skip
    return upload([torch.tensor(col, dtype=torch.long) for col in columns], device)


def compress_padded(
    x: torch.Tensor,
    lengths: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    do_merge: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ApET on a padded batch of segments.

    Args:
        x: ``(S, N_max, D)`` float16/bfloat16/float32/float64, any strides.
        lengths: host ints N_s (<= N_max).
        keeps: host ints K_s (1 <= K_s <= N_s, or 0 when N_s = 0).
        num_basis: M >= 1; ridge >= 0; do_merge: SPEC.md step 4.

    Returns:
        out ``(S, K_max, D)`` x.dtype, kept ``(S, K_max)`` int64 local indices,
        assign ``(S, N_max)`` int64 local slots (or -1). Entries past a segment's K_s / N_s are
        unspecified; the dense and varlen wrappers cut them away.
    """
    S, n_max, _ = x.shape
    dev = x.device
    v = x.to(accumulation_dtype(x.dtype))
    k_max = max(keeps, default=0)
    m_host = [min(num_basis, k) for k in keeps]
    m_max = max(m_host, default=0)
    lengths_t, keeps_t, m_t = _segment_ints(lengths, keeps, m_host, dev)
    m_t = m_t.clamp_min(1)
    valid = torch.arange(n_max, device=dev)[None, :] < lengths_t[:, None]
    if m_max == 0:  # every segment empty
        empty = torch.zeros(S, 0, dtype=torch.long, device=dev)
        return x.new_zeros(S, 0, x.shape[2]), empty, torch.full((S, n_max), -1, device=dev)
    basis, sqnorm, dots = fps(v, valid, m_max)
    needs_residual = k_max > num_basis  # some segment keeps more than its basis
    err2 = residual(sqnorm, dots, basis, m_t, ridge) if needs_residual else None
    kept, keep_mask = select(err2, basis, m_t, valid, keeps_t, k_max)
    out, assign = merge(v, valid, kept, keep_mask, keeps_t, do_merge)
    return out.to(x.dtype).contiguous(), kept.contiguous(), assign


def compress_dense(
    x: torch.Tensor, keep: int, num_basis: int, ridge: float, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense op: ``x (S, N, D)`` -> ``out (S, K, D)``, ``kept (S, K)``, ``assign (S, N)``."""
    S, N, _ = x.shape
    return compress_padded(x, [N] * S, [keep] * S, num_basis, ridge, merge)


def _packed_positions(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ragged rows of ``lengths`` laid out padded to ``width``: the flat padded index of each
    packed element and the segment start of each segment. Built on the host from host ints, so
    the device never syncs (no boolean-mask indexing of device data)."""
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    total = int(lengths_t.sum())
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t, output_size=total)
    local = torch.arange(total) - starts[segment]
    return segment * width + local, starts


def compress_varlen(
    x: torch.Tensor, seqlens: list[int], keeps: list[int], num_basis: int, ridge: float, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen op on packed ``x (T, D)``: returns ``out (ΣK, D)``, ``kept (ΣK,)`` global rows of
    x, ``assign (T,)`` global output rows (-1 for dropped tokens when not merging)."""
    T, D = x.shape
    dev = x.device
    S = len(seqlens)
    n_max = max(seqlens, default=0)
    k_max = max(keeps, default=0)
    host = [*_packed_positions(seqlens, n_max), *_packed_positions(keeps, k_max)]
    token_flat, starts, out_flat, out_starts = upload(host, dev)
    padded = x.new_zeros(S * n_max, D).index_copy_(0, token_flat, x).view(S, n_max, D)
    out, kept, assign = compress_padded(padded, seqlens, keeps, num_basis, ridge, merge)
    packed_out = out.reshape(S * k_max, D).index_select(0, out_flat)
    packed_kept = (kept + starts[:, None]).reshape(-1).index_select(0, out_flat)
    global_assign = torch.where(assign >= 0, assign + out_starts[:, None], assign)
    packed_assign = global_assign.reshape(-1).index_select(0, token_flat)
    return packed_out, packed_kept, packed_assign


def unavailable_reason(x: torch.Tensor) -> str | None:
    """The torch backend runs on every device and dtype."""
    return None
