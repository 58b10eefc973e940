// The launch sequence fps -> residual -> select -> merge, and the workspace it carves.
//
// Include from exactly one translation unit that is linked (csrc/apet_kernels.cu): the headers
// define non-template kernels. All launches go to one stream; no launch depends on device data
// read back by the host, so a call never syncs and can be captured in a CUDA graph.
#pragma once

#include <type_traits>

#include "api.h"
#include "common.cuh"
#include "fps.cuh"
#include "merge.cuh"
#include "residual.cuh"
#include "select.cuh"
#include "upload.cuh"

#define APET_RETURN_IF_ERROR(expr)          \
  do {                                      \
    const cudaError_t apet_err_ = (expr);   \
    if (apet_err_ != cudaSuccess) return apet_err_; \
  } while (0)

// Hooks for csrc/emu: with AddressSanitizer the emulator leaves a poisoned gap after every
// workspace piece, so that an out-of-bounds scratch access faults instead of silently landing in
// the next piece. Both are no-ops in the real build (the gap must stay a multiple of 256).
#ifndef APET_WORKSPACE_GAP
#define APET_WORKSPACE_GAP 0
#endif
#ifndef APET_WORKSPACE_PIECE
#define APET_WORKSPACE_PIECE(begin, bytes, reserved) ((void)0)
#endif

