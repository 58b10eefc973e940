// Thin torch binding of the CUDA backend: registers apet::_compress_cuda and
// apet::_compress_varlen_cuda (internal ops; the public apet::compress / compress_varlen and their
// validation live in apet_kernels/_library.py, which calls these through apet_kernels/ops/cuda.py).
//
// All it does is check what memory safety depends on, lay out the segment offsets, allocate the
// outputs and the workspace through the caching allocator, and launch csrc/apet on the current
// stream of x's device. Output sizes come from host ints only; nothing here syncs.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "apet/api.h"

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

apet::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return apet::DType::kFloat16;
    case at::kBFloat16: return apet::DType::kBFloat16;
    case at::kFloat: return apet::DType::kFloat32;
    default: TORCH_CHECK(false, "apet CUDA backend: x must be float16, bfloat16 or float32, got ",
                         x.scalar_type());
  }
}

void check_common(const at::Tensor& x, int64_t num_basis, double ridge) {
  TORCH_CHECK(x.is_cuda(), "apet CUDA backend: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(-1) >= 1, "apet CUDA backend: x must have D >= 1, got ", x.sizes());
  TORCH_CHECK(num_basis >= 1 && num_basis <= std::numeric_limits<int>::max(),
              "apet CUDA backend: num_basis must be >= 1, got ", num_basis);
  TORCH_CHECK(ridge >= 0, "apet CUDA backend: ridge must be >= 0, got ", ridge);
}

// Fills the problem, allocates and launches. x2d: (T, D) contiguous; offsets: device int64
// (S+1,) each.
Outputs launch(const at::Tensor& x2d, apet::Problem& p, const at::Tensor& tok_start,
               const at::Tensor& out_start) {
  // Kernels index a segment's tokens with int and step loops past the end (i += blockDim.x,
  // begin + 64): 2^30 leaves headroom below INT_MAX for those steps.
  TORCH_CHECK(p.max_len <= (int64_t{1} << 30),
              "apet CUDA backend: segments longer than 2^30 tokens are not supported, got ",
              p.max_len);
  p.tok_start = tok_start.data_ptr<int64_t>();
  p.out_start = out_start.data_ptr<int64_t>();
  const auto long_options = x2d.options().dtype(at::kLong);
  at::Tensor out = at::empty({p.total_keep, p.dim}, x2d.options());
  at::Tensor kept = at::empty({p.total_keep}, long_options);
  at::Tensor assign = at::empty({p.total_tokens}, long_options);
  if (p.total_tokens == 0) return {out, kept, assign};
  at::Tensor workspace = at::empty({static_cast<int64_t>(apet::workspace_bytes(p))},
                                   x2d.options().dtype(at::kByte));
  const cudaError_t err =
      apet::compress(dtype_of(x2d), p, x2d.data_ptr(), out.data_ptr(), kept.data_ptr<int64_t>(),
                     assign.data_ptr<int64_t>(), workspace.data_ptr(),
                     c10::cuda::getCurrentCUDAStream(x2d.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "apet CUDA backend: kernel launch failed: ",
              cudaGetErrorString(err));
  return {out, kept, assign};
}

// Dense: x (S, N, D) -> out (S, K, D), kept (S, K) local, assign (S, N) local slots.
Outputs compress_cuda(const at::Tensor& x, int64_t keep, int64_t num_basis, double ridge,
                      bool merge) {
  check_common(x, num_basis, ridge);
  TORCH_CHECK(x.dim() == 3, "apet CUDA backend: x must be (S, N, D), got ", x.sizes());
  const int64_t S = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(keep >= 1 && keep <= N, "apet CUDA backend: keep must be in [1, N = ", N, "], got ",
              keep);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2d = x.contiguous().view({S * N, D});
  apet::Problem p;
  p.num_segments = S;
  p.total_tokens = S * N;
  p.dim = D;
  p.num_basis = static_cast<int>(num_basis);
  p.ridge = static_cast<float>(ridge);
  p.merge = merge;
  p.global_ids = false;
  apet::add_segments(p, N, keep, S);
  // Uniform offsets are generated on the device: no host-to-device copy at all.
  const auto long_options = x.options().dtype(at::kLong);
  const at::Tensor tok_start = at::arange(0, (S + 1) * N, N, long_options);
  const at::Tensor out_start = at::arange(0, (S + 1) * keep, keep, long_options);
  auto [out, kept, assign] = launch(x2d, p, tok_start, out_start);
  return {out.view({S, keep, D}), kept.view({S, keep}), assign.view({S, N})};
}

// Varlen: x (T, D) packed, seqlens / keep host ints per segment -> out (ΣK, D),
// kept (ΣK,) global rows of x, assign (T,) global output rows.
Outputs compress_varlen_cuda(const at::Tensor& x, at::IntArrayRef seqlens, at::IntArrayRef keep,
                             int64_t num_basis, double ridge, bool merge) {
  check_common(x, num_basis, ridge);
  TORCH_CHECK(x.dim() == 2, "apet CUDA backend: x must be (T, D), got ", x.sizes());
  TORCH_CHECK(seqlens.size() == keep.size(), "apet CUDA backend: ", seqlens.size(),
              " seqlens but ", keep.size(), " keep entries");
  const int64_t S = static_cast<int64_t>(seqlens.size());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2d = x.contiguous();
  apet::Problem p;
  p.num_segments = S;
  p.total_tokens = x.size(0);
  p.dim = x.size(1);
  p.num_basis = static_cast<int>(num_basis);
  p.ridge = static_cast<float>(ridge);
  p.merge = merge;
  p.global_ids = true;
  // Host prefix sums, uploaded through kernel parameters (apet::upload_int64) rather than a
  // pinned buffer and a non-blocking copy: a CUDA graph that captured such a copy re-reads the
  // pinned buffer at every replay, long after this call freed it (only recent torch host
  // allocators keep blocks used during capture alive), and allocating pinned memory during
  // capture can query events, which global-mode capture forbids. See csrc/apet/upload.cuh.
  std::vector<int64_t> host(2 * (S + 1));
  int64_t* tok = host.data();
  int64_t* outs = tok + S + 1;
  tok[0] = outs[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = seqlens[s], k = keep[s];
    TORCH_CHECK(n >= 0 && (n == 0 ? k == 0 : (k >= 1 && k <= n)),
                "apet CUDA backend: segment ", s, " has seqlen ", n, " and keep ", k);
    tok[s + 1] = tok[s] + n;
    outs[s + 1] = outs[s] + k;
    apet::add_segments(p, n, k);
  }
  TORCH_CHECK(tok[S] == p.total_tokens, "apet CUDA backend: seqlens sum to ", tok[S],
              " but x has ", p.total_tokens, " rows");
  at::Tensor offsets = at::empty({2 * (S + 1)}, x.options().dtype(at::kLong));
  const cudaError_t err =
      apet::upload_int64(host.data(), 2 * (S + 1), offsets.data_ptr<int64_t>(),
                         c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "apet CUDA backend: offset upload failed: ",
              cudaGetErrorString(err));
  return launch(x2d, p, offsets.slice(0, 0, S + 1), offsets.slice(0, S + 1));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(apet, m) {
  m.def("_compress_cuda(Tensor x, int keep, int num_basis, float ridge, bool merge) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("_compress_varlen_cuda(Tensor x, int[] seqlens, int[] keep, int num_basis, float ridge, "
        "bool merge) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(apet, CUDA, m) {
  m.impl("_compress_cuda", &compress_cuda);
  m.impl("_compress_varlen_cuda", &compress_varlen_cuda);
}

// Lets `import apet_kernels._C` succeed; apet_kernels/ops/cuda.py loads the library with
// torch.ops.load_library, which is all the op registration needs.
#ifdef TORCH_EXTENSION_NAME
#define APET_CONCAT_(a, b) a##b
#define APET_CONCAT(a, b) APET_CONCAT_(a, b)
#define APET_STR_(a) #a
#define APET_STR(a) APET_STR_(a)
extern "C" PyObject* APET_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, APET_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
