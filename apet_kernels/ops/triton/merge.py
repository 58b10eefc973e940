"""Stage ``merge``: cosine assignment of dropped tokens and the deterministic segmented mean.

``merge_assign_kernel`` is a tiled GEMM ``V (BLOCK_N x D) · Wᵀ (D x BLOCK_K)`` over the kept rows
of the segment with an argmax epilogue: each K-tile's scores are normalized, reduced to a
per-token (max, lowest slot) and folded into a running best, so the ``(N - K) x K`` similarity
matrix never exists in memory. Token norms come from FPS's ``sqnorm`` (no extra pass).

Ties between identical kept tokens go to the lowest slot by construction, not by rounding:
``merge_dedup_kernel`` marks every kept slot whose row equals (value for value) the row of a
lower slot of the same segment, and the assignment skips marked slots. Their cosines equal the
lower copy's in exact arithmetic, so the lowest-slot rule picks the lower copy anyway; the GEMM
alone could score two identical columns differently by their position in the tile (the
interpreter's BLAS did, for 39-44 of 300 dropped tokens). Candidates are found by a fingerprint
(||v||² and the dot products with every basis token, computed per token by FPS in one fixed
order, so identical rows get identical fingerprints) and then compared over all D features.

``merge_mean_kernel`` computes each output row from a member list sorted by slot (CSR: the
launcher's stable sort of the slot of every token), adding members in token order in fp32: no
float atomics, so the result is bitwise reproducible. Without merging, it is a plain gather.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fps import (
    BIG_INDEX,
    SEG_COLS,
    SEG_KEEP,
    SEG_LEN,
    SEG_M,
    SEG_OUT,
    SEG_TOK,
    local_offset,
    row_offset,
)

COS_EPS = tl.constexpr(1e-12)


@triton.jit
def _fingerprints_match(sqnorm_ptr, dots_ptr, tok0, kept_a, kept_b, m_s, T):
    """``(BA, BB)`` mask: kept tokens ``a`` and ``b`` (local indices) have equal ||v||² and
    equal dot products with the m_s basis tokens (``dots (m_max, T)``)."""
    ga = tok0 + kept_a
    gb = tok0 + kept_b
    match = tl.load(sqnorm_ptr + ga)[:, None] == tl.load(sqnorm_ptr + gb)[None, :]
    for t in range(m_s):
        row = dots_ptr + tl.cast(t, tl.int64) * T
        match &= tl.load(row + ga)[:, None] == tl.load(row + gb)[None, :]
    return match


@triton.jit(do_not_specialize=["T", "M_MAX", "n_div", "stride_s"])
def merge_dedup_kernel(
    x_ptr, seg_ptr, sqnorm_ptr, dots_ptr, kept_ptr, dup_ptr,
    T, n_div, stride_s, stride_n, stride_d, D,
    LOCAL: tl.constexpr, OFF32: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``dup (R,)`` int32: 1 where kept slot j has a lower slot of its segment with an equal row.

    Grid ``(S, cdiv(K_max, BLOCK_J))``: program (s, b) handles slots ``[b * BLOCK_J, ...)`` of
    segment s. Each slot's lowest fingerprint match below it is compared over all features; a
    fingerprint collision (a different row with equal ||v||² and basis dot products) leaves the
    slot unmarked, which only gives up the guarantee for that slot, never marks a distinct row.
    """
    s = tl.program_id(0).to(tl.int64)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    out0 = tl.load(seg_ptr + s * SEG_COLS + SEG_OUT)
    k_s = tl.load(seg_ptr + s * SEG_COLS + SEG_KEEP).to(tl.int32)
    m_s = tl.load(seg_ptr + s * SEG_COLS + SEG_M).to(tl.int32)
    j0 = tl.program_id(1) * BLOCK_J
    if j0 >= k_s:
        return
    j = j0 + tl.arange(0, BLOCK_J)
    j_mask = j < k_s
    kept_j = tl.load(kept_ptr + out0 + j, mask=j_mask, other=0)
    if not LOCAL:
        kept_j -= tok0
    kept_j = tl.where(j_mask, kept_j, 0).to(tl.int32)
    cand = tl.full([BLOCK_J], BIG_INDEX, tl.int32)
    for l0 in range(0, j0 + BLOCK_J, BLOCK_J):  # lower slots, ascending: the first match wins
        low = l0 + tl.arange(0, BLOCK_J)
        l_mask = low < k_s
        kept_l = tl.load(kept_ptr + out0 + low, mask=l_mask, other=0)
        if not LOCAL:
            kept_l -= tok0
        kept_l = tl.where(l_mask, kept_l, 0).to(tl.int32)
        match = _fingerprints_match(sqnorm_ptr, dots_ptr, tok0, kept_j, kept_l, m_s, T)
        match &= (low[None, :] < j[:, None]) & l_mask[None, :] & j_mask[:, None]
        cand = tl.minimum(cand, tl.min(tl.where(match, low[None, :], BIG_INDEX), axis=1))
    found = cand < BIG_INDEX
    dup = found
    if tl.max(found.to(tl.int32), axis=0) > 0:  # rare: verify the candidates feature by feature
        kept_c = tl.load(kept_ptr + out0 + tl.where(found, cand, 0), mask=found, other=0)
        if not LOCAL:
            kept_c -= tok0
        kept_c = tl.where(found, kept_c, 0).to(tl.int32)
        x_seg = x_ptr + row_offset(tok0, n_div, stride_s, stride_n)
        a_off = local_offset(kept_j, stride_n, OFF32)[:, None]
        c_off = local_offset(kept_c, stride_n, OFF32)[:, None]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_off = local_offset(d, stride_d, OFF32)[None, :]
            both = found[:, None] & (d < D)[None, :]
            a = tl.load(x_seg + a_off + d_off, mask=both, other=0.0)
            c = tl.load(x_seg + c_off + d_off, mask=both, other=0.0)
            same = tl.min((a == c).to(tl.int32), axis=1)  # NaN rows never match
            dup &= same > 0
    tl.store(dup_ptr + out0 + j, dup.to(tl.int32), mask=j_mask)


