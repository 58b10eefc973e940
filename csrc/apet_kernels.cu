// The only linked translation unit with device code: the dtype switch over the kernel pipeline.
// Torch-free; compiled by nvcc (setup.py, or the JIT build in apet_kernels/ops/cuda.py).
#include "apet/pipeline.cuh"

namespace apet {

size_t workspace_bytes(const Problem& p) {
  Workspace ws;
  return carve_workspace(p, nullptr, &ws);
}

cudaError_t compress(DType dtype, const Problem& p, const void* x, void* out, int64_t* kept,
                     int64_t* assign, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return run_compress(p, static_cast<const __half*>(x), static_cast<__half*>(out), kept,
                          assign, workspace, stream);
    case DType::kBFloat16:
      return run_compress(p, static_cast<const __nv_bfloat16*>(x),
                          static_cast<__nv_bfloat16*>(out), kept, assign, workspace, stream);
    case DType::kFloat32:
      return run_compress(p, static_cast<const float*>(x), static_cast<float*>(out), kept, assign,
                          workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t upload_int64(const int64_t* values, int64_t n, int64_t* dst, cudaStream_t stream) {
  return run_upload(values, n, dst, stream);
}

}  // namespace apet
