"""The torch backend: the readable oracle of SPEC.md and the CPU implementation in one.

Every stage is vectorized over a batch of segments ``(S, N, D)``: the Python loops are over the
``m <= num_basis`` farthest-point-sampling (and, when the ridge rule needs it, Cholesky) steps
and over segment groups. The wrappers run a call as batches of at most ``batch_size(N, D)``
segments of one length and one keep (varlen input is grouped by (N_s, K_s), never padded);
inside, the FPS loop runs in smaller ``group_size(N, D)``-segment pieces, so each level's working
set stays in cache (batched FPS used to fall out of it). Every shape and algorithm choice (the
FPS distance form, the GEMM shapes) is a function of the segment alone, so a segment's result is
the same alone, in any dense batch and in any varlen pack. The stage functions still take a
validity mask and ragged keeps, so they also run on padded batches.

Determinism on CPU (SPEC.md): no stage sums in an order that depends on threads. The merge sums
use ``scatter_add_`` along dim 0, which on CPU adds each output row's sources in token order
(parallel over rows or columns, never within one sum); ``index_put_(accumulate=True)``, used
before, adds with atomics in no fixed order from 2 threads on. The BLAS calls (``bmm``) and
reductions were measured bitwise equal at 1, 2 and 4 threads and alone vs in a batch (torch
2.13.0+cpu, MKL; tests/test_promises.py checks it). fp32 matmuls are pinned to IEEE precision for
the call (``ieee_matmul``), whatever ``torch.set_float32_matmul_precision`` says.

Fixed cost per call: at one segment (1x576x1024, 1x96x4096) a call is about 200 aten ops of a
few µs each around the large ones, so the small ones are kept few: an FPS step is nan_to_num,
where, argmax, scatter_, gather and the distance update; the wrappers' batches are dense (one
length, one keep), and ``residual``/``select``/``merge`` then skip their all-True masks
(``uniform``/``dense``: the same values, tests/test_promises.py compares the bits and counts the
ops); the ridge-rule check costs four small ops when no pivot needs the rule.

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

import contextlib
from collections.abc import Callable, Iterator

import torch

from .upload import upload

FLT_MIN = 1.17549435e-38
COS_EPS = 1e-12
# SPEC.md ridge rule: Cholesky pivots below τ = max(λ, 2^-16 · trace(G)/m) are replaced by τ.
PIVOT_FLOOR = 2.0**-16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (SPEC.md, Inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nan_as(t: torch.Tensor, value: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` with NaN replaced by ``value``, every other value (±inf and -0.0 included) bit for
    bit: one ``nan_to_num`` pass (isnan + full_like + where took three); ``out=t`` in place."""
    inf = float("inf")
    return torch.nan_to_num(t, nan=value, posinf=inf, neginf=-inf, out=out)


# Below this many elements (N·D of one segment) the (G, N, D) difference of a cache-sized group
# fits in cache and a fused subtract-then-norm is fastest; above it cdist's non-matmul mode, which
# never materializes the difference, wins. One CPU thread, ms per FPS step: 1x576x1024 0.11 vs
# 0.47 (cdist); 1x1024x3584 2.2 vs 3.1. The choice used to be made on S·N·D of the whole batch,
# so a segment's near-ties broke differently alone and in a batch; it is now the segment's own.
_CDIST_MIN_ELEMENTS = 4 * 2**20
# Segments per FPS group: as many as fit in this many bytes of accumulation-dtype input (the FPS
# difference temporary is the same size). 32x576x1024 in one batch took 7.1 ms of FPS per segment
# against 1.6 ms alone (the batch fell out of cache). On CUDA a group is only a launch-count
# trade-off, so it is large.
_GROUP_BYTES = {"cpu": 4 * 2**20}
# Segments per batch of the whole op: the stages after FPS pass over the batch a few times each
# (GEMMs, norms, gathers, the merge sums), so a batch should stay in the 32 MiB L3 too, but
# batches of one 2.25 MiB segment repeat the pipeline's fixed cost (llava_next 5x576x1024 was 5%
# slower than one batch). One thread, CPU ms, batches of 4 / 16 MiB / the whole call: llava_next
# 47.8 / 43.1 / 43.0, batch32 32x576x1024 265 / 231 / 283, video_llava 8x256x4096 89 / 85 / 86.
_BATCH_BYTES = {"cpu": 16 * 2**20}
_GROUP_BYTES_OTHER = 2**30


