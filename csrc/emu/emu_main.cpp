// Runs the CUDA backend's kernels on the CPU under csrc/emu/cuda_emu.h (tests only).
//
// Usage: apet_emu IN OUT
//   IN : int64 [dtype (0 f16, 1 bf16, 2 f32), S, T, D, num_basis, merge, global_ids],
//        float64 ridge, int64 seqlens[S], int64 keeps[S], then x (T, D) raw in that dtype.
//   OUT: out (ΣK, D) raw in that dtype, int64 kept[ΣK], int64 assign[T].
// Exits non-zero (with a message) on malformed input; the emulator aborts on barrier misuse.
#include "cuda_emu.h"

#include "../apet_kernels.cu"

namespace {

template <typename V>
bool read_all(std::FILE* f, V* data, size_t count) {
  return std::fread(data, sizeof(V), count, f) == count;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 2;
  int64_t header[7];
  double ridge;
  if (!read_all(in, header, 7) || !read_all(in, &ridge, 1)) return 3;
  const int64_t dtype = header[0], S = header[1], T = header[2], D = header[3];
  std::vector<int64_t> seqlens(S), keeps(S);
  if (!read_all(in, seqlens.data(), S) || !read_all(in, keeps.data(), S)) return 3;
  const size_t elem = dtype == 2 ? 4 : 2;
  std::vector<char> x(static_cast<size_t>(T * D) * elem);
  if (!read_all(in, x.data(), x.size())) return 3;
  std::fclose(in);

  apet::Problem p;
  p.num_segments = S;
  p.total_tokens = T;
  p.dim = D;
  p.num_basis = static_cast<int>(header[4]);
  p.ridge = static_cast<float>(ridge);
  p.merge = header[5] != 0;
  p.global_ids = header[6] != 0;
  // The offsets reach the "device" as in the binding: host prefix sums, tok_start then
  // out_start, in one apet::upload_int64 call (kernel parameters, 496 values a launch). The host
  // array is then overwritten, as a freed host buffer might be, so only the uploaded values can
  // give right results; they are split into two exact-size arrays for AddressSanitizer.
  std::vector<int64_t> host(2 * (S + 1), 0), uploaded(2 * (S + 1), -1);
  for (int64_t s = 0; s < S; ++s) {
    host[s + 1] = host[s] + seqlens[s];
    host[S + 1 + s + 1] = host[S + 1 + s] + keeps[s];
    apet::add_segments(p, seqlens[s], keeps[s]);
  }
  if (apet::upload_int64(host.data(), 2 * (S + 1), uploaded.data(), nullptr) != cudaSuccess)
    return 4;
  std::fill(host.begin(), host.end(), -1);
  const std::vector<int64_t> tok_start(uploaded.begin(), uploaded.begin() + S + 1);
  const std::vector<int64_t> out_start(uploaded.begin() + S + 1, uploaded.end());
  p.tok_start = tok_start.data();
  p.out_start = out_start.data();

  // Every buffer has its exact size: an AddressSanitizer build reports any access past one.
  std::vector<char> out(static_cast<size_t>(p.total_keep * D) * elem);
  std::vector<int64_t> kept(p.total_keep, -7), assign(T, -7);  // -7: "never written"
  std::vector<char> workspace(apet::workspace_bytes(p));
  // Poison the scratch so that reads of never-written memory show up as wrong results.
  std::memset(workspace.data(), 0xA5, workspace.size());
  const apet::DType types[] = {apet::DType::kFloat16, apet::DType::kBFloat16,
                               apet::DType::kFloat32};
  const cudaError_t err = apet::compress(types[dtype], p, x.data(), out.data(), kept.data(),
                                         assign.data(), workspace.data(), nullptr);
#ifdef APET_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(workspace.data(), workspace.size());  // gaps poisoned by carving
#endif
  if (err != cudaSuccess) return 4;

  std::FILE* f = std::fopen(argv[2], "wb");
  if (f == nullptr) return 2;
  std::fwrite(out.data(), 1, out.size(), f);
  std::fwrite(kept.data(), sizeof(int64_t), kept.size(), f);
  std::fwrite(assign.data(), sizeof(int64_t), assign.size(), f);
  std::fclose(f);
  return 0;
}
