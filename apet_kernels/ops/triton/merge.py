"""Stage ``merge``: cosine assignment of dropped tokens and the deterministic segmented mean.

``merge_assign_kernel`` is a tiled GEMM ``V (BLOCK_N x D) · Wᵀ (D x BLOCK_K)`` over the kept rows
of the segment with an argmax epilogue: each K-tile's scores are normalized, reduced to a
per-token (max, lowest slot) and folded into a running best, so the ``(N - K) x K`` similarity
matrix never exists in memory. Token norms come from FPS's ``sqnorm`` (no extra pass).

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
    SEG_OUT,
    SEG_TOK,
    local_offset,
    row_offset,
)

COS_EPS = tl.constexpr(1e-12)


@triton.jit
def merge_assign_kernel(
    x_ptr, seg_ptr, blk_ptr, sqnorm_ptr, kept_ptr, assign_ptr,
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
        cos = tl.where(j_mask[None, :], cos, float("-inf"))
        c_best = tl.max(cos, axis=1)
        c_slot = tl.min(tl.where(cos == c_best[:, None], j[None, :], BIG_INDEX), axis=1)
        take = c_best > best  # strict: an earlier tile (lower slots) wins ties
        best_slot = tl.where(take, c_slot, best_slot)
        best = tl.where(take, c_best, best)
    slot = tl.minimum(best_slot, k_s - 1)  # in range even if every score was -inf
    if not LOCAL:
        slot += out0
    tl.store(assign_ptr + tok0 + i, slot, mask=drop)


@triton.jit
def merge_mean_kernel(
    x_ptr, out_ptr, perm_ptr, row_start_ptr, kept_ptr,
    n_div, stride_s, stride_n, stride_d, D, K_DENSE,
    MERGE: tl.constexpr, LOCAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out (R, D)`` in x's dtype, grid ``(R, cdiv(D, BLOCK_D))``.

    ``MERGE``: row j is the fp32 mean of tokens ``perm[row_start[j]:row_start[j+1]]`` (packed
    token indices sorted by slot, then index; the kept token itself is among them). The sum
    starts from -0.0, the identity of fp32 addition, so a row with one member is bitwise that
    member (K = N gives out == x exactly). Otherwise row j copies token ``kept[j]``.
    ``LOCAL``/``K_DENSE``: dense kept indices are local, segment ``j // K_DENSE``.
    """
    j = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    d_off = d.to(tl.int64) * stride_d  # rows are int64 offsets anyway; d * stride_d may pass 2**31
    out_ptrs = out_ptr + j * D + d
    if MERGE:
        lo = tl.load(row_start_ptr + j)
        hi = tl.load(row_start_ptr + j + 1)
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
    else:
        g = tl.load(kept_ptr + j)
        if LOCAL:
            g += (j // K_DENSE) * n_div
        row = row_offset(g, n_div, stride_s, stride_n)
        tl.store(out_ptrs, tl.load(x_ptr + row + d_off, mask=d_mask), mask=d_mask)
