// Stage `residual`: the approximation error of every token from its segment's basis
// (SPEC.md step 2), for segments with m_s < K_s < N_s.
//
// With G + λI = L Lᵀ and y_i = L⁻¹ c_i, α_i = L⁻ᵀ y_i:
//   c_iᵀ α_i = ||y_i||²,  so  e_i² = ||v_i||² - ||y_i||² - λ ||α_i||²  (clamped at 0).
// Everything it needs (c_i = dots[:, i], G = dots at the basis rows, ||v_i||²) came out of `fps`:
// no pass over x. The solve overwrites c_i in `dots` in place (y, then α), one thread per token,
// which keeps every access coalesced in the (m_max, T) layout and needs no per-thread arrays.
#pragma once

#include "common.cuh"

namespace apet {

constexpr int kFactorThreads = 128;
constexpr int kErrorThreads = 256;

__device__ __forceinline__ bool needs_residual(const Segments& seg, int64_t s) {
  return seg.compresses(s) && seg.keep(s) > seg.basis(s);
}

// G + λI and its Cholesky factor, one block per segment (m is small: 10 by default).
// chol: (S, m_max, m_max) float32, lower triangle = L (the upper part is scratch);
// lam: (S,) float32 λ_s. Right-looking factorization: each entry is updated in a fixed k order,
// so the factor is deterministic. SPEC.md's ridge rule: when column k comes up, its pivot
// p_k = A_kk - Σ_{j<k} L_kj² (the updates already applied, in j order) is replaced by
// τ = max(λ, 2^-16 · trace(G)/m) when p_k < τ, so ridge = 0 with a rank-deficient basis stays
// finite; the compare-and-select keeps a NaN pivot NaN, and NaN errors rank as +inf in `select`.
__global__ void residual_factor_kernel(Segments seg, int64_t total_tokens, int max_basis,
                                       float ridge, const float* __restrict__ dots,
                                       const int* __restrict__ basis, float* __restrict__ chol,
                                       float* __restrict__ lam) {
  __shared__ float lam_shared;
  __shared__ float tau_shared;
  const int64_t s = blockIdx.x;
  if (!needs_residual(seg, s)) return;  // block-uniform
  const int m = seg.basis(s);
  const int64_t tok0 = seg.tok0(s);
  const int* b = basis + s * max_basis;
  float* A = chol + s * max_basis * max_basis;  // row stride max_basis
  for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
    const int r = e / m, c = e % m;  // G[r][c] = v_{b_r} · v_{b_c}, symmetrized as the reference
    A[r * max_basis + c] =
        0.5f * (dots[c * total_tokens + tok0 + b[r]] + dots[r * total_tokens + tok0 + b[c]]);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float trace = 0.f;
    for (int r = 0; r < m; ++r) trace += A[r * max_basis + r];
    const float mean_diag = trace / static_cast<float>(m);
    const float l = ridge * mean_diag + kFltMin;
    const float pivot_floor = kPivotFloor * mean_diag;
    lam_shared = l;
    tau_shared = l < pivot_floor ? pivot_floor : l;  // fmaxf would drop a NaN trace
    lam[s] = l;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < m; r += blockDim.x) A[r * max_basis + r] += lam_shared;
  __syncthreads();
  for (int k = 0; k < m; ++k) {
    if (threadIdx.x == 0) {
      const float p = A[k * max_basis + k];
      A[k * max_basis + k] = sqrtf(p < tau_shared ? tau_shared : p);  // NaN < τ is false
    }
    __syncthreads();
    const float pivot = A[k * max_basis + k];
    for (int r = k + 1 + threadIdx.x; r < m; r += blockDim.x) A[r * max_basis + k] /= pivot;
    __syncthreads();
    const int rest = m - k - 1;
    for (int e = threadIdx.x; e < rest * rest; e += blockDim.x) {
      const int r = k + 1 + e / rest, c = k + 1 + e % rest;
      if (c <= r) A[r * max_basis + c] -= A[r * max_basis + k] * A[c * max_basis + k];
    }
    __syncthreads();
  }
}

// e_i² for every token of every segment that needs it. Grid: S * ceil(N_max / 256) blocks.
// dots: (m_max, T) in: c_i, out: α_i (scratch afterwards); err2: (T,) float32.
__global__ void residual_error_kernel(Segments seg, int64_t chunks, int64_t total_tokens,
                                      int max_basis, const float* __restrict__ chol,
                                      const float* __restrict__ lam,
                                      const float* __restrict__ sqnorm, float* __restrict__ dots,
                                      float* __restrict__ err2) {
  const int64_t s = blockIdx.x / chunks;
  const int i = static_cast<int>((blockIdx.x % chunks) * kErrorThreads + threadIdx.x);
  if (!needs_residual(seg, s) || i >= seg.len(s)) return;  // no barriers below
  const int m = seg.basis(s);
  const int64_t tok = seg.tok0(s) + i;
  const float* L = chol + s * max_basis * max_basis;
  float* c = dots + tok;  // c[r * total_tokens] is coordinate r of this token
  float y_sq = 0.f;
  for (int r = 0; r < m; ++r) {  // forward: L y = c
    float acc = c[r * total_tokens];
    for (int k = 0; k < r; ++k) acc -= L[r * max_basis + k] * c[k * total_tokens];
    const float y = acc / L[r * max_basis + r];
    c[r * total_tokens] = y;
    y_sq += y * y;
  }
  float alpha_sq = 0.f;
  for (int r = m - 1; r >= 0; --r) {  // backward: Lᵀ α = y
    float acc = c[r * total_tokens];
    for (int k = r + 1; k < m; ++k) acc -= L[k * max_basis + r] * c[k * total_tokens];
    const float a = acc / L[r * max_basis + r];
    c[r * total_tokens] = a;
    alpha_sq += a * a;
  }
  const float e2 = sqnorm[tok] - y_sq - lam[s] * alpha_sq;
  // "<= 0" also maps -0 to +0 (select orders keys bitwise) and keeps NaN as NaN (clamp_min).
  err2[tok] = e2 <= 0.f ? 0.f : e2;
}

}  // namespace apet
