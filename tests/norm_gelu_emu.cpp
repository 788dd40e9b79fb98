// CPU emulation of csrc/layernorm.cu and csrc/gelu.cu, so that their kernels and launchers (both variants) run
// here, on machines without a GPU; tests/test_kernels.py builds this file with g++ and calls it through ctypes
// on small shapes. It checks the index arithmetic, the row/block layouts, the reductions and their
// synchronization, the persistent loops and the partial sums; the fp32 numerics and the speed are the GPU
// run's to check.
//
// The CUDA execution model comes from emu_runtime.h. Here: the device shape, small (settable) so that the
// persistent kernels loop, the occupancy the launchers ask for (settable: blocks_per_sm stands for the occupancy
// API's answer), and a record of each call's launches (grid, block, shared memory) for the tests of the layouts.

#include "emu_runtime.h"

namespace emu {
struct Shape {
  int sms = 2, threads_per_sm = 2048, blocks_per_sm = 1;
};
Shape g_shape;
}  // namespace emu

#define ARCANA_SHARED_FLOATS(name) float* name = reinterpret_cast<float*>(emu::tl.smem)

namespace emu {
struct Launch {
  dim3 grid, block;
  size_t smem;
};
std::vector<Launch> g_launches;  // those of the current entry point call, for the tests of the launch shapes
}  // namespace emu

namespace arcana {
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu::g_launches.push_back(emu::Launch{grid, block, smem});
  if (smem > 48 * 1024) emu::fail("more than 48 KB of dynamic shared memory: the launch fails without an opt-in");
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
}
}  // namespace arcana

#include "csrc/common.cuh"

namespace arcana {
inline DeviceShape device_shape() { return DeviceShape{emu::g_shape.sms, emu::g_shape.threads_per_sm}; }
template <typename... Params>
int resident_blocks_per_sm(void (*)(Params...), int, size_t) { return emu::g_shape.blocks_per_sm; }
}  // namespace arcana

#include "csrc/layernorm.cu"
#include "csrc/gelu.cu"

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

// The launches of the last entry point call, at most max of them, as (grid.x, grid.y, block.x, block.y, dynamic
// shared memory bytes) into out; returns how many there were.
int emu_launches(int64_t* out, int max) {
  const int n = static_cast<int>(emu::g_launches.size());
  for (int i = 0; i < std::min(n, max); ++i) {
    const emu::Launch& l = emu::g_launches[i];
    const int64_t row[5] = {l.grid.x, l.grid.y, l.block.x, l.block.y, static_cast<int64_t>(l.smem)};
    std::copy(row, row + 5, out + 5 * i);
  }
  return n;
}

// ydtype -1: layer_norm_fwd (y and r unused), else add_layer_norm_fwd; out has odtype. Returns 0, or 1 for a bad
// dtype code (pairs that the op refuses launch nothing).
int emu_layer_norm_fwd(int xdtype, int ydtype, int odtype, int variant, const void* x, const void* y, void* r,
                       void* out, const float* w, const float* b, float* mean, float* rstd, int64_t n, int c,
                       float eps) {
  emu::g_launches.clear();
  const arcana::LnFwd f{x, ydtype < 0 ? nullptr : y, ydtype < 0 ? nullptr : r, out, w, b, mean, rstd, n, c, eps,
                        variant, nullptr};
  bool ok = false;
  dispatch(xdtype, [&](auto tx) {
    dispatch(ydtype < 0 ? xdtype : ydtype, [&](auto ty) {
      ok = dispatch(odtype, [&](auto to) {
        arcana::ln_forward_launch<decltype(tx), decltype(ty), decltype(to)>(f);
      });
    });
  });
  return ok ? 0 : 1;
}

// dout has ddtype; dydtype -1: no dy (dy unused), else dy has dydtype.
int emu_layer_norm_bwd(int xdtype, int ddtype, int dydtype, int variant, const void* dout, const void* x,
                       const float* w, const float* mean, const float* rstd, const void* dr, void* dx, void* dy,
                       float* dw, float* db, int64_t n, int c) {
  emu::g_launches.clear();
  const arcana::LnBwd a{dout, x, w, mean, rstd, dr, dx, dydtype < 0 ? nullptr : dy, dw, db, n, c, variant, nullptr};
  Scratch scratch;
  bool ok = false;
  dispatch(xdtype, [&](auto tx) {
    dispatch(ddtype, [&](auto td) {
      ok = dispatch(dydtype < 0 ? xdtype : dydtype, [&](auto ty) {
        arcana::ln_backward_launch<decltype(tx), decltype(td), decltype(ty)>(a, scratch);
      });
    });
  });
  return ok ? 0 : 1;
}

// dout nullptr: the forward; bias nullptr: no bias (c unused).
int emu_gelu(int dtype, int variant, const void* dout, const void* x, const float* bias, void* out, float* dbias,
             int64_t n, int64_t c) {
  emu::g_launches.clear();
  const arcana::GeluRun g{dout, x, bias, out, dbias, n, c, variant, nullptr};
  Scratch scratch;
  return dispatch(dtype, [&](auto t) { arcana::gelu_launch<decltype(t)>(g, scratch); }) ? 0 : 1;
}

}  // extern "C"
