// Host int64 values -> device memory through kernel parameters (the varlen segment offsets).
//
// Why not a pinned buffer and cudaMemcpyAsync: inside CUDA-graph capture the copy becomes a
// memcpy node that re-reads the host buffer at every replay, long after the call returned and the
// caching host allocator may have handed that buffer to someone else; and on torch versions whose
// host allocator is not capture-aware, allocating pinned memory during capture queries events,
// which global-mode capture forbids. Kernel parameters are copied into the launch (and into a
// captured graph node) when the launch is made, so nothing on the host is read afterwards: the
// upload is stream-ordered, never syncs, and replays the values it was captured with.
#pragma once

#include "common.cuh"

namespace apet {

// 496 values + count + the destination pointer = 3984 bytes: under the 4 KB kernel-parameter
// limit that every architecture and CUDA 11/12 driver accepts (the 32 KB limit needs CUDA 12.1+
// on both the toolkit and the driver side).
constexpr int kUploadValues = 496;
constexpr int kUploadThreads = 256;

struct UploadChunk {
  int64_t values[kUploadValues];
  int64_t count;
};

static_assert(sizeof(UploadChunk) + sizeof(int64_t*) <= 4000, "kernel parameters <= 4 KB");

__global__ void upload_kernel(UploadChunk chunk, int64_t* dst) {
  for (int64_t i = threadIdx.x; i < chunk.count; i += blockDim.x) dst[i] = chunk.values[i];
}

// One launch per kUploadValues values (varlen: 2 (S + 1) offsets, so one launch up to 247
// segments). `values` is only read during this call.
inline cudaError_t run_upload(const int64_t* values, int64_t n, int64_t* dst,
                              cudaStream_t stream) {
  UploadChunk chunk;
  for (int64_t first = 0; first < n; first += kUploadValues) {
    chunk.count = n - first < kUploadValues ? n - first : kUploadValues;
    for (int64_t i = 0; i < chunk.count; ++i) chunk.values[i] = values[first + i];
    APET_LAUNCH(upload_kernel, 1, kUploadThreads, stream, chunk, dst + first);
    const cudaError_t err = APET_LAST_ERROR();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace apet