namespace apet {

// Scratch buffers of one call. Sizes in elements; see the kernels for the layouts.
struct Workspace {
  float* mean;           // (S, D)
  float* sqnorm;         // (T,)
  float* dist;           // (T,)
  float* dots;           // (m_max, T)
  float* partial_value;  // (2, S * chunks)
  int* partial_index;    // (2, S * chunks)
  int* basis;            // (S, m_max)
  uint8_t* state;        // (T,) rounded up to whole ints (zeroed as ints)
  float* err2;           // (T,)
  float* chol;           // (S, m_max, m_max)
  float* lam;            // (S,)
  int* kept_local;       // (ΣK,)
  int* drop_list;        // (T - ΣK,)
  int* count;            // (ΣK,)
  int* cursor;           // (ΣK,)
  int* order;            // (T - ΣK,)
};

inline int64_t fps_chunks(const Problem& p) { return ceil_div(p.max_len, kFpsTokens); }
inline int64_t state_ints(const Problem& p) { return ceil_div(p.total_tokens, 4); }

// Lays the workspace out from `base` (nullptr: only measures); returns the bytes used.
inline size_t carve_workspace(const Problem& p, char* base, Workspace* ws) {
  size_t used = 0;
  auto take = [&](auto*& ptr, int64_t elems) {
    using Elem = typename std::remove_reference<decltype(*ptr)>::type;
    ptr = base != nullptr ? reinterpret_cast<Elem*>(base + used) : nullptr;
    const size_t bytes = static_cast<size_t>(elems > 0 ? elems : 0) * sizeof(Elem);
    const size_t reserved = (bytes + 255) / 256 * 256 + APET_WORKSPACE_GAP;
    if (base != nullptr) APET_WORKSPACE_PIECE(base + used, bytes, reserved);
    used += reserved;
  };
  const int64_t S = p.num_segments, T = p.total_tokens, K = p.total_keep, m = p.max_basis;
  const int64_t partials = 2 * S * fps_chunks(p);
  take(ws->mean, m > 0 ? S * p.dim : 0);
  take(ws->sqnorm, m > 0 ? T : 0);
  take(ws->dist, m > 0 ? T : 0);
  take(ws->dots, m * T);
  take(ws->partial_value, m > 0 ? partials : 0);
  take(ws->partial_index, m > 0 ? partials : 0);
  take(ws->basis, S * m);
  int* state_words = nullptr;
  take(state_words, m > 0 ? state_ints(p) : 0);
  ws->state = reinterpret_cast<uint8_t*>(state_words);
  take(ws->err2, m > 0 ? T : 0);
  take(ws->chol, p.any_residual ? S * m * m : 0);
  take(ws->lam, p.any_residual ? S : 0);
  take(ws->kept_local, K);
  take(ws->drop_list, T - K);
  take(ws->count, p.merge ? K : 0);
  take(ws->cursor, p.merge ? K : 0);
  take(ws->order, p.merge ? T - K : 0);
  return used;
}

template <typename T>
cudaError_t run_compress(const Problem& p, const T* x, T* out, int64_t* kept, int64_t* assign,
                         void* workspace, cudaStream_t stream) {
  if (p.num_segments == 0 || p.total_tokens == 0) return cudaSuccess;
  Workspace ws;
  carve_workspace(p, static_cast<char*>(workspace), &ws);
  const Segments seg{p.tok_start, p.out_start, p.num_segments, p.num_basis};
  const int64_t S = p.num_segments, T_ = p.total_tokens, D = p.dim;
  const bool compresses = p.max_basis > 0;

  if (compresses) {  // fps: mean, norms + step-0 scores, then one launch per basis pick
    const int64_t chunks = fps_chunks(p);
    const int64_t partials = S * chunks;
    APET_LAUNCH(fill_zero_kernel, ceil_div(state_ints(p), kFillThreads), kFillThreads, stream,
                reinterpret_cast<int*>(ws.state), state_ints(p));
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    APET_LAUNCH(fps_mean_kernel<T>, S * ceil_div(D, kMeanColumns), kFpsThreads, stream, x, D, seg,
                ws.mean);
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    APET_LAUNCH(fps_init_kernel<T>, S * chunks, kFpsThreads, stream, x, D, seg, chunks, ws.mean,
                ws.sqnorm, ws.dist, ws.partial_value, ws.partial_index);
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    for (int t = 0; t < p.max_basis; ++t) {
      const int64_t in = (t % 2) * partials, next = ((t + 1) % 2) * partials;
      APET_LAUNCH(fps_step_kernel<T>, S * chunks, kFpsThreads, stream, x, D, seg, chunks, t, T_,
                  p.max_basis, ws.dist, ws.dots, ws.partial_value + in, ws.partial_index + in,
                  ws.partial_value + next, ws.partial_index + next, ws.basis, ws.state);
      APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    }
    if (p.any_residual) {
      APET_LAUNCH(residual_factor_kernel, S, kFactorThreads, stream, seg, T_, p.max_basis,
                  p.ridge, ws.dots, ws.basis, ws.chol, ws.lam);
      APET_RETURN_IF_ERROR(APET_LAST_ERROR());
      const int64_t err_chunks = ceil_div(p.max_len, kErrorThreads);
      APET_LAUNCH(residual_error_kernel, S * err_chunks, kErrorThreads, stream, seg, err_chunks,
                  T_, p.max_basis, ws.chol, ws.lam, ws.sqnorm, ws.dots, ws.err2);
      APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    }
  }

  APET_LAUNCH(select_kernel, S, kSelectThreads, stream, seg, ws.err2, ws.state, p.global_ids,
              kept, ws.kept_local, assign, ws.drop_list);
  APET_RETURN_IF_ERROR(APET_LAST_ERROR());

  const bool merging = p.merge && compresses;
  if (merging) {
    const int64_t row_tiles = ceil_div(p.max_drop, kTileRows);
    APET_LAUNCH(merge_assign_kernel<T>, S * row_tiles, kAssignThreads, stream, x, D, seg,
                row_tiles, ws.sqnorm, ws.kept_local, ws.drop_list, p.global_ids, assign);
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
    APET_LAUNCH(merge_bucket_kernel, S, kBucketThreads, stream, seg, ws.drop_list, assign,
                p.global_ids, ws.count, ws.cursor, ws.order);
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
  }
  if (p.total_keep > 0) {
    APET_LAUNCH(merge_mean_kernel<T>, p.total_keep, kMeanThreads, stream, x, D, seg,
                ws.kept_local, merging ? ws.count : nullptr, ws.cursor, ws.order, out);
    APET_RETURN_IF_ERROR(APET_LAST_ERROR());
  }
  return cudaSuccess;
}

}  // namespace apet
