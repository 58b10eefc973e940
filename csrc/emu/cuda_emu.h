// A small CPU emulator of the CUDA execution model, for testing the kernels without a GPU.
//
// Include this before any apet header and compile with a host C++17 compiler (see
// csrc/emu/emu_main.cpp). Each block runs on its own, one fiber per thread (ucontext),
// scheduled cooperatively: a thread runs until it reaches a barrier or a warp collective.
// What it checks beyond the results:
//   * __syncthreads must be reached by every thread of the block (a barrier after a divergent
//     early return, or in divergent code, deadlocks and aborts with a message);
//   * warp collectives (__shfl_*_sync, __ballot_sync, __match_any_sync, __syncwarp) must be
//     called by all 32 lanes with the full mask, in the same order;
//   * the fibers run in a new (seeded, so reproducible) random order every round, so reading
//     memory that another thread of the block writes without a barrier in between tends to give
//     wrong results;
//   * the blocks of a launch run in a (seeded) random order, not by blockIdx, so a block that
//     depends on another block of the same launch having run first tends to give wrong results
//     (a GPU gives no order between the blocks of one launch).
// What it cannot check: memory-model subtleties, warp-synchronous code without __syncwarp,
// reads of shared memory before any write (a __shared__ array is one static that keeps the last
// block's values, where a GPU has garbage), FMA contraction and other device rounding, timing,
// and anything about real hardware. Passing here is not running on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#define APET_EMULATION 1

// Under AddressSanitizer (tests/ops/test_cuda.py builds the emulator with it once), every
// workspace piece is followed by a poisoned 256-byte gap (csrc/apet/pipeline.cuh), so scratch
// accesses past a piece's end are reported like any other heap overflow.
#if defined(__SANITIZE_ADDRESS__)
#define APET_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define APET_EMU_ASAN 1
#endif
#endif
#ifdef APET_EMU_ASAN
#include <sanitizer/asan_interface.h>
#define APET_WORKSPACE_GAP 256
#define APET_WORKSPACE_PIECE(begin, bytes, reserved) \
  ASAN_POISON_MEMORY_REGION((begin) + (bytes), (reserved) - (bytes))
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static  // blocks run one at a time, so a static is per-block shared memory
#define __forceinline__ inline

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline Dim3 thread_idx, block_idx, block_dim, grid_dim;

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  unsigned tid = 0;
  bool done = false;
};

struct Warp {
  // Collectives alternate between two slot sets: a lane can only be one collective ahead of the
  // slowest reader (the next barrier needs everyone), so one barrier per collective suffices.
  uint64_t slots[2][32];
  int arrived = 0;
  uint64_t generation = 0;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::function<void()> body;
  Fiber* current = nullptr;
  int arrived = 0;
  uint64_t generation = 0;
  uint64_t progress = 0;  // bumps on every arrival, release and exit: no bump in a round = deadlock
};

inline Block* block = nullptr;

constexpr size_t kStackBytes = 128 * 1024;
// Fiber stacks, allocated once (uninitialized) and reused by every block.
inline char* stack_of(unsigned tid) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= tid) stacks.emplace_back(new char[kStackBytes]);
  return stacks[tid].get();
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u, thread %u)\n", what, block_idx.x,
               block != nullptr && block->current != nullptr ? block->current->tid : 0u);
  std::abort();
}

inline void yield() { swapcontext(&block->current->context, &block->scheduler); }

inline void fiber_entry() {
  block->body();
  block->current->done = true;
  ++block->progress;
}  // returns to the scheduler through uc_link

inline void syncthreads() {
  Block& b = *block;
  const uint64_t generation = b.generation;
  ++b.progress;
  if (++b.arrived == static_cast<int>(b.fibers.size())) {  // last to arrive releases everyone
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
  ++b.progress;
}

inline Warp& my_warp() { return block->warps[block->current->tid / 32]; }
inline unsigned my_lane() { return block->current->tid % 32; }

inline void warp_barrier(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are supported");
  Warp& w = my_warp();
  const uint64_t generation = w.generation;
  ++block->progress;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
    return;
  }
  while (w.generation == generation) yield();
  ++block->progress;
}

