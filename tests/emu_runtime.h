// The CUDA execution model on the CPU, shared by the kernel emulators in tests/ (attention_emu.cpp,
// norm_gelu_emu.cpp, cross_entropy_emu.cpp). Each emulator includes this header (which defines ARCANA_EMULATE),
// adds what its kernels need beyond it, includes its csrc/ files and exports entry points that the Python tests
// call through ctypes; tests/kernel_testing.py builds them with g++ -std=c++20 -pthread.
//
// Every CUDA thread of a block is an OS thread and the blocks of a grid run one after another. __syncthreads is
// a barrier over the block; a warp collective (__shfl_xor_sync, __syncwarp, and those an emulator adds with
// arrive/depart) is a barrier over the 32 threads of a warp, which exchange their operands through the warp's
// slots. A barrier that some threads never reach aborts with a message after a timeout instead of hanging, and
// so do lanes of one warp that meet in different collectives. __shared__ variables are function statics, so
// every thread of the block sees the same one (one block runs at a time). Dynamic shared memory is 16-byte
// aligned, starts as all-ones bytes (NaN in fp32, bf16 and fp16, like the garbage of a real launch) and is
// sized exactly, with an 8-byte guard after it whose change is reported. Cache-hinted loads and stores are
// plain ones; fast-math intrinsics are the exact functions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "kernel emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier for `count` threads; threads that exit leave it (as exited threads leave __syncthreads).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++waiting_ == count_) {
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return gen_ != gen; })) {
      fail("barrier timeout: some threads never reached this __syncthreads or warp collective");
    }
  }
  void leave() {
    std::unique_lock<std::mutex> lock(m_);
    --count_;
    if (waiting_ > 0 && waiting_ == count_) release();
  }

 private:
  void release() {
    waiting_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int count_, waiting_ = 0;
  uint64_t gen_ = 0;
};

// The warp collectives of this header; an emulator numbers its own from kFirstEmulatorCollective.
enum Collective : int { kShfl = 1, kSyncwarp, kFirstEmulatorCollective };

struct Warp {
  Barrier bar{32};
  int kind[32];          // the collective each lane is in
  uint64_t slot[32][8];  // each lane's operands
};

struct ThreadState {
  Barrier* block_bar;
  Warp* warp;
  int lane;
  unsigned char* smem;  // the block's dynamic shared memory, smem_bytes long
  size_t smem_bytes;
};
inline thread_local ThreadState tl;

// Publish this lane's n operands, wait for the warp, check that every lane is in the same collective. The
// lanes' operands stay readable in tl.warp->slot until depart().
inline void arrive(int kind, const uint64_t* vals, int n) {
  Warp& w = *tl.warp;
  w.kind[tl.lane] = kind;
  for (int i = 0; i < n; ++i) w.slot[tl.lane][i] = vals[i];
  w.bar.wait();
  for (int l = 0; l < 32; ++l) {
    if (w.kind[l] != kind) fail("lanes of one warp are in different collectives");
  }
}
inline void depart() { tl.warp->bar.wait(); }

constexpr size_t kGuardBytes = 8;
constexpr unsigned char kGuard = 0xA5;

// Runs body() on every thread of every block of the grid, with smem_bytes of dynamic shared memory per block.
template <typename Body>
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const Body& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n == 0 || n % 32 || block.x % 32 || n > 1024) {
    fail("block shape: blockDim.x and the block must be multiples of 32, at most 1024 threads");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::vector<unsigned char> smem(smem_bytes + 16 + kGuardBytes, 0xFF);
        unsigned char* base = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
        std::memset(base + smem_bytes, kGuard, kGuardBytes);
        Barrier block_bar(n);
        std::vector<std::unique_ptr<Warp>> warps;
        for (int w = 0; w < n / 32; ++w) warps.emplace_back(new Warp());
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = make_uint3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            tl = ThreadState{&block_bar, warps[t / 32].get(), t % 32, base, smem_bytes};
            body();
            tl.warp->bar.leave();
            block_bar.leave();
          });
        }
        for (auto& th : threads) th.join();
        for (size_t i = 0; i < kGuardBytes; ++i) {
          if (base[smem_bytes + i] != kGuard) fail("a write past the end of the dynamic shared memory");
        }
      }
    }
  }
}

}  // namespace emu

// -----------------------------------------------------------------------------
// CUDA built-ins

inline void __syncthreads() { emu::tl.block_bar->wait(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask");
  emu::arrive(emu::kSyncwarp, nullptr, 0);
  emu::depart();
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int = 32) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, 4);
  emu::arrive(emu::kShfl, &bits, 1);
  float out;
  std::memcpy(&out, &emu::tl.warp->slot[emu::tl.lane ^ lane_mask][0], 4);
  emu::depart();
  return out;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

inline float emu_rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float emu_expf(float x) { return std::exp(x); }
inline float emu_fdividef(float a, float b) { return a / b; }
#define rsqrtf emu_rsqrtf
#define __expf emu_expf
#define __fdividef emu_fdividef

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define __trap() std::abort()

#define ARCANA_EMULATE 1