def _segments_in(budget: int, n: int, d: int, itemsize: int) -> int:
    return max(1, budget // max(1, n * d * itemsize))


def group_size(n: int, d: int, itemsize: int = 4, device: str = "cpu") -> int:
    """Segments of ``n`` tokens of width ``d`` in one piece of the FPS loop (>= 1): a function of
    the segment's shape, its accumulation dtype's ``itemsize`` and the device type only."""
    return _segments_in(_GROUP_BYTES.get(device, _GROUP_BYTES_OTHER), n, d, itemsize)


def batch_size(n: int, d: int, itemsize: int = 4, device: str = "cpu") -> int:
    """Segments in one batch of the whole op (>= 1), a function of the same four values."""
    return _segments_in(_BATCH_BYTES.get(device, _GROUP_BYTES_OTHER), n, d, itemsize)


@contextlib.contextmanager
def ieee_matmul() -> Iterator[None]:
    """fp32 matmuls at full IEEE precision inside, whatever the global setting
    (``torch.set_float32_matmul_precision("high")`` makes CUDA matmuls TF32 and, on CPUs with
    bf16 units, oneDNN's bf16): SPEC.md accumulates in float32. Sets and restores the per-backend
    ``fp32_precision`` (process-global state, so concurrent threads running matmuls during the
    call see it too)."""
    cuda_mm, mkldnn_mm = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda_mm.fp32_precision, mkldnn_mm.fp32_precision
    cuda_mm.fp32_precision = mkldnn_mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda_mm.fp32_precision, mkldnn_mm.fp32_precision = saved


def _distance(
    v: torch.Tensor, point: torch.Tensor, use_cdist: bool, buf: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(S, N)`` L2 distances of ``v (S, N, D)`` to ``point (S, 1, D)`` as direct differences (not
    ||v||^2 + ||p||^2 - 2 v·p): exact zeros for duplicates, no cancellation. FPS ranks by these
    distances; the square root is monotone, so the argmax is that of the squared distances
    SPEC.md names. Returns the distances and the difference tensor, which the next call takes
    as ``buf`` and overwrites: one allocation per FPS loop, not one per step (a fresh 15 MiB
    block per step could come from mmap each time: 1x1024x3584 ran at 2-3x its time in page
    faults, depending on the heap's layout). ``buf`` is the first step's own ``v - point``, so
    every step's difference has the layout (and the norm its reduction order) of a fresh one."""
    if use_cdist:
        dist = torch.cdist(v, point, compute_mode="donot_use_mm_for_euclid_dist")[..., 0]
        return dist, None
    diff = v - point if buf is None else torch.sub(v, point, out=buf)
    return torch.linalg.vector_norm(diff, dim=-1), diff


def _fps_picks(v: torch.Tensor, valid: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The FPS loop on one group ``v (G, N, D)``, ``valid (G, N)``: ``(G, num_steps)`` picks."""
    S, N, D = v.shape
    use_cdist = N * D >= _CDIST_MIN_ELEMENTS  # per segment: the same alone and in a batch
    validf = valid.to(v.dtype)
    count = validf.sum(1).clamp_min(1.0)
    mean = torch.bmm(validf[:, None, :], v) / count[:, None, None]  # (S, 1, D)
    # Tokens still to pick from: valid and not chosen. Per step: a pick is the argmax of the
    # distances (NaN ranking as +inf) over these, the first maximal index (lowest-index
    # tie-break); -inf elsewhere, so no pick lands on padding or repeats while tokens remain.
    free = valid.clone()
    picks = []
    dist, buf = _distance(v, mean, use_cdist)  # step 1 scores: distance to the mean
    for t in range(num_steps):
        pick = torch.where(free, _nan_as(dist, float("inf")), float("-inf")).argmax(1, True)
        picks.append(pick)  # (S, 1)
        if t + 1 < num_steps:  # the last pick needs no distance update
            free.scatter_(1, pick, False)
            point = torch.gather(v, 1, pick[:, :, None].expand(S, 1, D))
            d_new, buf = _distance(v, point, use_cdist, buf)
            dist = d_new if t == 0 else torch.minimum(dist, d_new)
    if not picks:
        return torch.zeros(S, 0, dtype=torch.long, device=v.device)
    return torch.cat(picks, 1)


def fps(
    v: torch.Tensor, valid: torch.Tensor, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Farthest point sampling, per segment, deterministic (lowest index wins ties).

    The m-step loop runs in pieces of ``group_size(N, D)`` segments: it streams the whole piece
    through cache once per step, so a piece must fit in L2 (32x576x1024 in one batch took 7.1 ms
    of FPS per segment against 1.6 ms alone). The stages after it pass over each token a few
    times only and run on the caller's batch (``batch_size``, 4x larger on CPU).

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
    S, N, D = v.shape
    step = group_size(N, D, v.element_size(), v.device.type)
    if S <= step:
        basis = _fps_picks(v, valid, num_steps)
    else:
        basis = torch.cat(
            [_fps_picks(v[s0 : s0 + step], valid[s0 : s0 + step], num_steps)
             for s0 in range(0, S, step)]
        )  # fmt: skip
    # c_i and G for the solve: one GEMM against all basis rows after the loop, not a pass per step.
    basis_rows = torch.gather(v, 1, basis[:, :, None].expand(S, num_steps, D))
    dots = torch.bmm(v, basis_rows.transpose(1, 2))
    sqnorm = (v * v).sum(-1)
    return basis, sqnorm, dots


def clamped_cholesky(system: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``system (S, m, m)`` by SPEC.md's ridge rule.

    Standard column order k = 0..m-1: each pivot p_k = A_kk - Σ_{j<k} L_kj² is replaced by
    ``tau (S,)`` when p_k < τ (a compare-and-select, so a NaN pivot stays NaN), then
    L_kk = sqrt(p_k) and L_ik = (A_ik - Σ_{j<k} L_ij L_kj) / L_kk. With the default ridge τ = λ,
    which a positive semi-definite G only undercuts by rounding; with ridge = 0 it keeps a
    rank-deficient basis finite. Returns ``(S, m, m)``, zero above the diagonal.
    """
    m = system.shape[1]
    factor = torch.zeros_like(system)
    for k in range(m):
        row = factor[:, k, :k]  # (S, k): L_kj, j < k
        pivot = system[:, k, k] - (row * row).sum(-1)
        pivot = torch.where(pivot < tau, tau, pivot)
        diag = pivot.sqrt()
        factor[:, k, k] = diag
        if k + 1 < m:
            below = system[:, k + 1 :, k] - (factor[:, k + 1 :, :k] * row[:, None, :]).sum(-1)
            factor[:, k + 1 :, k] = below / diag[:, None]
    return factor


def _factor(system: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The ridge rule's factor of ``system (S, m, m)``, per segment.

    On CPU, LAPACK's factor (3 µs at S=1, m=10, against about 1 ms for the m-step loop of
    :func:`clamped_cholesky`) stands for segments where it succeeds with every pivot L_kk² >= τ:
    there the rule replaces nothing and the two differ only in rounding. Segments with a pivot
    below τ or a failed factorization take :func:`clamped_cholesky` (reading the flags is free on
    CPU). On other devices the loop always runs: reading the flags would sync.
    """
    if system.device.type != "cpu":
        return clamped_cholesky(system, tau)
    chol, info = torch.linalg.cholesky_ex(system)
    pivots = torch.diagonal(chol, dim1=1, dim2=2).square()
    ok = pivots >= tau[:, None]  # NaN pivots fail >= too
    # The common case in four small ops (the per-segment mask below costs four more).
    if not bool(info.any()) and bool(ok.all()):
        return chol
    needs_rule = (info != 0) | ~ok.all(-1)
    return torch.where(needs_rule[:, None, None], clamped_cholesky(system, tau), chol)


def residual(
    sqnorm: torch.Tensor,
    dots: torch.Tensor,
    basis: torch.Tensor,
    num_basis: torch.Tensor,
    ridge: float,
    uniform: bool = False,
) -> torch.Tensor:
    """Squared approximation error of every token from its segment's basis.

    e_i^2 = ||v_i||^2 - c_iᵀα_i - λ||α_i||^2 (clamped at 0), α_i = (G + λI)^-1 c_i by forward and
    back substitution with :func:`clamped_cholesky`'s factor, λ = ridge · trace(G)/m + FLT_MIN.
    Segments with m_s < m_max pad G with an identity block and c with zeros, so the padded
    coordinates solve to α = 0 and change nothing.

    Args:
        sqnorm: ``(S, N)``; dots: ``(S, N, m_max)``; basis: ``(S, m_max)`` int64.
        num_basis: ``(S,)`` int64 m_s per segment (1 <= m_s <= m_max).
        ridge: relative ridge (>= 0).
        uniform: the caller knows every m_s equals m_max: the masks of padded basis slots are
            all True and are skipped (the same values, fewer ops).

    Returns:
        ``(S, N)`` e_i^2 in the accumulation dtype.
    """
    S, N, m = dots.shape
    gram = torch.gather(dots, 1, basis[:, :, None].expand(S, m, m))  # (S, m, m), row t = b_t
    gram = 0.5 * (gram + gram.transpose(1, 2))
    if not uniform:
        slot_valid = torch.arange(m, device=dots.device)[None, :] < num_basis[:, None]  # (S, m)
        pair_valid = slot_valid[:, :, None] & slot_valid[:, None, :]
        gram = torch.where(pair_valid, gram, torch.zeros_like(gram))
    mean_diag = torch.diagonal(gram, dim1=1, dim2=2).sum(-1) / num_basis.to(gram.dtype)
    lam = ridge * mean_diag + FLT_MIN
    tau = torch.maximum(lam, PIVOT_FLOOR * mean_diag)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    if uniform:
        system = gram + eye * lam[:, None, None]
        c = dots
    else:
        diag_add = torch.where(slot_valid, lam[:, None], torch.ones_like(lam)[:, None])
        system = gram + eye * diag_add[:, :, None]
        c = torch.where(slot_valid[:, None, :], dots, torch.zeros_like(dots))  # (S, N, m)
    chol = _factor(system, tau)
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
    uniform: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kept = basis ∪ the (K - m) largest-error non-basis tokens, ascending.

    Args:
        err2: ``(S, N)`` errors, or None when no segment has K > m.
        basis: ``(S, m_max)`` int64; num_basis: ``(S,)`` m_s.
        valid: ``(S, N)`` bool; keeps: ``(S,)`` int64 K_s.
        max_keep: K_max (host int), the width of the output.
        uniform: the caller knows every K_s equals K_max and every m_s equals m_max (the
            same values, fewer ops).

    Returns:
        kept: ``(S, K_max)`` int64 ascending; slots >= K_s are unspecified (padding).
        keep_mask: ``(S, N)`` bool, exactly K_s True per segment.
    """
    S, N = valid.shape
    m = basis.shape[1]
    if uniform:  # every slot is a basis token: one scatter of True
        is_basis = torch.zeros(S, N, dtype=torch.bool, device=valid.device)
        is_basis.scatter_(1, basis, True)
    else:
        slot_valid = torch.arange(m, device=basis.device)[None, :] < num_basis[:, None]
        # Slots past m_s may repeat indices (short segments run out of tokens), so reduce with
        # "amax" rather than a plain scatter whose winner among duplicates is unspecified.
        is_basis = torch.zeros(S, N, dtype=torch.uint8, device=valid.device)
        is_basis = is_basis.scatter_reduce_(1, basis, slot_valid.to(torch.uint8), "amax").bool()
    keep_mask = is_basis.clone()
    if err2 is not None:
        score = torch.where(valid & ~is_basis, _nan_as(err2, float("inf")), float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        if uniform:  # the first K - m of every row
            keep_mask.scatter_(1, order[:, : max(0, max_keep - m)], True)
        else:
            extra = (keeps - num_basis).clamp_min(0)  # (S,)
            ranked = torch.arange(N, device=valid.device)[None, :] < extra[:, None]
            keep_mask |= torch.zeros_like(keep_mask).scatter_(1, order, ranked)
    # Stable sort of "not kept" lists the kept indices first, in ascending order.
    kept = torch.sort((~keep_mask).to(torch.uint8), dim=1, stable=True).indices[:, :max_keep]
    return kept, keep_mask


def slot_sums(rows: torch.Tensor, target: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``(num_slots, D)`` sums of ``rows (T, D)`` by ``target (T,)`` int64 in [0, num_slots),
    each slot's rows added in token order whatever the thread count (SPEC.md's determinism)."""
    sums = rows.new_zeros(num_slots, rows.shape[1])
    if rows.device.type == "cpu":
        # The expanded index takes ATen's scatter_add expanded-index CPU path (sort by row, then
        # each row summed in source order; torch 2.13); the generic path loops dim 0 serially
        # per column. Both are order-fixed, unlike index_put_'s atomic adds from 2 threads on.
        # index_add_(0, target, rows) is no alternative: on CPU it calls this same scatter_add_
        # with an expanded index (index_add_cpu_out), and timed the same at 1 and 2 threads.
        return sums.scatter_add_(0, target[:, None].expand_as(rows), rows)
    return sums.index_put_((target,), rows, accumulate=True)  # sort-based on CUDA


def merge(
    v: torch.Tensor,
    valid: torch.Tensor,
    kept: torch.Tensor,
    keep_mask: torch.Tensor,
    keeps: torch.Tensor,
    do_merge: bool,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each dropped token to its most cosine-similar kept token and take uniform means.

    The similarity is one batched GEMM ``(S, N, K)`` of raw rows divided by the clamped norm
    product, then an argmax: the ``(N-K) x K x D`` broadcast of the paper's code never exists.
    The sums add each slot's tokens in token order whatever the thread count: ``scatter_add_``
    along dim 0 on CPU, ``index_put_(accumulate=True)`` (sort-based) on CUDA. A slot with no
    merged token returns its kept row itself, so K = N is an exact copy, -0.0 included (a sum
    started from +0.0 would turn -0.0 into +0.0).

    Args:
        v: ``(S, N, D)`` accumulation dtype; valid, keep_mask: ``(S, N)`` bool.
        kept: ``(S, K_max)`` int64; keeps: ``(S,)`` int64 K_s.
        do_merge: False keeps the kept tokens unchanged and sets dropped assign to -1.
        dense: the caller knows every token is valid and every K_s equals K_max: the masks are
            skipped and the sums need no spare padding row (the same values, fewer ops).

    Returns:
        out: ``(S, K_max, D)`` accumulation dtype; assign: ``(S, N)`` int64 local slots.
    """
    S, N, D = v.shape
    K = kept.shape[1]
    w = torch.gather(v, 1, kept[:, :, None].expand(S, K, D))
    own_slot = torch.cumsum(keep_mask, dim=1) - 1  # slot of each kept token
    if not do_merge:
        return w, torch.where(keep_mask, own_slot, torch.full_like(own_slot, -1))
    vnorm = v.norm(dim=-1)
    wnorm = torch.gather(vnorm, 1, kept)
    sim = torch.bmm(v, w.transpose(1, 2))
    sim.div_((vnorm[:, :, None] * wnorm[:, None, :]).clamp_min_(COS_EPS))
    if dense:
        sim = _nan_as(sim, float("-inf"), out=sim)
    else:
        slot_valid = torch.arange(K, device=v.device)[None, :] < keeps[:, None]  # (S, K)
        sim = torch.where(slot_valid[:, None, :], _nan_as(sim, float("-inf")), float("-inf"))
    nearest = sim.argmax(-1)  # first maximal slot: the lowest-slot tie-break
    assign = torch.where(keep_mask, own_slot, nearest)
    # Every token, kept ones included, adds itself to its slot: sum = v_kept + Σ dropped and
    # count = 1 + n_j. Padding goes to a spare row per segment that is dropped afterwards.
    if dense:
        rows_per = K  # no padding: segment s's slots are rows s·K .. s·K + K - 1
        target = assign
    else:
        rows_per = K + 1
        target = torch.where(valid, assign, torch.full_like(assign, K))
    if S > 1:
        target = target + rows_per * torch.arange(S, device=v.device)[:, None]
    flat = target.reshape(-1)
    sums = slot_sums(v.reshape(S * N, D), flat, S * rows_per)
    if dense and v.device.type == "cpu":
        # Counts are small integers (exact). A slot with count 1 holds only its kept row, which
        # the sum started from +0.0 turned -0.0 into +0.0 in: copy those rows back from w (the
        # rows to copy are read on the host, free on CPU; a where over all of out cost 4x).
        counts = torch.bincount(flat, minlength=S * K).to(v.dtype)
        out = sums.div_(counts.clamp_min_(1.0)[:, None])
        single = (counts == 1).nonzero().squeeze(1)
        out.index_copy_(0, single, w.reshape(S * K, D).index_select(0, single))
        return out.view(S, K, D), assign
    # Counts are small integers: exact in any order.
    counts = v.new_zeros(S * rows_per).index_put_((flat,), v.new_ones(S * N), accumulate=True)
    sums = sums.view(S, rows_per, D)[:, :K]
    counts = counts.view(S, rows_per, 1)[:, :K]
    out = torch.where(counts == 1, w, sums / counts.clamp_min(1.0))
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
    # Every segment of one length and one keep (every dense and varlen group): masks all True.
    dense = m_max > 0 and all(n == n_max for n in lengths) and all(k == k_max for k in keeps)
    if dense:
        keeps_t = torch.full((S,), k_max, dtype=torch.long, device=dev)
        m_t = torch.full((S,), m_max, dtype=torch.long, device=dev)
        valid = torch.ones(S, n_max, dtype=torch.bool, device=dev)
    else:
        lengths_t, keeps_t, m_t = _segment_ints(lengths, keeps, m_host, dev)
        m_t = m_t.clamp_min(1)
        valid = torch.arange(n_max, device=dev)[None, :] < lengths_t[:, None]
    if m_max == 0:  # every segment empty
        empty = torch.zeros(S, 0, dtype=torch.long, device=dev)
        return x.new_zeros(S, 0, x.shape[2]), empty, torch.full((S, n_max), -1, device=dev)
    basis, sqnorm, dots = fps(v, valid, m_max)
    needs_residual = k_max > num_basis  # some segment keeps more than its basis
    err2 = residual(sqnorm, dots, basis, m_t, ridge, dense) if needs_residual else None
    kept, keep_mask = select(err2, basis, m_t, valid, keeps_t, k_max, dense)
    out, assign = merge(v, valid, kept, keep_mask, keeps_t, do_merge, dense)
    return out.to(x.dtype).contiguous(), kept.contiguous(), assign


def _batch_step(x: torch.Tensor, n: int) -> int:
    return batch_size(n, x.shape[-1], accumulation_dtype(x.dtype).itemsize, x.device.type)


def compress_dense(
    x: torch.Tensor, keep: int, num_basis: int, ridge: float, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense op: ``x (S, N, D)`` -> ``out (S, K, D)``, ``kept (S, K)``, ``assign (S, N)``, in
    batches of ``batch_size(N, D)`` segments (FPS cuts each into ``group_size`` pieces)."""
    S, N, _ = x.shape
    step = _batch_step(x, N)
    with ieee_matmul():
        parts = []
        for s0 in range(0, S, step):
            G = min(step, S - s0)
            parts.append(
                compress_padded(x[s0 : s0 + G], [N] * G, [keep] * G, num_basis, ridge, merge)
            )
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def _varlen_plan(
    seqlens: list[int], keeps: list[int], group_of: Callable[[int], int]
) -> tuple[list[tuple[int, list[int], int]], list[torch.Tensor]]:
    """Groups of segments of one length and one keep (``group_of(n)`` at most: the op's batch
    size) and the host index tables that move them, built from host ints only. Keeps are part of
    the key because the GEMMs' shapes follow them: MKL rounds a dot product differently in a
    (N, 100) product than in a (N, 25) one, so a segment grouped with a larger keep came out
    different.

    Returns ``(groups, tables)``: each group is ``(n, keeps of its segments, k_max)``; the five
    int64 tables, each concatenated over the groups in order, are: the packed rows of the group's
    tokens (where its ``assign`` goes too); for its kept slots, the flat index into the group's
    ``(G·k_max)`` outputs and the packed output row each goes to; each segment's first token row
    and first output row.
    """
    tok_start, out_start = [0], [0]
    for n, k in zip(seqlens, keeps, strict=True):
        tok_start.append(tok_start[-1] + n)
        out_start.append(out_start[-1] + k)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for s, (n, k) in enumerate(zip(seqlens, keeps, strict=True)):
        if n:
            by_shape.setdefault((n, k), []).append(s)
    groups: list[tuple[int, list[int], int]] = []
    tables: list[list[int]] = [[], [], [], [], []]
    rows, src, dst, seg_tok, seg_out = tables
    for (n, _), segments in by_shape.items():
        step = group_of(n)
        for g0 in range(0, len(segments), step):
            chunk = segments[g0 : g0 + step]
            group_keeps = [keeps[s] for s in chunk]
            k_max = max(group_keeps)
            groups.append((n, group_keeps, k_max))
            for j, s in enumerate(chunk):
                rows.extend(range(tok_start[s], tok_start[s] + n))
                src.extend(range(j * k_max, j * k_max + keeps[s]))
                dst.extend(range(out_start[s], out_start[s] + keeps[s]))
                seg_tok.append(tok_start[s])
                seg_out.append(out_start[s])
    return groups, [torch.tensor(t, dtype=torch.long) for t in tables]


def compress_varlen(
    x: torch.Tensor, seqlens: list[int], keeps: list[int], num_basis: int, ridge: float, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen op on packed ``x (T, D)``: returns ``out (ΣK, D)``, ``kept (ΣK,)`` global rows of
    x, ``assign (T,)`` global output rows (-1 for dropped tokens when not merging).

    Segments are grouped by (length, keep) and each group runs as a dense batch (no padding), so
    a segment's result is bitwise its result alone. The index tables go up in one copy.
    """
    T, D = x.shape
    total_keep = sum(keeps)
    groups, host = _varlen_plan(seqlens, keeps, lambda n: _batch_step(x, n))
    rows, src, dst, seg_tok, seg_out = upload(host, x.device)
    out = x.new_empty(total_keep, D)
    kept = torch.empty(total_keep, dtype=torch.long, device=x.device)
    assign = torch.empty(T, dtype=torch.long, device=x.device)
    r0 = k0 = g0 = 0
    with ieee_matmul():
        for n, group_keeps, k_max in groups:
            G, ks = len(group_keeps), sum(group_keeps)
            g_rows, g_src, g_dst = rows[r0 : r0 + G * n], src[k0 : k0 + ks], dst[k0 : k0 + ks]
            g_tok, g_out = seg_tok[g0 : g0 + G, None], seg_out[g0 : g0 + G, None]
            xs = x.index_select(0, g_rows).view(G, n, D)
            o, k, a = compress_padded(xs, [n] * G, group_keeps, num_basis, ridge, merge)
            out.index_copy_(0, g_dst, o.reshape(G * k_max, D).index_select(0, g_src))
            kept.index_copy_(0, g_dst, (k + g_tok).reshape(-1).index_select(0, g_src))
            assign.index_copy_(0, g_rows, torch.where(a >= 0, a + g_out, a).reshape(-1))
            r0, k0, g0 = r0 + G * n, k0 + ks, g0 + G
    return out, kept, assign


def unavailable_reason(x: torch.Tensor) -> str | None:
    """The torch backend runs on every device and dtype."""
    return None
