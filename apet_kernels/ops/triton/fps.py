"""Stage ``fps``: farthest point sampling of the basis, fused with the residual's inputs.

One launch computes the segment means (partial sums over token chunks), then one launch per FPS
step runs over a 1-D grid of (segment, token-block) programs. A step's program first re-reduces
the previous step's per-block ``(max, argmax)`` partials of its segment (a few KB, in a fixed
order, so every program of the segment derives the same pick), then streams its tokens once and
computes, per token, the new squared distance ``||v_i - b||^2`` *and* the dot product
``v_i · b``. The dot products are ``c_i`` and ``G`` for the residual solve and step 0 also writes
``||v_i||^2``, so the residual stage never reads x again. The alternative, a single persistent
program per segment looping over the steps, leaves the GPU idle for the common one-image call;
per-step launches spread one segment over many SMs, at the cost of ``m + 2`` launches.

Buffers (fp32 unless noted; T = total tokens, NBT = token blocks, S = segments):
    ``dist (T,)``: running min distance; ``-inf`` marks a token already chosen (distances are
        ``>= 0`` or NaN, never ``-inf``), NaN is sticky like ``torch.minimum``.
    ``sqnorm (T,)``, ``dots (m_max, T)`` (column t = ``v · b_t``, coalesced per step),
    ``basis (S, m_max)`` int64 local indices, ``pval/pidx (2, NBT)`` fp32/int32 step partials,
        double-buffered by step parity.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the per-segment table built by the launcher: (S, SEG_COLS) int64.
SEG_TOK = tl.constexpr(0)  # first token of the segment in the packed token index space
SEG_LEN = tl.constexpr(1)  # N_s
SEG_OUT = tl.constexpr(2)  # first output row
SEG_KEEP = tl.constexpr(3)  # K_s
SEG_M = tl.constexpr(4)  # m_s = min(M, K_s)
SEG_COLS = tl.constexpr(5)
# Sentinel index that loses every "lowest index" tie-break. Indices within a segment are int32
# (N_s < 2**31); only offsets into x and packed buffers are int64.
BIG_INDEX = tl.constexpr(2**31 - 1)
# Centroid sum chunking (``mean_chunks``): one chunk per CHUNK_TOKENS tokens, at most MAX_CHUNKS.
CHUNK_TOKENS = tl.constexpr(256)
MAX_CHUNKS = tl.constexpr(16)


@triton.jit
def row_offset(g, n_div, stride_s, stride_n):
    """Element offset of packed token ``g`` in x: dense tokens are ``s * N + i`` (``n_div = N``),
    varlen tokens are rows of x (``n_div = T``, so the quotient is 0). int64 throughout so
    ``T * D`` may exceed 2**31."""
    g = g.to(tl.int64)
    return (g // n_div) * stride_s + (g % n_div) * stride_n


@triton.jit
def local_offset(idx, stride, OFF32: tl.constexpr):
    """``idx * stride`` within one segment (token rows and feature columns alike): int32 when the
    launcher proved every in-segment offset fits (``OFF32``), which keeps gathered pointer tiles
    from holding 64-bit offsets in registers; int64 otherwise, where ``d * stride_d`` alone may pass
    2**31 (e.g. a transposed ``(T, D)`` view with ``stride_d = T``)."""
    if OFF32:
        return idx.to(tl.int32) * stride
    else:
        return idx.to(tl.int64) * stride


@triton.jit
def block_argmax(score, idx, valid):
    """Max of a NaN-free ``score`` over ``valid`` lanes and the lowest index attaining it."""
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, axis=0)
    best_idx = tl.min(tl.where(valid & (score == best), idx, BIG_INDEX), axis=0)
    return best, best_idx


@triton.jit
def mean_chunks(n_s):
    """Token chunks of a segment's centroid sum: ``min(MAX_CHUNKS, cdiv(n_s, CHUNK_TOKENS))``, a
    function of the segment's length alone, so its mean is summed in the same order alone and in
    any batch (a chunk count set by the batch size or SM count would change the order)."""
    return tl.minimum(tl.cdiv(n_s, CHUNK_TOKENS), MAX_CHUNKS)


@triton.jit(do_not_specialize=["n_div", "stride_s", "NC"])
def fps_mean_kernel(
    x_ptr, seg_ptr, part_ptr,
    n_div, stride_s, stride_n, stride_d, D, NC,
    OFF32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partial token sums: ``part (S, NC, D)`` fp32, grid ``(S, cdiv(D, BLOCK_D), NC)``.

    Segment ``s`` has ``C_s = mean_chunks(N_s) <= NC`` chunks; chunk ``c < C_s`` sums tokens
    ``[c * ceil(N_s/C_s), ...)``, programs with ``c >= C_s`` return. The consumer adds the C_s
    partials in chunk order.
    """
    s = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.program_id(2)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    n_s = tl.load(seg_ptr + s * SEG_COLS + SEG_LEN)
    n_chunks = mean_chunks(n_s)
    if c >= n_chunks:
        return
    chunk = tl.cdiv(n_s, n_chunks)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, n_s)
    base = row_offset(tok0, n_div, stride_s, stride_n)
    d_mask = d < D
    d_off = local_offset(d, stride_d, OFF32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        ptrs = x_ptr + base + local_offset(i, stride_n, OFF32)[:, None] + d_off[None, :]
        acc += tl.load(ptrs, mask=(i < hi)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    tl.store(part_ptr + (s * NC + c) * D + d, tl.sum(acc, axis=0), mask=d_mask)


@triton.jit
def _previous_pick(pval_ptr, pidx_ptr, parity, NBT, first_blk, n_blk, n_s, BLOCK_P: tl.constexpr):
    """Re-reduce a segment's per-block (max, argmax) partials of the previous step.

    Blocks are in ascending token order, so a strictly greater max is needed to move to a later
    chunk: ties keep the lowest token index. Every program of the segment runs this on the same
    data in the same order and gets the same pick.
    """
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], BIG_INDEX, tl.int32)
    for p0 in range(0, n_blk, BLOCK_P):
        j = p0 + tl.arange(0, BLOCK_P)
        j_mask = j < n_blk
        off = parity * NBT + first_blk + j
        val = tl.load(pval_ptr + off, mask=j_mask, other=float("-inf"))
        idx = tl.load(pidx_ptr + off, mask=j_mask, other=BIG_INDEX)
        c_best, c_idx = block_argmax(val, idx, j_mask)
        take = c_best > best
        best_idx = tl.where(take, c_idx, best_idx)
        best = tl.where(take, c_best, best)
    # Unreachable guard (a segment always has an unchosen token while steps remain): keeps every
    # later gather in bounds even on garbage input.
    return tl.minimum(tl.maximum(best_idx, 0), n_s - 1)


