// Stage `merge`: each dropped token goes to the kept token of highest cosine similarity, and each
// output row is the uniform mean of its kept token and the dropped tokens assigned to it
// (SPEC.md step 4).
//
//  merge_assign_kernel  a tiled fp32 GEMM (dropped rows x kept columns, depth D) whose epilogue
//                       divides by the norm product and keeps a running argmax per row: the
//                       (N-K) x K similarity matrix is never written, let alone (N-K) x K x D.
//  merge_bucket_kernel  a stable counting sort of the dropped tokens by slot (int histogram,
//                       scan, then one warp placing tokens in index order with __match_any_sync).
//  merge_mean_kernel    one block per output row sums its kept token and its bucket in index
//                       order and divides: the result does not depend on scheduling (no float
//                       atomics), so it is bitwise reproducible.
#pragma once

#include "common.cuh"

namespace apet {

constexpr int kTileRows = 64;  // dropped tokens per block
constexpr int kTileCols = 64;  // kept slots per column tile
constexpr int kTileDepth = 16;
constexpr int kAssignThreads = 256;  // 16 x 16 threads, a 4 x 4 micro-tile each
constexpr int kMicro = 4;
constexpr int kBucketThreads = 256;
constexpr int kMeanThreads = 128;

static_assert(kTileRows == 16 * kMicro && kTileCols == 16 * kMicro, "16 x 16 thread grid");
static_assert(kTileRows * kTileDepth == kMicro * kAssignThreads, "4 tile loads per thread");

// Grid: S * ceil(max_drop / 64) blocks of 256 threads. Writes assign (T,) int64 for every
// dropped token: its local slot, or its global output row when global_ids.
// sqnorm: (T,) float32 from fps; kept_local: (ΣK,) int32; drop_list: (T - ΣK,) int32.
template <typename T>
__global__ void merge_assign_kernel(const T* __restrict__ x, int64_t dim, Segments seg,
                                    int64_t row_tiles, const float* __restrict__ sqnorm,
                                    const int* __restrict__ kept_local,
                                    const int* __restrict__ drop_list, bool global_ids,
                                    int64_t* __restrict__ assign) {
  // Depth-major tiles: the inner loop reads a row of each, conflict-free.
  __shared__ float a_tile[kTileDepth][kTileRows];
  __shared__ float b_tile[kTileDepth][kTileCols];
  __shared__ int row_tok[kTileRows];
  __shared__ float row_norm[kTileRows];
  __shared__ int col_tok[kTileCols];
  __shared__ float col_norm[kTileCols];

  const int64_t s = blockIdx.x / row_tiles;
  const int n = seg.len(s), k = seg.keep(s);
  const int row0 = static_cast<int>((blockIdx.x % row_tiles) * kTileRows);
  if (!seg.compresses(s) || row0 >= n - k) return;  // block-uniform
  const int rows = n - k - row0 < kTileRows ? n - k - row0 : kTileRows;
  const int64_t tok0 = seg.tok0(s), out0 = seg.out0(s);
  const T* xs = x + tok0 * dim;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  if (threadIdx.x < kTileRows) {
    const int r = threadIdx.x;
    const int tok = r < rows ? drop_list[seg.drop0(s) + row0 + r] : -1;
    row_tok[r] = tok;
    row_norm[r] = tok >= 0 ? sqrtf(sqnorm[tok0 + tok]) : 0.f;
  }
  ArgMax best[kMicro];
  for (int i = 0; i < kMicro; ++i) best[i] = argmax_identity();

  for (int col0 = 0; col0 < k; col0 += kTileCols) {
    __syncthreads();  // the previous column tile is fully consumed
    if (threadIdx.x < kTileCols) {
      const int c = col0 + static_cast<int>(threadIdx.x);
      const int tok = c < k ? kept_local[out0 + c] : -1;
      col_tok[threadIdx.x] = tok;
      col_norm[threadIdx.x] = tok >= 0 ? sqrtf(sqnorm[tok0 + tok]) : 0.f;
    }
    __syncthreads();
    float acc[kMicro][kMicro] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kTileDepth) {
      for (int q = 0; q < kMicro; ++q) {  // 16 consecutive threads read 16 consecutive features
        const int e = static_cast<int>(threadIdx.x) + q * kAssignThreads;
        const int r = e / kTileDepth, d = e % kTileDepth;
        const bool in_dim = d0 + d < dim;
        const int rt = row_tok[r], ct = col_tok[r];
        a_tile[d][r] = rt >= 0 && in_dim ? to_float(xs[rt * dim + d0 + d]) : 0.f;
        b_tile[d][r] = ct >= 0 && in_dim ? to_float(xs[ct * dim + d0 + d]) : 0.f;
      }
      __syncthreads();
      for (int d = 0; d < kTileDepth; ++d) {
        float a[kMicro], b[kMicro];
        for (int i = 0; i < kMicro; ++i) a[i] = a_tile[d][ty + 16 * i];
        for (int j = 0; j < kMicro; ++j) b[j] = b_tile[d][tx + 16 * j];
        for (int i = 0; i < kMicro; ++i)
          for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();
    }
    for (int i = 0; i < kMicro; ++i) {
      const int r = ty + 16 * i;
      for (int j = 0; j < kMicro; ++j) {
        const int c = tx + 16 * j;
        const int slot = col0 + c;
        if (r >= rows || slot >= k) continue;
        float denom = row_norm[r] * col_norm[c];
        denom = denom < kCosEps ? kCosEps : denom;  // clamp_min: NaN stays NaN
        float cosine = acc[i][j] / denom;
        if (isnan(cosine)) cosine = -INFINITY;  // NaN never wins the merge argmax
        if (beats(cosine, slot, best[i])) best[i] = {cosine, slot};
      }
    }
  }
  // The 16 threads of a row are one half-warp (threadIdx = 16 ty + tx): xor offsets < 16 stay in
  // it, and the (value, slot) order is total, so the winner does not depend on the tree.
  const int64_t slot_offset = global_ids ? out0 : 0;
  for (int i = 0; i < kMicro; ++i) {
    ArgMax b = best[i];
    for (int offset = 8; offset > 0; offset /= 2) {
      ArgMax other;
      other.value = __shfl_xor_sync(kFullMask, b.value, offset);
      other.index = __shfl_xor_sync(kFullMask, b.index, offset);
      b = argmax_combine(b, other);
    }
    const int r = ty + 16 * i;
    if (tx == 0 && r < rows) assign[tok0 + row_tok[r]] = slot_offset + b.index;
  }
}

// Stable counting sort of each segment's dropped tokens by assigned slot. One block per segment.
// count: (ΣK,) int32 tokens merged into each output row (zero for segments that keep all);
// cursor: (ΣK,) int32, on exit the end of each row's run in `order`;
// order: (T - ΣK,) int32 local token indices, grouped by slot, ascending within a slot.
__global__ void merge_bucket_kernel(Segments seg, const int* __restrict__ drop_list,
                                    const int64_t* __restrict__ assign, bool global_ids,
                                    int* __restrict__ count, int* __restrict__ cursor,
                                    int* __restrict__ order) {
  const int64_t s = blockIdx.x;
  const int k = seg.keep(s);
  const int dropped = seg.len(s) - k;
  const int64_t tok0 = seg.tok0(s), out0 = seg.out0(s), drop0 = seg.drop0(s);
  const int64_t slot_offset = global_ids ? out0 : 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) count[out0 + j] = 0;
  if (dropped <= 0) return;  // block-uniform
  __syncthreads();
  for (int r = threadIdx.x; r < dropped; r += blockDim.x) {
    const int64_t slot = assign[tok0 + drop_list[drop0 + r]] - slot_offset;
    atomicAdd(&count[out0 + slot], 1);  // integer: the totals are exact in any order
  }
  __syncthreads();
  int before = 0;
  for (int base = 0; base < k; base += blockDim.x) {
    const int j = base + static_cast<int>(threadIdx.x);
    int chunk_total;
    const int start = before + block_exclusive_sum(j < k ? count[out0 + j] : 0, &chunk_total);
    if (j < k) cursor[out0 + j] = start;
    before += chunk_total;
  }
  __syncthreads();
  if (threadIdx.x >= kWarp) return;  // one warp places tokens in index order: a stable sort
  const int lane = threadIdx.x;
  for (int base = 0; base < dropped; base += kWarp) {
    const int r = base + lane;
    const bool valid = r < dropped;
    const int tok = valid ? drop_list[drop0 + r] : -1;
    // Lanes past the end get distinct negative keys so they group with nobody.
    const int slot = valid ? static_cast<int>(assign[tok0 + tok] - slot_offset) : -1 - lane;
    const unsigned peers = __match_any_sync(kFullMask, slot);
    const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier lanes with the same slot
    const int start = valid ? cursor[out0 + slot] : 0;
    __syncwarp();  // everyone read the cursor before its owner advances it
    if (valid) {
      order[drop0 + start + rank] = tok;
      if (rank == 0) cursor[out0 + slot] = start + __popc(peers);
    }
    __syncwarp();
  }
}

// Output rows. Grid: ΣK blocks of 128 threads, one per output row.
// out: (ΣK, D) in x's dtype. Without merging (count == nullptr), out = the kept rows; with
// count[j] = 0 the row is also an exact copy (x -> float -> x round-trips), which gives SPEC.md's
// bitwise K = N case.
template <typename T>
__global__ void merge_mean_kernel(const T* __restrict__ x, int64_t dim, Segments seg,
                                  const int* __restrict__ kept_local,
                                  const int* __restrict__ count, const int* __restrict__ cursor,
                                  const int* __restrict__ order, T* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t s = segment_of_output(seg, row);
  const T* xs = x + seg.tok0(s) * dim;
  const int* bucket = order + seg.drop0(s);
  const int64_t tok = kept_local[row];
  const int merged = count != nullptr ? count[row] : 0;
  const int end = merged > 0 ? cursor[row] : 0;
  const float denom = static_cast<float>(1 + merged);  // a division, as the reference's mean
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float acc = to_float(xs[tok * dim + c]);
    for (int r = end - merged; r < end; ++r) acc += to_float(xs[bucket[r] * dim + c]);
    out[row * dim + c] = from_float<T>(acc / denom);
  }
}

}  // namespace apet
