// CPU emulation of the CUDA features csrc/cross_entropy.cu uses, so that its kernels and launcher (every
// variant, both vector widths, with and without the shared-memory row) run on machines without a GPU;
// tests/test_cross_entropy.py builds this file with g++ and calls it through ctypes on small shapes. It checks
// the index arithmetic, the vector packing, the handling of -1 and out-of-range targets, the two-level
// reduction and its barriers; the GPU run checks the device's own numerics and the speed.
//
// Every CUDA thread of a block is an OS thread and the blocks run one after another. __syncthreads is a barrier
// over the block, __shfl_xor_sync a barrier over the 32 threads of a warp that exchange their values; a barrier
// that some threads never reach aborts with a message after a timeout instead of hanging. __shared__ variables
// are function statics (one block at a time sees them); dynamic shared memory starts as NaN bytes and is sized
// exactly, with an 8-byte guard after it whose change is reported. The cache-hinted loads and stores are plain
// ones.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cross-entropy emulator: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier for `count` threads; a thread that returns leaves it.
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
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      fail("barrier timeout: some threads never reached this __syncthreads or shuffle");
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

struct Warp {
  Barrier bar{32};
  float slot[32];
};

struct ThreadState {
  Barrier* block_bar;
  Warp* warp;
  int lane;
  unsigned char* smem;
};
thread_local ThreadState tl;

bool g_row_fits_shared_memory = true;  // what the launcher is told (settable: both paths run here)

constexpr unsigned char kGuard = 0xA5;

template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const int n = static_cast<int>(block.x);
  if (block.y != 1 || block.z != 1 || n % 32 || n > 1024) fail("block shape: a multiple of 32 threads, <= 1024");
  if (grid.x == 0 || grid.y != 1 || grid.z != 1) fail("grid shape: (blocks, 1, 1) with blocks > 0");
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::vector<unsigned char> smem(smem_bytes + 8, 0xFF);  // NaN in every float type
    std::memset(smem.data() + smem_bytes, kGuard, 8);
    Barrier block_bar(n);
    std::vector<std::unique_ptr<Warp>> warps;
    for (int w = 0; w < n / 32; ++w) warps.emplace_back(new Warp());
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (int t = 0; t < n; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = make_uint3(t, 0, 0);
        blockIdx = make_uint3(bx, 0, 0);
        blockDim = block;
        gridDim = grid;
        tl = ThreadState{&block_bar, warps[t / 32].get(), t % 32, smem.data()};
        kernel(args...);
        tl.warp->bar.leave();
        block_bar.leave();
      });
    }
    for (auto& th : threads) th.join();
    for (int i = 0; i < 8; ++i) {
      if (smem[smem_bytes + i] != kGuard) fail("a write past the end of the dynamic shared memory");
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::tl.block_bar->wait(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int = 32) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask");
  emu::tl.warp->slot[emu::tl.lane] = v;
  emu::tl.warp->bar.wait();
  const float out = emu::tl.warp->slot[emu::tl.lane ^ lane_mask];
  emu::tl.warp->bar.wait();
  return out;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }  // common.cuh's parameter loads (unused here)
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define ARCANA_EMULATE 1
#define ARCANA_CE_SHARED_BYTES(name) unsigned char* name = emu::tl.smem

namespace arcana {
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu::run_grid(kernel, grid, block, smem, args...);
}
namespace {
bool ce_row_fits_shared_memory(size_t) { return emu::g_row_fits_shared_memory; }
template <typename... Params>
void ce_allow_shared_memory(void (*)(Params...), size_t) {}
}  // namespace
}  // namespace arcana

#include "../csrc/common.cuh"
#include "../csrc/cross_entropy.cu"

// -----------------------------------------------------------------------------
// entry point for ctypes: dtype 0 = float32, 1 = bfloat16, 2 = float16; the caller owns every buffer

extern "C" {

// dlogits nullptr: no gradient. vec: the launcher's 128-bit-vector flag (the caller checks V and alignment).
// row_fits: what variant 1 is told about shared memory. Returns 0, or 1 for a bad dtype.
int emu_cross_entropy(int dtype, int variant, int vec, int row_fits, const void* logits, const int64_t* targets,
                      float* losses, void* dlogits, int64_t n, int V, float grad_scale) {
  emu::g_row_fits_shared_memory = row_fits != 0;
  const arcana::CeRun r{logits, targets, losses, dlogits, n, V, grad_scale, variant, vec != 0, nullptr};
  switch (dtype) {
    case 0: arcana::ce_launch<float>(r); return 0;
    case 1: arcana::ce_launch<__nv_bfloat16>(r); return 0;
    case 2: arcana::ce_launch<__half>(r); return 0;
    default: return 1;
  }
}

}  // extern "C"
