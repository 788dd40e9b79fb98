// CPU emulation of the CUDA features csrc/layernorm.cu and csrc/gelu.cu use, so that their kernels and
// launchers (both variants) run here, on machines without a GPU; tests/test_kernels.py builds this file with g++
// and calls it through ctypes on small shapes. It checks the index arithmetic, the row/block layouts, the
// reductions and their synchronization, the persistent loops and the partial sums; the fp32 numerics and the
// speed are the GPU run's to check.
//
// Every CUDA thread of a block is an OS thread and the blocks of a grid run one after another. __syncthreads is
// a barrier over the block; __shfl_xor_sync a barrier over the 32 threads of a warp that exchange their values.
// __shared__ arrays are function statics, so every thread of the block sees the same one; dynamic shared
// memory starts as NaN bytes. The device shape is small (settable) so that the persistent kernels loop.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "norm/gelu emulator: %s (block %u,%u thread %u,%u)\n", what, blockIdx.x, blockIdx.y,
               threadIdx.x, threadIdx.y);
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
  void drop() {
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
  float* smem;
};
thread_local ThreadState tl;

struct Shape {
  int sms = 2, threads_per_sm = 2048, blocks_per_sm = 1;
};
Shape g_shape;

template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n % 32 || block.x % 32 || n > 1024) fail("block shape: blockDim.x and the block must be multiples of 32, <= 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::vector<float> smem(smem_bytes / sizeof(float) + 4, std::nanf(""));
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
            tl = ThreadState{&block_bar, warps[t / 32].get(), t % 32, smem.data()};
            kernel(args...);
            tl.warp->bar.drop();
            block_bar.drop();
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::tl.block_bar->wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
  emu::tl.warp->slot[emu::tl.lane] = v;
  emu::tl.warp->bar.wait();
  const float out = emu::tl.warp->slot[emu::tl.lane ^ lane_mask];
  emu::tl.warp->bar.wait();
  return out;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float emu_rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float emu_expf(float x) { return std::exp(x); }
inline float emu_fdividef(float a, float b) { return a / b; }

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define rsqrtf emu_rsqrtf
#define __expf emu_expf
#define __fdividef emu_fdividef
#define ARCANA_EMULATE 1
#define ARCANA_SHARED_FLOATS(name) float* name = emu::tl.smem

namespace arcana {
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu::run_grid(kernel, grid, block, smem, args...);
}
}  // namespace arcana

#include "../csrc/common.cuh"

namespace arcana {
inline DeviceShape device_shape() { return DeviceShape{emu::g_shape.sms, emu::g_shape.threads_per_sm}; }
template <typename... Params>
int resident_blocks_per_sm(void (*)(Params...), int, size_t) { return emu::g_shape.blocks_per_sm; }
}  // namespace arcana

#include "../csrc/layernorm.cu"
#include "../csrc/gelu.cu"

// -----------------------------------------------------------------------------
// entry points for ctypes: dtype 0 = float32, 1 = bfloat16, 2 = float16; the caller owns every buffer

namespace {

template <typename F>
bool dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); return true;
    case 1: f(__nv_bfloat16{}); return true;
    case 2: f(__half{}); return true;
    default: return false;
  }
}

// Scratch buffers for one launcher call, NaN-filled like fresh device memory.
struct Scratch {
  std::vector<std::vector<float>> buffers;
  float* operator()(int64_t count) {
    buffers.emplace_back(count, std::nanf(""));
    return buffers.back().data();
  }
};

}  // namespace

extern "C" {

void emu_set_shape(int sms, int threads_per_sm, int blocks_per_sm) {
  emu::g_shape = emu::Shape{sms, threads_per_sm, blocks_per_sm};
}

// ydtype -1: layer_norm_fwd (y and r unused), else add_layer_norm_fwd. Returns 0, or 1 for a bad dtype pair.
int emu_layer_norm_fwd(int xdtype, int ydtype, int variant, const void* x, const void* y, void* r, void* out,
                       const float* w, const float* b, float* mean, float* rstd, int64_t n, int c, float eps) {
  const arcana::LnFwd f{x, ydtype < 0 ? nullptr : y, ydtype < 0 ? nullptr : r, out, w, b, mean, rstd, n, c, eps,
                        variant, nullptr};
  bool ok = false;
  dispatch(xdtype, [&](auto tx) {
    ok = dispatch(ydtype < 0 ? xdtype : ydtype, [&](auto ty) {
      arcana::ln_forward_launch<decltype(tx), decltype(ty)>(f);
    });
  });
  return ok ? 0 : 1;
}

int emu_layer_norm_bwd(int dtype, int variant, const void* dout, const void* x, const float* w, const float* mean,
                       const float* rstd, const void* dr, void* dx, float* dw, float* db, int64_t n, int c) {
  const arcana::LnBwd a{dout, x, w, mean, rstd, dr, dx, dw, db, n, c, variant, nullptr};
  Scratch scratch;
  return dispatch(dtype, [&](auto t) { arcana::ln_backward_launch<decltype(t)>(a, scratch); }) ? 0 : 1;
}

// dout nullptr: the forward; bias nullptr: no bias (c unused).
int emu_gelu(int dtype, int variant, const void* dout, const void* x, const float* bias, void* out, float* dbias,
             int64_t n, int64_t c) {
  const arcana::GeluRun g{dout, x, bias, out, dbias, n, c, variant, nullptr};
  Scratch scratch;
  return dispatch(dtype, [&](auto t) { arcana::gelu_launch<decltype(t)>(g, scratch); }) ? 0 : 1;
}

}  // extern "C"