# Scalars that change with the batch (step, token and block counts, n_div, stride_s) are not
# specialized: Triton would otherwise compile a new variant whenever one of them happens to be 1
# or a multiple of 16. stride_n, stride_d and D keep their specialization (stride_d == 1 and
# 16-divisible rows and widths are what allow vectorized loads).
@triton.jit(do_not_specialize=["step", "T", "NBT", "M_MAX", "n_div", "stride_s", "NC"])
def fps_step_kernel(
    x_ptr, seg_ptr, blk_ptr, segblk_ptr, mean_ptr,
    dist_ptr, sqnorm_ptr, dots_ptr, basis_ptr, pval_ptr, pidx_ptr,
    step, T, NBT, M_MAX, n_div, stride_s, stride_n, stride_d, D, NC,
    FIRST: tl.constexpr, OFF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One FPS step over a 1-D grid of token blocks (``blk (NBT, 2)``: segment, local start).

    ``FIRST`` (step 0): distance to the segment mean and ``||v_i||^2``; writes step-0 partials.
    Step ``t >= 1``: picks ``b_{t-1}`` from the partials, writes ``basis[:, t-1]`` and
    ``dots[t-1]``; while ``t < m_s`` also updates ``dist`` and writes step-t partials. Segments
    with ``m_s < t`` are done and return at once.
    """
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(blk_ptr + pid * 2)
    local0 = tl.load(blk_ptr + pid * 2 + 1).to(tl.int32)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    n_s = tl.load(seg_ptr + s * SEG_COLS + SEG_LEN).to(tl.int32)
    m_s = tl.load(seg_ptr + s * SEG_COLS + SEG_M)
    if step > m_s:
        return
    base = row_offset(tok0, n_div, stride_s, stride_n)
    i = local0 + tl.arange(0, BLOCK_N)
    i_mask = i < n_s
    x_seg = x_ptr + base
    v_off = local_offset(i, stride_n, OFF32)[:, None]
    acc_dist = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_aux = tl.zeros([BLOCK_N], dtype=tl.float32)  # ||v||^2 (step 0) or v · b (later steps)
    if FIRST:
        n_chunks = mean_chunks(n_s)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            total = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c in range(n_chunks):  # in chunk order: the sum's order is the segment's own
                total += tl.load(mean_ptr + (s * NC + c) * D + d, mask=d_mask, other=0.0)
            mean = tl.div_rn(total, n_s.to(tl.float32))
            v_ptrs = x_seg + v_off + local_offset(d, stride_d, OFF32)[None, :]
            v = tl.load(v_ptrs, mask=i_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            diff = tl.where(d_mask[None, :], v - mean[None, :], 0.0)
            acc_dist += tl.sum(diff * diff, axis=1)
            acc_aux += tl.sum(v * v, axis=1)
        tl.store(sqnorm_ptr + tok0 + i, acc_aux, mask=i_mask)
        new = acc_dist
    else:
        first_blk = tl.load(segblk_ptr + s * 2)
        n_blk = tl.load(segblk_ptr + s * 2 + 1)
        pick = _previous_pick(pval_ptr, pidx_ptr, (step - 1) % 2, NBT, first_blk, n_blk, n_s,
                              BLOCK_P)  # fmt: skip
        if local0 == 0:
            tl.store(basis_ptr + s * M_MAX + step - 1, pick)
        b_base = x_seg + local_offset(pick, stride_n, OFF32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            d_off = local_offset(d, stride_d, OFF32)
            v_ptrs = x_seg + v_off + d_off[None, :]
            v = tl.load(v_ptrs, mask=i_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            b = tl.load(b_base + d_off, mask=d_mask, other=0.0).to(tl.float32)
            # Squared L2 as a direct difference (not ||v||^2 + ||b||^2 - 2 v·b): duplicates of
            # a basis token get exactly 0, as in the reference.
            diff = v - b[None, :]
            acc_dist += tl.sum(diff * diff, axis=1)
            acc_aux += tl.sum(v * b[None, :], axis=1)
        tl.store(dots_ptr + tl.cast(step - 1, tl.int64) * T + tok0 + i, acc_aux, mask=i_mask)
        if step == m_s:  # last pick: its dot products were all that was left to compute
            return
        old = tl.load(dist_ptr + tok0 + i, mask=i_mask, other=0.0)
        # min with NaN propagation (torch.minimum); step 1 replaces the distance to the mean.
        low = tl.where(acc_dist < old, acc_dist, old)
        low = tl.where(acc_dist != acc_dist, acc_dist, low)
        new = tl.where(step == 1, acc_dist, low)
        new = tl.where((old == float("-inf")) | (i == pick), float("-inf"), new)
    tl.store(dist_ptr + tok0 + i, new, mask=i_mask)
    score = tl.where(new != new, float("inf"), new)  # NaN ranks as +inf (reference policy)
    best, best_idx = block_argmax(score, i, i_mask)
    tl.store(pval_ptr + (step % 2) * NBT + pid, best)
    tl.store(pidx_ptr + (step % 2) * NBT + pid, best_idx)
