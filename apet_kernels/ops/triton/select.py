"""Stage ``select``: kept = basis ∪ top-(K - m) errors per segment, ascending, plus own slots.

One program per segment. The top-R threshold (R = K_s - m_s) is found by bisection on the int32
selection keys written by the residual stage (non-negative fp32 bit patterns order like the
floats): 31 halvings of ``[0, bits(+inf)]`` give the largest key τ with ``#{key >= τ} >= R``, and
the count above τ. A radix select would take 4 histogram passes instead of 31 counting passes,
but needs shared-memory histograms that Triton does not express well; a full sort would move
N keys several times. The first BLOCK keys stay in registers across the bisection, so for the
usual segments (N <= BLOCK, e.g. 576 or 729 tokens) the key pass is 31 register reductions; a
longer segment (up to 65536) re-reads its keys from L2 on every halving.

The compaction pass then walks the segment once in index order: a token is kept when it is a
basis token, its key is above τ, or it is among the first ``R - #{key > τ}`` tokens with key
τ (ties: lowest index). Prefix sums give each kept token its slot, so ``kept`` comes out
ascending with no sort.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fps import SEG_COLS, SEG_KEEP, SEG_LEN, SEG_M, SEG_OUT, SEG_TOK

KEY_INF = tl.constexpr(0x7F800000)  # bits of +inf: the largest key
KEY_NONE = tl.constexpr(0x7FFFFFFF)  # a threshold above every key: "select none by error"


@triton.jit
def _count_at_least(key_ptr, tok0, n_s, first_keys, thr, BLOCK: tl.constexpr):
    """``#{key >= thr}`` over the segment; ``first_keys`` holds keys [0, BLOCK) in registers."""
    count = tl.sum((first_keys >= thr).to(tl.int32), axis=0)
    for n0 in range(BLOCK, n_s, BLOCK):
        i = n0 + tl.arange(0, BLOCK)
        keys = tl.load(key_ptr + tok0 + i, mask=i < n_s, other=-1)
        count += tl.sum((keys >= thr).to(tl.int32), axis=0)
    return count


@triton.jit(do_not_specialize=["M_MAX"])
def select_kernel(
    seg_ptr, key_ptr, basis_ptr, kept_ptr, assign_ptr, M_MAX,
    LOCAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Writes ``kept`` (ΣK_s,) int64 ascending and ``assign`` (T,) int64 (own slot or -1).

    ``LOCAL`` (dense op): kept holds token indices within the segment and assign holds slots
    within the segment; otherwise (varlen) global rows of x and global output rows.
    Grid ``(S,)``.
    """
    s = tl.program_id(0).to(tl.int64)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    n_s = tl.load(seg_ptr + s * SEG_COLS + SEG_LEN).to(tl.int32)
    out0 = tl.load(seg_ptr + s * SEG_COLS + SEG_OUT)
    k_s = tl.load(seg_ptr + s * SEG_COLS + SEG_KEEP)
    m_s = tl.load(seg_ptr + s * SEG_COLS + SEG_M).to(tl.int32)
    if n_s == 0:
        return
    ranked = k_s - m_s  # tokens chosen by error (0 when K_s <= M)
    n_keys = tl.where(ranked > 0, n_s, 0)  # keys exist only where the residual ran
    lane = tl.arange(0, BLOCK)
    first_keys = tl.load(key_ptr + tok0 + lane, mask=lane < n_keys, other=-1)
    lo = tl.zeros([], dtype=tl.int32)  # invariant: #{key >= lo} >= ranked
    hi = tl.full([], KEY_INF + 1, tl.int32)  # invariant: #{key >= hi} < ranked
    count_hi = tl.zeros([], dtype=tl.int32)
    for _ in range(tl.where(ranked > 0, 31, 0)):  # 2**31 > KEY_INF + 1: 31 halvings reach 1
        mid = lo + (hi - lo) // 2
        count = _count_at_least(key_ptr, tok0, n_s, first_keys, mid, BLOCK)
        at_least = count >= ranked
        lo = tl.where(at_least, mid, lo)
        count_hi = tl.where(at_least, count_hi, count)
        hi = tl.where(at_least, hi, mid)
    tau = tl.where(ranked > 0, lo, KEY_NONE)
    ties_needed = ranked - count_hi  # >= 1 when ranked > 0

    kept_before = tl.zeros([], dtype=tl.int32)
    ties_before = tl.zeros([], dtype=tl.int32)
    for n0 in range(0, n_s, BLOCK):
        i = (n0 + lane).to(tl.int32)
        i_mask = i < n_s
        is_basis = tl.zeros([BLOCK], dtype=tl.int1)
        for t in range(m_s):  # a run-time loop: unrolling it over m_max bloats the kernel
            is_basis = is_basis | (i == tl.load(basis_ptr + s * M_MAX + t).to(tl.int32))
        keys = tl.load(key_ptr + tok0 + i, mask=i < n_keys, other=-1)
        tie = (keys == tau).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        keep = is_basis | (keys > tau) | ((tie > 0) & (tie_rank < ties_needed))
        keep = (keep & i_mask).to(tl.int32)
        slot = kept_before + tl.cumsum(keep, axis=0) - keep
        # Exactly K_s tokens are kept by construction; the bound only guarantees that no input
        # (NaN keys included) can write outside this segment's rows.
        store = (keep > 0) & (slot < k_s)
        if LOCAL:
            tl.store(kept_ptr + out0 + slot, i, mask=store)
        else:
            tl.store(kept_ptr + out0 + slot, tok0 + i, mask=store)
            slot += out0
        tl.store(assign_ptr + tok0 + i, tl.where(keep > 0, slot, -1), mask=i_mask)
        kept_before += tl.sum(keep, axis=0)
        ties_before += tl.sum(tie, axis=0)
