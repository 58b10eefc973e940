// Host interface of the CUDA backend, free of torch and of device code, so that the binding can be
// compiled by the host compiler and the kernels by nvcc alone (csrc/apet_kernels.cu).
//
// A call describes the segments by two device arrays of int64 prefix sums and a few host
// summaries (all from host ints: the launch sequence never reads device data, so nothing syncs),
// asks for workspace_bytes() of scratch memory, and launches everything on one stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace apet {

enum class DType { kFloat16, kBFloat16, kFloat32 };

struct Problem {
  // Device int64 (S+1,) prefix sums: tokens of segment s are rows tok_start[s] .. tok_start[s+1)
  // of x (T, D); its outputs are rows out_start[s] .. out_start[s+1).
  const int64_t* tok_start = nullptr;
  const int64_t* out_start = nullptr;
  int64_t num_segments = 0;  // S
  int64_t total_tokens = 0;  // T
  int64_t dim = 0;           // D
  int num_basis = 10;        // M
  float ridge = 1e-4f;
  bool merge = true;
  bool global_ids = false;   // varlen: kept/assign as global rows instead of local indices
  // Host summaries over segments, accumulated by add_segments().
  int64_t total_keep = 0;    // ΣK_s
  int64_t max_len = 0;       // max N_s
  int64_t max_drop = 0;      // max N_s - K_s
  int max_basis = 0;         // max m_s over segments with K_s < N_s (0: nothing to compress)
  bool any_residual = false; // some segment has m_s < K_s < N_s
};

// Accounts for `copies` segments of n tokens keeping k (dense: one call with copies = S).
inline void add_segments(Problem& p, int64_t n, int64_t k, int64_t copies = 1) {
  p.total_keep += k * copies;
  p.max_len = n > p.max_len ? n : p.max_len;
  if (k >= n) return;  // kept whole: no FPS, residual or merge
  const int m = static_cast<int>(k < p.num_basis ? k : p.num_basis);
  p.max_drop = n - k > p.max_drop ? n - k : p.max_drop;
  p.max_basis = m > p.max_basis ? m : p.max_basis;
  p.any_residual = p.any_residual || k > m;
}

// Bytes of scratch memory compress() needs for this problem (256-byte aligned pieces).
size_t workspace_bytes(const Problem& p);

// Runs ApET on x (T, D) row-major, contiguous. Writes out (ΣK, D) in x's dtype, kept (ΣK,) and
// assign (T,) int64 as SPEC.md defines (local indices, or global ones when p.global_ids).
// Returns the first launch error; everything is asynchronous on `stream`.
cudaError_t compress(DType dtype, const Problem& p, const void* x, void* out, int64_t* kept,
                     int64_t* assign, void* workspace, cudaStream_t stream);

// Writes n host int64 values to the device array dst on `stream` (varlen: the offset arrays).
// The values travel inside kernel parameters, so `values` is not read after the call returns:
// unlike a pinned-memory copy, this is safe to capture in a CUDA graph (replays write the same
// values) and needs no host buffer to outlive the call. Returns the first launch error.
cudaError_t upload_int64(const int64_t* values, int64_t n, int64_t* dst, cudaStream_t stream);

}  // namespace apet