@triton.jit(do_not_specialize=["n_div", "stride_s"])
def merge_assign_kernel(
    x_ptr, seg_ptr, blk_ptr, sqnorm_ptr, kept_ptr, dup_ptr, assign_ptr,
    n_div, stride_s, stride_n, stride_d, D,
    LOCAL: tl.constexpr, UPCAST: tl.constexpr, OFF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Fills ``assign`` for the dropped tokens (those select marked -1); 1-D grid of token blocks.

    ``UPCAST`` feeds fp32 to ``tl.dot`` with IEEE precision: required for fp32 input (TF32 would
    flip near-ties against the oracle) and under the interpreter (its bf16 dot is wrong).
    """
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(blk_ptr + pid * 2)
    local0 = tl.load(blk_ptr + pid * 2 + 1).to(tl.int32)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    n_s = tl.load(seg_ptr + s * SEG_COLS + SEG_LEN).to(tl.int32)
    out0 = tl.load(seg_ptr + s * SEG_COLS + SEG_OUT)
    k_s = tl.load(seg_ptr + s * SEG_COLS + SEG_KEEP).to(tl.int32)
    i = local0 + tl.arange(0, BLOCK_N)
    i_mask = i < n_s
    own = tl.load(assign_ptr + tok0 + i, mask=i_mask, other=0)
    drop = i_mask & (own < 0)
    if tl.max(drop.to(tl.int32), axis=0) == 0:  # all kept (e.g. K = N): nothing to assign
        return
    base = row_offset(tok0, n_div, stride_s, stride_n)
    x_seg = x_ptr + base
    v_off = local_offset(i, stride_n, OFF32)
    v_norm = tl.sqrt_rn(tl.load(sqnorm_ptr + tok0 + i, mask=i_mask, other=0.0))
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_slot = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, k_s, BLOCK_K):
        j = (k0 + tl.arange(0, BLOCK_K)).to(tl.int32)
        j_mask = j < k_s
        kept = tl.load(kept_ptr + out0 + j, mask=j_mask, other=0)
        if not LOCAL:
            kept -= tok0
        kept = tl.where(j_mask, kept, 0).to(tl.int32)
        # Copies of a lower slot's row never win (see the module docstring).
        scored = j_mask & (tl.load(dup_ptr + out0 + j, mask=j_mask, other=1) == 0)
        w_norm = tl.sqrt_rn(tl.load(sqnorm_ptr + tok0 + kept, mask=j_mask, other=0.0))
        w_off = local_offset(kept, stride_n, OFF32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            d_off = local_offset(d, stride_d, OFF32)
            v = tl.load(x_seg + v_off[:, None] + d_off[None, :],
                        mask=drop[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
            w = tl.load(x_seg + w_off[None, :] + d_off[:, None],
                        mask=j_mask[None, :] & d_mask[:, None], other=0.0)  # fmt: skip
            if UPCAST:
                acc = tl.dot(v.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(v, w, acc)
        denom = v_norm[:, None] * w_norm[None, :]
        cos = tl.div_rn(acc, tl.where(denom > COS_EPS, denom, COS_EPS))  # IEEE, as interpreted
        cos = tl.where(cos != cos, float("-inf"), cos)  # NaN ranks as -inf (reference policy)
        cos = tl.where(scored[None, :], cos, float("-inf"))
        c_best = tl.max(cos, axis=1)
        c_slot = tl.min(tl.where(cos == c_best[:, None], j[None, :], BIG_INDEX), axis=1)
        take = c_best > best  # strict: an earlier tile (lower slots) wins ties
        best_slot = tl.where(take, c_slot, best_slot)
        best = tl.where(take, c_best, best)
    slot = tl.minimum(best_slot, k_s - 1)  # in range even if every score was -inf
    if not LOCAL:
        slot += out0
    tl.store(assign_ptr + tok0 + i, slot, mask=drop)


@triton.jit(do_not_specialize=["n_div", "stride_s", "K_DENSE"])
def merge_mean_kernel(
    x_ptr, out_ptr, perm_ptr, row_start_ptr, kept_ptr,
    n_div, stride_s, stride_n, stride_d, D, K_DENSE,
    MERGE: tl.constexpr, LOCAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out (R, D)`` in x's dtype, grid ``(R, cdiv(D, BLOCK_D))``.

    ``MERGE``: row j is the fp32 mean of tokens ``perm[row_start[j]:row_start[j+1]]`` (packed
    token indices sorted by slot, then index; the kept token itself is among them); a row of
    one member (every row at K = N) is copied without arithmetic, so out == x
    bitwise, -0.0 included (a reduction over masked lanes may start from +0.0). Otherwise row
    j copies token ``kept[j]``.
    ``LOCAL``/``K_DENSE``: dense kept indices are local, segment ``j // K_DENSE``.
    """
    j = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    d_off = d.to(tl.int64) * stride_d  # rows are int64 offsets anyway; d * stride_d may pass 2**31
    out_ptrs = out_ptr + j * D + d
    lo = 0
    hi = 1  # not merging: one member, copy kept[j]
    if MERGE:
        lo = tl.load(row_start_ptr + j)
        hi = tl.load(row_start_ptr + j + 1)
    if hi - lo != 1:
        acc = tl.full([BLOCK_D], -0.0, tl.float32)
        for p0 in range(lo, hi, BLOCK_M):
            p = p0 + tl.arange(0, BLOCK_M)
            p_mask = p < hi
            g = tl.load(perm_ptr + p, mask=p_mask, other=0)
            rows = row_offset(g, n_div, stride_s, stride_n)
            v = tl.load(x_ptr + rows[:, None] + d_off[None, :],
                        mask=p_mask[:, None] & d_mask[None, :], other=-0.0)  # fmt: skip
            acc += tl.sum(v.to(tl.float32), axis=0)
        mean = tl.div_rn(acc, tl.maximum(hi - lo, 1).to(tl.float32))
        tl.store(out_ptrs, mean.to(out_ptr.dtype.element_ty), mask=d_mask)
    else:  # a copy: no merging, or a row whose only member is its kept token (bitwise, -0.0)
        g = tl.load(kept_ptr + j)
        if LOCAL:
            g += (j // K_DENSE) * n_div
        row = row_offset(g, n_div, stride_s, stride_n)
        tl.store(out_ptrs, tl.load(x_ptr + row + d_off, mask=d_mask), mask=d_mask)
