// Compile check of the torch-free kernel headers: instantiates every kernel template, and the
// pipeline, for each supported dtype. tests/ops/test_cuda.py runs `nvcc -c` on it for sm_80 and
// sm_90 (no GPU needed); it is not part of the built extension.
#include "apet/pipeline.cuh"

#define APET_INSTANTIATE(T)                                                                     \
  template __global__ void apet::fps_mean_kernel<T>(const T*, int64_t, apet::Segments, float*);  \
  template __global__ void apet::fps_init_kernel<T>(const T*, int64_t, apet::Segments, int64_t, \
                                                    const float*, float*, float*, float*, int*); \
  template __global__ void apet::fps_step_kernel<T>(                                            \
      const T*, int64_t, apet::Segments, int64_t, int, int64_t, int, float*, float*,            \
      const float*, const int*, float*, int*, int*, uint8_t*);                                  \
  template __global__ void apet::merge_assign_kernel<T>(const T*, int64_t, apet::Segments,      \
                                                        int64_t, const float*, const int*,      \
                                                        const int*, bool, int64_t*);            \
  template __global__ void apet::merge_mean_kernel<T>(const T*, int64_t, apet::Segments,        \
                                                      const int*, const int*, const int*,       \
                                                      const int*, T*);                          \
  template cudaError_t apet::run_compress<T>(const apet::Problem&, const T*, T*, int64_t*,      \
                                             int64_t*, void*, cudaStream_t);

APET_INSTANTIATE(__half)
APET_INSTANTIATE(__nv_bfloat16)
APET_INSTANTIATE(float)
