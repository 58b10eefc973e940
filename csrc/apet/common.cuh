// Shared pieces of the CUDA backend: segment layout, dtype conversion, deterministic reductions.
//
// Torch-free on purpose: the kernels compile with plain nvcc (tests/ops/test_cuda.py does so for
// sm_80 and sm_90), and with APET_EMULATION defined they compile with a host C++ compiler against
// csrc/emu/cuda_emu.h, which runs every block on CPU fibers so the kernel logic can be checked
// against the reference without a GPU. For that the kernels use only 1-D launches, static
// __shared__ arrays, full-warp collectives and APET_LAUNCH.
#pragma once

#include <cstdint>

#ifndef APET_EMULATION
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef APET_EMULATION
// Every launch goes through these macros so that the emulator can run it on the host.
// 1-D grids only; callers never pass an empty grid.
#define APET_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<static_cast<unsigned>(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define APET_LAST_ERROR() cudaGetLastError()
#endif

namespace apet {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// SPEC.md: λ = ridge · trace(G)/m + FLT_MIN, cosine denominators clamped at 1e-12.
constexpr float kFltMin = 1.17549435e-38f;
constexpr float kCosEps = 1e-12f;
// SPEC.md ridge rule: Cholesky pivots below τ = max(λ, 2^-16 · trace(G)/m) are replaced by τ.
constexpr float kPivotFloor = 1.0f / 65536.0f;

// Token state, one byte per token: zeroed, then written by fps (basis) and select (selected).
constexpr uint8_t kDropped = 0;
constexpr uint8_t kBasis = 1;
constexpr uint8_t kSelected = 2;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Segment layout. Token rows of segment s are tok_start[s] .. tok_start[s+1) of x (T, D); its
// kept rows are out_start[s] .. out_start[s+1) of the outputs; its dropped tokens are numbered
// from drop_start(s) = tok_start[s] - out_start[s] in the dropped-token work lists. Both arrays
// are int64 (S+1) prefix sums on the device; dense input simply has uniform strides.
// ---------------------------------------------------------------------------------------------
struct Segments {
  const int64_t* tok_start;  // (S+1,)
  const int64_t* out_start;  // (S+1,)
  int64_t count;             // S
  int num_basis;             // M (host argument); m_s = min(M, K_s)

  __device__ __forceinline__ int64_t tok0(int64_t s) const { return tok_start[s]; }
  __device__ __forceinline__ int64_t out0(int64_t s) const { return out_start[s]; }
  __device__ __forceinline__ int64_t drop0(int64_t s) const { return tok_start[s] - out_start[s]; }
  __device__ __forceinline__ int len(int64_t s) const {
    return static_cast<int>(tok_start[s + 1] - tok_start[s]);
  }
  __device__ __forceinline__ int keep(int64_t s) const {
    return static_cast<int>(out_start[s + 1] - out_start[s]);
  }
  __device__ __forceinline__ int basis(int64_t s) const {
    const int k = keep(s);
    return k < num_basis ? k : num_basis;
  }
  // Segments that keep every token (K = N, which includes N = 0) skip FPS, residual and merge:
  // SPEC.md makes their output an exact copy.
  __device__ __forceinline__ bool compresses(int64_t s) const { return keep(s) < len(s); }
};

// The segment that owns output row `row`: the last s with out_start[s] <= row (so empty
// segments, which share their start with the next one, are skipped).
__device__ __forceinline__ int64_t segment_of_output(const Segments& seg, int64_t row) {
  int64_t lo = 0, hi = seg.count;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (seg.out_start[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// dtype conversion: all arithmetic is float32 (SPEC.md), storage is T.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// Argmax with the SPEC.md tie-break. (value desc, index asc) is a total order, so any reduction
// tree gives the same winner: reductions are deterministic regardless of shape or launch.
// ---------------------------------------------------------------------------------------------
struct ArgMax {
  float value;
  int index;
};

__device__ __forceinline__ ArgMax argmax_identity() { return {-INFINITY, 0x7fffffff}; }

__device__ __forceinline__ bool beats(float v, int i, const ArgMax& best) {
  return v > best.value || (v == best.value && i < best.index);
}

__device__ __forceinline__ ArgMax argmax_combine(const ArgMax& a, const ArgMax& b) {
  return beats(b.value, b.index, a) ? b : a;
}

// Full-warp argmax; every lane returns the winner.
__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    ArgMax other;
    other.value = __shfl_xor_sync(kFullMask, a.value, offset);
    other.index = __shfl_xor_sync(kFullMask, a.index, offset);
    a = argmax_combine(a, other);
  }
  return a;
}

// Full-warp sum. The xor butterfly gives every lane the same bits (each pairwise add is
// commutative), and the tree is fixed, so the result is reproducible run to run.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Exclusive prefix sum of `value` over the block in thread order, plus the block total (integer,
// so exact). Must be called by every thread of the block (it synchronizes); blockDim.x is a
// multiple of 32 and <= 1024.
__device__ __forceinline__ int block_exclusive_sum(int value, int* total) {
  __shared__ int warp_totals[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  int inclusive = value;
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < warps; ++w) {  // <= 32 smem reads: cheaper than a second scan level
    if (w == warp) before = sum;
    sum += warp_totals[w];
  }
  *total = sum;
  return before + inclusive - value;
}

// Orders float keys as unsigned ints (larger float -> larger key); callers map NaN first.
__device__ __forceinline__ uint32_t ordered_key(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kFillThreads = 256;

// Writes zeros to n ints (a kernel instead of cudaMemsetAsync keeps the pipeline runnable by
// the emulator; it is one tiny launch).
__global__ void fill_zero_kernel(int* data, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) data[i] = 0;
}

}  // namespace apet
