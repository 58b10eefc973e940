// Stage `select`: kept = basis ∪ the (K - m) non-basis tokens with the largest errors, ascending
// (SPEC.md step 3); also writes `kept`, the kept tokens' `assign` and the dropped-token list.
//
// One block per segment. The (K - m)-th largest error is found by an exact 4-pass radix select
// on 32-bit ordered keys (shared-memory int histograms: exact counts, so deterministic); ties at
// the threshold go to the lowest indices through a block scan in index order. Then one more scan
// in index order numbers the kept tokens (their output slot) and the dropped ones (their place
// in the merge work list). Selection is O(N) per segment; it is a few passes over N floats.
#pragma once

#include "common.cuh"

namespace apet {

constexpr int kSelectThreads = 512;

// Marks the `extra` highest-scoring non-basis tokens of a segment as kSelected.
// score(i) = err2 with NaN as +inf; ties at the threshold resolved to the lowest indices.
__device__ __forceinline__ void select_top_errors(const float* __restrict__ err2,
                                                  uint8_t* __restrict__ state, int n,
                                                  int extra) {
  __shared__ int hist[256];
  __shared__ uint32_t prefix_shared;
  __shared__ int remaining_shared;
  uint32_t prefix = 0, mask = 0;
  int remaining = extra;  // how many still to take at or below the current prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      if (state[i] != kDropped) continue;
      const float e = err2[i];
      const uint32_t key = ordered_key(isnan(e) ? INFINITY : e);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, digit = 255;
      for (; digit > 0; --digit) {  // highest digit whose bucket reaches `remaining`
        if (above + hist[digit] >= remaining) break;
        above += hist[digit];
      }
      prefix_shared = prefix | (static_cast<uint32_t>(digit) << shift);
      remaining_shared = remaining - above;
    }
    __syncthreads();
    prefix = prefix_shared;
    remaining = remaining_shared;
    mask |= 255u << shift;
  }
  // prefix is now the exact key of the extra-th largest score; take every key above it and the
  // first `remaining` keys equal to it in index order.
  int taken_equal = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + static_cast<int>(threadIdx.x);
    uint32_t key = 0;
    bool candidate = false;
    if (i < n && state[i] == kDropped) {
      const float e = err2[i];
      key = ordered_key(isnan(e) ? INFINITY : e);
      candidate = true;
    }
    int equal_total;
    const int equal_before = block_exclusive_sum(candidate && key == prefix ? 1 : 0, &equal_total);
    if (candidate && (key > prefix || (key == prefix && taken_equal + equal_before < remaining)))
      state[i] = kSelected;
    taken_equal += equal_total;
  }
  __syncthreads();  // state writes visible to the numbering pass
}

// One block (512 threads) per segment.
// kept: (ΣK,) int64 token index (global row of x when global_ids, else local);
// kept_local: (ΣK,) int32 local token index; assign: (T,) int64 output slot for kept tokens
// (global output row when global_ids), -1 for dropped tokens (merge overwrites them);
// drop_list: (T - ΣK,) int32 local indices of dropped tokens, ascending, at drop0(s).
__global__ void select_kernel(Segments seg, const float* __restrict__ err2,
                              uint8_t* __restrict__ state, bool global_ids,
                              int64_t* __restrict__ kept, int* __restrict__ kept_local,
                              int64_t* __restrict__ assign, int* __restrict__ drop_list) {
  const int64_t s = blockIdx.x;
  const int n = seg.len(s);
  if (n == 0) return;  // block-uniform
  const int64_t tok0 = seg.tok0(s), out0 = seg.out0(s), drop0 = seg.drop0(s);
  const int keep = seg.keep(s);
  const bool all_kept = keep >= n;
  const int extra = keep - seg.basis(s);
  if (!all_kept && extra > 0) select_top_errors(err2 + tok0, state + tok0, n, extra);
  const int64_t kept_offset = global_ids ? tok0 : 0;
  const int64_t slot_offset = global_ids ? out0 : 0;
  int slots_before = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + static_cast<int>(threadIdx.x);
    const bool is_kept = i < n && (all_kept || state[tok0 + i] != kDropped);
    int chunk_kept;
    const int slot = slots_before + block_exclusive_sum(is_kept ? 1 : 0, &chunk_kept);
    // Exactly K_s tokens are kept (m_s distinct basis picks + extra selected), so slots stay in
    // [0, K_s) and dropped ranks in [0, N_s - K_s); the bounds only guard that invariant.
    if (i < n && is_kept && slot < keep) {
      kept[out0 + slot] = kept_offset + i;
      kept_local[out0 + slot] = i;
      assign[tok0 + i] = slot_offset + slot;
    } else if (i < n && !is_kept && i - slot < n - keep) {
      drop_list[drop0 + (i - slot)] = i;  // i - slot = dropped tokens before i
      assign[tok0 + i] = -1;
    }
    slots_before += chunk_kept;
  }
}

}  // namespace apet