// Publishes this lane's value, waits for the whole warp, then lets `read` see all 32 values.
template <typename R, typename V, typename F>
R warp_collective(unsigned mask, V value, F read) {
  static_assert(sizeof(V) <= 8, "slot size");
  Warp& w = my_warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  const uint64_t* slots = w.slots[w.generation % 2];
  w.slots[w.generation % 2][my_lane()] = bits;
  warp_barrier(mask);
  return read(slots, my_lane());
}

template <typename V>
V from_slot(uint64_t bits) {
  V v;
  std::memcpy(&v, &bits, sizeof(V));
  return v;
}

inline void run_block(unsigned threads, const std::function<void()>& body) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024) fail("block size must be 32k <= 1024");
  Block b;
  b.body = body;
  b.fibers.resize(threads);
  b.warps.resize(threads / 32);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = t;
    f.stack = stack_of(t);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  block = &b;
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  static std::mt19937 shuffle_rng(20260223);  // fixed seed: runs are reproducible
  for (;;) {
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    bool alive = false;
    const uint64_t before = b.progress;
    for (const unsigned k : order) {
      Fiber& f = b.fibers[k];
      if (f.done) continue;
      alive = true;
      b.current = &f;
      thread_idx = {f.tid, 0, 0};
      swapcontext(&b.scheduler, &f.context);
    }
    if (!alive) break;
    if (b.progress == before) fail("deadlock: a barrier or warp collective is not reached by all");
  }
  block = nullptr;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t grid, unsigned threads, Args... args) {
  if (grid <= 0) fail("empty grid");
  const std::tuple<Params...> params(args...);
  grid_dim = {static_cast<unsigned>(grid), 1, 1};
  block_dim = {threads, 1, 1};
  std::vector<int64_t> blocks(static_cast<size_t>(grid));
  std::iota(blocks.begin(), blocks.end(), int64_t{0});
  static std::mt19937 block_rng(20260224);  // fixed seed: runs are reproducible
  std::shuffle(blocks.begin(), blocks.end(), block_rng);
  for (const int64_t g : blocks) {
    block_idx = {static_cast<unsigned>(g), 0, 0};
    run_block(threads, [&] { std::apply(kernel, params); });
  }
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define APET_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::emu::launch(kernel, (grid), (block), __VA_ARGS__))
#define APET_LAST_ERROR() cudaSuccess

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_barrier(mask); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  return emu::warp_collective<V>(mask, value, [&](const uint64_t* slots, unsigned lane) {
    return emu::from_slot<V>(slots[(lane ^ lane_mask) & 31]);
  });
}

template <typename V>
V __shfl_sync(unsigned mask, V value, int src_lane) {
  return emu::warp_collective<V>(mask, value, [&](const uint64_t* slots, unsigned) {
    return emu::from_slot<V>(slots[src_lane & 31]);
  });
}

template <typename V>
V __shfl_up_sync(unsigned mask, V value, unsigned delta) {
  return emu::warp_collective<V>(mask, value, [&](const uint64_t* slots, unsigned lane) {
    return emu::from_slot<V>(slots[lane >= delta ? lane - delta : lane]);
  });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::warp_collective<unsigned>(mask, predicate != 0 ? 1 : 0,
                                        [](const uint64_t* slots, unsigned) {
                                          unsigned bits = 0;
                                          for (int l = 0; l < 32; ++l)
                                            if (slots[l] & 1u) bits |= 1u << l;
                                          return bits;
                                        });
}

inline unsigned __match_any_sync(unsigned mask, int value) {
  return emu::warp_collective<unsigned>(mask, value, [&](const uint64_t* slots, unsigned) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
      if (emu::from_slot<int>(slots[l]) == value) bits |= 1u << l;
    return bits;
  });
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline int atomicAdd(int* address, int value) {  // fibers never preempt each other
  const int old = *address;
  *address = old + value;
  return old;
}
using std::isnan;
