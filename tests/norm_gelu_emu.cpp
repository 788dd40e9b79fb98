// CPU emulation of csrc/layernorm.cu and csrc/gelu.cu, so that their kernels and launchers (both variants) run
// here, on machines without a GPU; tests/test_kernels.py builds this file with g++ and calls it through ctypes
// on small shapes. It checks the index arithmetic, the row/block layouts, the reductions and their
// synchronization, the persistent loops and the partial sums; the fp32 numerics and the speed are the GPU
// run's to check.
//
// The CUDA execution model comes from emu_runtime.h. Here: the device shape, small (settable) so that the
// persistent kernels loop, and the occupancy the launchers ask for.

#include "emu_runtime.h"

namespace emu {
struct Shape {
  int sms = 2, threads_per_sm = 2048, blocks_per_sm = 1;
};
Shape g_shape;
}  // namespace emu

#define ARCANA_SHARED_FLOATS(name) float* name = reinterpret_cast<float*>(emu::tl.smem)

namespace arcana {
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
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
