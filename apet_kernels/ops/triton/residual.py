"""Stage ``residual``: ridge-regularized Gram solve and the per-token approximation error.

Reads only what FPS left behind (``sqnorm``, ``dots``, ``basis``), never x. Each token-block
program gathers its segment's ``G = dots[:, basis]`` (m x m), factors ``G + λI`` by Cholesky in
registers (m <= 16 in practice: redundant per block, and far cheaper than a launch that would
share it), then solves for its tokens with one forward and one backward substitution:

    y = L^-1 c_i,  α_i = L^-T y,  e_i^2 = ||v_i||^2 - ||y||^2 - λ ||α_i||^2   (c_iᵀα_i = ||y||^2)

clamped at 0 and stored as a *selection key*: the fp32 bit pattern of the error viewed as int32,
which orders like the float for values >= 0 (NaN maps to +inf, the reference's ranking; basis
tokens get -1 so they never rank). The select stage thresholds these keys directly.

The factor and substitution loops run ``m_s`` times at run time over ``(MP, MP)`` and
``(BLOCK_N, MP)`` register tiles (MP = m_max rounded up to a power of two); slots ``>= m_s``
stay zero and take no part. They are deliberately not unrolled: unrolled over MP, the kernel took
611 s to compile for sm_90 at MP = 64 (num_basis 33..64) on a 2-core CPU, now about 1 s.
Divisions are IEEE (``div_rn``) so the compiled kernel rounds like the interpreter (fp32 ``/``
lowers to ``div.full.f32``, up to 2 ulp off).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fps import SEG_COLS, SEG_KEEP, SEG_LEN, SEG_M, SEG_TOK

FLT_MIN = tl.constexpr(1.17549435e-38)
PIVOT_SCALE = tl.constexpr(2.0**-16)  # the ridge rule's relative pivot floor


@triton.jit
def _pick(mat, r, j, axis: tl.constexpr):
    """Column ``j`` (axis=1: one value per row) or row ``j`` (axis=0) of a register tile, where
    ``r`` indexes the dimension being selected. Register tiles cannot be indexed directly."""
    if axis == 1:
        return tl.sum(tl.where(r[None, :] == j, mat, 0.0), axis=1)
    else:
        return tl.sum(tl.where(r[:, None] == j, mat, 0.0), axis=0)


@triton.jit
def _cholesky(a, m, floor, MP: tl.constexpr):
    """Lower Cholesky factor of the leading ``m x m`` block of the SPD ``a (MP, MP)``
    (right-looking, in registers); rows and columns ``>= m`` of the factor are zero.

    The ridge rule (docs/SPEC.md): columns in order j = 0..m-1, and a pivot
    ``p_j = A_jj - Σ_{k<j} L_jk²`` below ``floor`` (τ) is replaced by τ. A pivot of ``G + λI``
    with G PSD is mathematically ``>= λ``; fp32 rounding on rank-deficient bases (duplicate
    tokens) can push it below, or to 0 when ridge = 0, and τ keeps L finite and well scaled. The
    rule is a compare-and-select, not ``tl.maximum``, so a NaN pivot stays NaN on the GPU too
    (PTX ``max.f32`` would drop it).
    """
    r = tl.arange(0, MP)
    lower = tl.zeros([MP, MP], dtype=tl.float32)
    for j in range(m):
        col = _pick(a, r, j, 1)
        piv = tl.sum(tl.where(r == j, col, 0.0), axis=0)
        piv = tl.where(piv < floor, floor, piv)
        d = tl.sqrt_rn(piv)
        lcol = tl.where(r > j, tl.div_rn(col, d), 0.0)
        lcol = tl.where(r == j, d, lcol)
        lower = tl.where(r[None, :] == j, lcol[:, None], lower)
        a = a - lcol[:, None] * lcol[None, :]  # Schur complement: only entries > j are used later
    return lower


@triton.jit(do_not_specialize=["T", "M_MAX"])
def residual_kernel(
    seg_ptr, blk_ptr, sqnorm_ptr, dots_ptr, basis_ptr, key_ptr,
    ridge, T, M_MAX,
    MP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Selection keys ``key (T,)`` int32 over a 1-D grid of token blocks.

    Segments with ``K_s <= m_s`` keep only their basis: they skip the solve and their keys are
    never read. Slots ``t >= m_s`` (segments with fewer basis tokens than MP) hold zeros in the
    factor and the solution, so they change nothing.
    """
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(blk_ptr + pid * 2)
    local0 = tl.load(blk_ptr + pid * 2 + 1).to(tl.int32)
    tok0 = tl.load(seg_ptr + s * SEG_COLS + SEG_TOK)
    n_s = tl.load(seg_ptr + s * SEG_COLS + SEG_LEN).to(tl.int32)
    k_s = tl.load(seg_ptr + s * SEG_COLS + SEG_KEEP)
    m_s = tl.load(seg_ptr + s * SEG_COLS + SEG_M).to(tl.int32)
    if k_s <= m_s:
        return
    r = tl.arange(0, MP)
    r_valid = r < m_s
    basis = tl.load(basis_ptr + s * M_MAX + r, mask=r_valid, other=0).to(tl.int32)
    pair = r_valid[:, None] & r_valid[None, :]
    col = r.to(tl.int64) * T  # dots is (m_max, T): int64, m_max * T may pass 2**31
    # G[t, u] = v_{b_t} · v_{b_u} = dots[u, b_t]; symmetrized because the two halves come from
    # different FPS steps (as in the reference).
    gram = tl.load(dots_ptr + col[None, :] + (tok0 + basis)[:, None], mask=pair, other=0.0)
    gram = 0.5 * (gram + tl.trans(gram))
    trace = tl.sum(tl.sum(tl.where(r[:, None] == r[None, :], gram, 0.0), axis=1), axis=0)
    lam = tl.div_rn(ridge * trace, m_s.to(tl.float32)) + FLT_MIN
    # Pivot floor τ = max(λ, 2^-16 · trace(G)/m): λ for the default ridge, and a floor scaled
    # with the basis when ridge is 0 (λ = FLT_MIN alone would let a rank-deficient basis blow
    # α up). Scaling by 2^-16 is exact; compare-and-select keeps a NaN trace NaN.
    scaled = tl.div_rn(trace, m_s.to(tl.float32)) * PIVOT_SCALE
    floor = tl.where(scaled > lam, scaled, lam)
    system = gram + tl.where((r[:, None] == r[None, :]) & pair, lam, 0.0)
    lower = _cholesky(system, m_s, floor, MP)

    i = local0 + tl.arange(0, BLOCK_N)
    i_mask = i < n_s
    c = tl.load(dots_ptr + col[None, :] + (tok0 + i)[:, None],
                mask=i_mask[:, None] & r_valid[None, :], other=0.0)  # fmt: skip
    y = tl.zeros([BLOCK_N, MP], dtype=tl.float32)
    for j in range(m_s):  # forward: L y = c
        lrow = _pick(lower, r, j, 0)
        ljj = tl.sum(tl.where(r == j, lrow, 0.0), axis=0)
        yj = tl.div_rn(_pick(c, r, j, 1) - tl.sum(y * lrow[None, :], axis=1), ljj)
        y = tl.where(r[None, :] == j, yj[:, None], y)
    z = tl.zeros([BLOCK_N, MP], dtype=tl.float32)
    for jj in range(m_s):  # backward: Lᵀ α = y
        j = m_s - 1 - jj
        lcol = _pick(lower, r, j, 1)
        ljj = tl.sum(tl.where(r == j, lcol, 0.0), axis=0)
        zj = tl.div_rn(_pick(y, r, j, 1) - tl.sum(z * lcol[None, :], axis=1), ljj)
        z = tl.where(r[None, :] == j, zj[:, None], z)
    sqnorm = tl.load(sqnorm_ptr + tok0 + i, mask=i_mask, other=0.0)
    err2 = sqnorm - tl.sum(y * y, axis=1) - lam * tl.sum(z * z, axis=1)
    err2 = tl.where(err2 != err2, float("inf"), err2)  # NaN ranks as +inf
    err2 = tl.where(err2 > 0.0, err2, 0.0)  # clamp at 0; also maps -0.0 to +0.0 for the key
    key = err2.to(tl.int32, bitcast=True)
    is_basis = tl.max(((i[:, None] == basis[None, :]) & r_valid[None, :]).to(tl.int32), axis=1)
    key = tl.where(is_basis > 0, -1, key)
    tl.store(key_ptr + tok0 + i, key, mask=i_mask)
