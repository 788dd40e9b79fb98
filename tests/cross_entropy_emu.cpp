// CPU emulation of csrc/cross_entropy.cu, so that its kernels and launcher (every variant, both vector widths,
// with and without the shared-memory row) run on machines without a GPU; tests/test_cross_entropy.py builds
// this file with g++ and calls it through ctypes on small shapes. It checks the index arithmetic, the vector
// packing, the handling of -1 and out-of-range targets, the two-level reduction and its barriers; the GPU run
// checks the device's own numerics and the speed.
//
// The CUDA execution model comes from emu_runtime.h. Here: one-dimensional grids and blocks (the kernels use
// only x), and what the launcher is told about shared memory.

#include "emu_runtime.h"

namespace emu {
bool g_row_fits_shared_memory = true;  // what the launcher is told (settable: both paths run here)
}  // namespace emu

#define ARCANA_CE_SHARED_BYTES(name) unsigned char* name = emu::tl.smem

namespace arcana {
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (block.y != 1 || block.z != 1) emu::fail("block shape: (threads, 1, 1)");
  if (grid.y != 1 || grid.z != 1) emu::fail("grid shape: (blocks, 1, 1)");
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
}
namespace {
bool ce_row_fits_shared_memory(size_t) { return emu::g_row_fits_shared_memory; }
template <typename... Params>
void ce_allow_shared_memory(void (*)(Params...), size_t) {}
}  // namespace
}  // namespace arcana

// The kernel's emulated fast_exp2 calls exp2f where the GPU runs ex2.approx.ftz: its error and flush-to-zero.
#define exp2f(x) emu::ex2_approx_ftz(x)

#include "csrc/common.cuh"
#include "csrc/cross_entropy.cu"

// -----------------------------------------------------------------------------
// entry point for ctypes: dtype 0 = float32, 1 = bfloat16, 2 = float16; the caller owns every buffer

extern "C" {

// dlogits nullptr: no gradient. vec: the launcher's 128-bit-vector flag (the caller checks V and alignment).
// row_fits: what variant 1 is told about shared memory. Returns 0, or 1 for a bad dtype.
int emu_cross_entropy(int dtype, int variant, int vec, int row_fits, const void* logits, const int64_t* targets,
                      float* losses, void* dlogits, int64_t n, int V, float grad_scale) {
  emu::g_row_fits_shared_memory = row_fits != 0;
  const arcana::CeRun r{logits, targets, losses, dlogits, n, V, &grad_scale, variant, vec != 0, nullptr};
  switch (dtype) {
    case 0: arcana::ce_launch<float>(r); return 0;
    case 1: arcana::ce_launch<__nv_bfloat16>(r); return 0;
    case 2: arcana::ce_launch<__half>(r); return 0;
    default: return 1;
  }
}

}  // extern "C"
