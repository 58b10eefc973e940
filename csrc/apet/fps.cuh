// Stage `fps`: farthest point sampling of the basis (SPEC.md step 1), per segment.
//
// Every FPS step is one launch spread over (segments x token chunks) blocks instead of one block
// per segment: a segment of 577 tokens is 10 blocks of 64 tokens, so even S = 1 keeps several
// SMs busy. Each block also emits the argmax of its chunk; the next launch reduces those few
// partials redundantly in every block (<= a few hundred floats) to learn the pick, which saves a
// separate reduction launch per step. Partials are double-buffered because step t reads the
// buffer step t-1 wrote while it writes its own.
//
// The same passes produce the per-token squared norms (for the residual identity and the merge
// cosine) and the dot products v_i · v_{b_t} (c_i of the solve; G at the basis rows), so the
// residual stage needs no second pass over x.
//
// Token state kept in `dist` (float, one per token):
//   -inf      the token is a basis token already (the "chosen" mask of the reference);
//   NaN       some distance was NaN: it ranks as +inf, and stays NaN under min like torch.minimum;
//   otherwise min_{s<t} ||v_i - v_{b_s}||^2 (at t = 0: ||v_i - mean||^2).
#pragma once

#include "common.cuh"

namespace apet {

constexpr int kFpsThreads = 256;          // 8 warps, one token per warp at a time
constexpr int kFpsTokens = 64;            // tokens per block (8 per warp)
constexpr int kMeanColumns = kWarp;       // fps_mean_kernel: 32 columns x 8 row groups
constexpr int kMeanRows = kFpsThreads / kWarp;

// The FPS score of one token: NaN ranks as +inf, chosen tokens as -inf (never picked again).
__device__ __forceinline__ float fps_score(float dist) { return isnan(dist) ? INFINITY : dist; }

// Block-wide argmax of per-warp partials, written by thread 0 to `partial[slot]`.
__device__ __forceinline__ void block_argmax_store(ArgMax mine, float* partial_value,
                                                   int* partial_index, int64_t slot) {
  __shared__ ArgMax warp_best[kFpsThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  mine = warp_argmax(mine);
  if (lane == 0) warp_best[warp] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    ArgMax best = warp_best[0];
    for (int w = 1; w < kFpsThreads / kWarp; ++w) best = argmax_combine(best, warp_best[w]);
    partial_value[slot] = best.value;
    partial_index[slot] = best.index;
  }
}

// Mean of each compressing segment's tokens.
// Grid: S * ceil(D / 32) blocks of 256 threads; mean: (S, D) float32.
template <typename T>
__global__ void fps_mean_kernel(const T* __restrict__ x, int64_t dim, Segments seg,
                                float* __restrict__ mean) {
  __shared__ float partial[kMeanRows][kMeanColumns];
  const int64_t col_blocks = ceil_div(dim, kMeanColumns);
  const int64_t s = blockIdx.x / col_blocks;
  if (!seg.compresses(s)) return;
  const int64_t col = (blockIdx.x % col_blocks) * kMeanColumns + threadIdx.x % kMeanColumns;
  const int row = threadIdx.x / kMeanColumns;
  const int n = seg.len(s);
  const T* base = x + seg.tok0(s) * dim;
  float sum = 0.f;
  if (col < dim)
    for (int i = row; i < n; i += kMeanRows) sum += to_float(base[i * dim + col]);
  partial[row][threadIdx.x % kMeanColumns] = sum;
  __syncthreads();
  if (row == 0 && col < dim) {
    float total = 0.f;
    for (int r = 0; r < kMeanRows; ++r) total += partial[r][threadIdx.x];  // fixed order
    mean[s * dim + col] = total / static_cast<float>(n);
  }
}

// Squared norms and the step-0 score ||v_i - mean||^2; emits the chunk argmax for pick 0.
// Grid: S * chunks blocks of 256 threads (chunks = ceil(N_max / 64)).
// sqnorm, dist: (T,) float32; partial_*: (S * chunks,).
template <typename T>
__global__ void fps_init_kernel(const T* __restrict__ x, int64_t dim, Segments seg, int64_t chunks,
                                const float* __restrict__ mean, float* __restrict__ sqnorm,
                                float* __restrict__ dist, float* __restrict__ partial_value,
                                int* __restrict__ partial_index) {
  const int64_t s = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int n = seg.len(s);
  const int begin = static_cast<int>(chunk * kFpsTokens);
  if (!seg.compresses(s) || begin >= n) return;  // block-uniform: before any barrier
  const int end = begin + kFpsTokens < n ? begin + kFpsTokens : n;
  const int lane = threadIdx.x % kWarp;
  const int64_t tok0 = seg.tok0(s);
  const float* mu = mean + s * dim;
  ArgMax best = argmax_identity();
  for (int i = begin + static_cast<int>(threadIdx.x / kWarp); i < end; i += kFpsThreads / kWarp) {
    const T* v = x + (tok0 + i) * dim;
    float sq = 0.f, d = 0.f;
    for (int64_t c = lane; c < dim; c += kWarp) {
      const float a = to_float(v[c]);
      const float diff = a - mu[c];
      sq += a * a;
      d += diff * diff;
    }
    sq = warp_sum(sq);
    d = warp_sum(d);
    if (lane == 0) {
      sqnorm[tok0 + i] = sq;
      dist[tok0 + i] = d;
    }
    const float score = fps_score(d);
    if (beats(score, i, best)) best = {score, i};
  }
  block_argmax_store(best, partial_value, partial_index, s * chunks + chunk);
}

// FPS step t: reduce the partials of step t-1 to the pick b_t, record it, compute
// dots[t][i] = v_i · v_{b_t} and ||v_i - v_{b_t}||^2 (a direct difference, so duplicates give
// exact zeros), fold it into dist, and emit the chunk argmax for pick t+1 (if any).
// Grid: S * chunks blocks of 256 threads.
// dots: (m_max, T) float32 (token-minor, so per-token loops in `residual` are coalesced);
// basis: (S, m_max) int32 local indices in pick order; state: (T,) uint8, kBasis at basis tokens.
template <typename T>
__global__ void fps_step_kernel(const T* __restrict__ x, int64_t dim, Segments seg, int64_t chunks,
                                int t, int64_t total_tokens, int max_basis,
                                float* __restrict__ dist, float* __restrict__ dots,
                                const float* __restrict__ in_value,
                                const int* __restrict__ in_index,
                                float* __restrict__ out_value, int* __restrict__ out_index,
                                int* __restrict__ basis, uint8_t* __restrict__ state) {
  __shared__ int pick_shared;
  const int64_t s = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int n = seg.len(s);
  const int begin = static_cast<int>(chunk * kFpsTokens);
  if (!seg.compresses(s) || t >= seg.basis(s) || begin >= n) return;  // block-uniform
  const int end = begin + kFpsTokens < n ? begin + kFpsTokens : n;
  const int lane = threadIdx.x % kWarp;
  const int64_t tok0 = seg.tok0(s);

  if (threadIdx.x < kWarp) {  // warp 0 learns the pick from the previous step's partials
    ArgMax best = argmax_identity();
    const int64_t used = ceil_div(n, kFpsTokens);
    for (int64_t c = lane; c < used; c += kWarp) {
      const ArgMax p = {in_value[s * chunks + c], in_index[s * chunks + c]};
      best = argmax_combine(best, p);
    }
    best = warp_argmax(best);
    if (lane == 0) pick_shared = best.index;
  }
  __syncthreads();
  // Some unchosen token always scores >= 0 (m_s < N_s), so the pick is a real index; the clamp
  // only guarantees in-bounds reads should that invariant ever break.
  const int pick = pick_shared < n ? pick_shared : 0;
  if (threadIdx.x == 0) {
    if (chunk == 0) basis[s * max_basis + t] = pick;
    if (pick >= begin && pick < end) state[tok0 + pick] = kBasis;
  }

  const T* b = x + (tok0 + pick) * dim;
  const bool last = t + 1 >= seg.basis(s);
  ArgMax best = argmax_identity();
  for (int i = begin + static_cast<int>(threadIdx.x / kWarp); i < end; i += kFpsThreads / kWarp) {
    const T* v = x + (tok0 + i) * dim;
    float dot = 0.f, d = 0.f;
    for (int64_t c = lane; c < dim; c += kWarp) {
      const float a = to_float(v[c]);
      const float bc = to_float(b[c]);
      const float diff = a - bc;
      dot += a * bc;
      d += diff * diff;
    }
    dot = warp_sum(dot);
    d = warp_sum(d);
    // Lane 0 owns this token's dist (one reader-writer, no intra-warp race) and broadcasts it.
    float next = 0.f;
    if (lane == 0) {
      const float old = dist[tok0 + i];
      if (i == pick || old == -INFINITY) next = -INFINITY;  // chosen: out of every later argmax
      else if (t == 0) next = d;                            // replaces the distance to the mean
      else if (isnan(old) || isnan(d)) next = NAN;          // torch.minimum propagates NaN
      else next = fminf(old, d);
      dots[t * total_tokens + tok0 + i] = dot;
      dist[tok0 + i] = next;
    }
    next = __shfl_sync(kFullMask, next, 0);
    if (!last && beats(fps_score(next), i, best)) best = {fps_score(next), i};
  }
  if (!last) block_argmax_store(best, out_value, out_index, s * chunks + chunk);
}

}  // namespace apet
