// The whole arcana op library built for the CPU: the csrc/ source, kernels and torch bindings alike, with the
// kernels emulated (emu_runtime.h, attention_emu.h) and registered for CPU tensors. A process that imports this
// library as csrc.arcana_kernels instead of the real one (tests/emulated_ops.py) runs torch.ops.arcana.*, and on
// top of them csrc/__init__.py's autograd, CudaOps, the model and the start-of-run check, on CPU tensors, through
// the same input checks, allocation, dtype dispatch and launchers as a GPU run: a view whose data is not 16-byte
// aligned, or a wrong saved tensor, reaches the kernels as it would there.
//
// The device is a GPU of the architecture the build emulates (ARCANA_ARCH, emu_runtime.h: by default an H100,
// compute capability 9.0 with 227 KB of shared memory per block with opt-in; an A100 or an sm_86 GPU) with kSms
// SMs, so that the persistent kernels loop at small sizes. Each launch must fit it: dynamic shared memory above
// 48 KB only for a kernel that opted in with cudaFuncSetAttribute, never above the device's limit, a block within
// its kernel's __launch_bounds__ (emu_runtime.h), and cp.async reading only the tensors of its launch.
// tests/emulated_ops.py builds this file with -I pointing at a copy of the csrc/ it compiles
// (kernel_testing.emulator_sources): the repository's, ARCANA_CSRC's, or a scratch copy with a planted bug.

#include <Python.h>  // first, as Python asks

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <map>

// After the torch headers: emu_runtime.h defines CUDA's keywords and some intrinsics as macros.
#include "attention_emu.h"

#define ARCANA_EMULATE_OPS 1

namespace emu {

constexpr int kSms = 2, kThreadsPerSm = kArch.threads_per_sm, kBlockSmemDefault = 48 * 1024,
              kBlockSmemOptin = kArch.smem_per_block_optin, kSmSmem = kArch.smem_per_sm;

inline std::map<const void*, int> g_smem_optin;  // kernel -> the dynamic shared memory it opted into

// What a GPU refuses at launch, beyond the block shape (emu::run_grid checks that).
inline void check_launch(const void* kernel, size_t smem) {
  const auto it = g_smem_optin.find(kernel);
  if (smem > static_cast<size_t>(it == g_smem_optin.end() ? kBlockSmemDefault : it->second)) {
    fail("a launch with more dynamic shared memory than its kernel opted into (cudaFuncSetAttribute)");
  }
}

// The global memory an attention launch may read with cp.async, from its parameters (D from scale = 1 / sqrt(D)):
// qkv as far as its strides reach, and for the backward dout, lse and delta. Other launches read none.
template <typename P>
void set_cp_async_ranges(const P& p) {
  g_ranges.clear();
  if constexpr (requires { p.qkv; }) {
    const int64_t D = std::lround(1.0 / (static_cast<double>(p.scale) * p.scale));
    const int64_t rows = static_cast<int64_t>(p.B) * p.T * p.H;
    const int64_t qkv_end = (p.B - 1) * p.sb + (p.T - 1) * p.st + 2 * p.s3 + (p.H - 1) * p.sh + D;
    auto add = [](const void* lo, int64_t bytes) {
      const auto* c = static_cast<const unsigned char*>(lo);
      g_ranges.push_back({c, c + bytes});
    };
    add(p.qkv, qkv_end * static_cast<int64_t>(sizeof(*p.qkv)));
    if constexpr (requires { p.dout; }) {
      add(p.dout, rows * D * static_cast<int64_t>(sizeof(*p.dout)));
      add(p.lse, rows * 4);
      add(p.delta, rows * 4);
    }
  }
}

template <typename K, typename... Args>
void launch_attention(K kernel, dim3 grid, dim3 block, size_t smem, const Args&... args) {
  check_launch(reinterpret_cast<const void*>(kernel), smem);
  (set_cp_async_ranges(args), ...);
  launch(kernel, grid, block, smem, args...);
}

}  // namespace emu

// The CUDA runtime calls of the bindings and launchers, answered for the emulated device. The library is built
// with hidden visibility, so these never meet the real runtime that torch loads.
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kSms; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = emu::kThreadsPerSm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kBlockSmemOptin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::kSmSmem; break;
    case cudaDevAttrComputeCapabilityMajor: *value = ARCANA_ARCH / 100; break;
    default: emu::fail("cudaDeviceGetAttribute: an attribute the emulated device does not have");
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::kBlockSmemOptin) {
    return cudaErrorInvalidValue;
  }
  emu::g_smem_optin[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

}  // extern "C"

// cuda_runtime.h's overload for a kernel (only nvcc sees it there).
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, enum cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// The seams of common.cuh: the bindings' GPU-only calls, for CPU tensors; and the launches, on the emulated device.
#define ARCANA_KERNEL_KEY CPU
#define ARCANA_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr " failed on the emulated device")
#define ARCANA_SHARED_FLOATS(name) float* name = reinterpret_cast<float*>(emu::tl.smem)
#define ARCANA_CE_SHARED_BYTES(name) unsigned char* name = emu::tl.smem
#define ARCANA_DYNAMIC_SMEM(name) unsigned char* name = emu::tl.smem
#define ARCANA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu::launch_attention(kernel, grid, block, smem, __VA_ARGS__)

namespace arcana {

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  emu::check_launch(reinterpret_cast<const void*>(kernel), smem);
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
}

}  // namespace arcana

#include "csrc/common.cuh"

namespace arcana {

inline DeviceShape device_shape() { return DeviceShape{emu::kSms, emu::kThreadsPerSm}; }

// The occupancy API's answer, by threads and shared memory (registers are ptxas's to count: test_emulation.py).
template <typename... Params>
int resident_blocks_per_sm(void (*)(Params...), int threads, size_t smem) {
  const int by_smem = smem > 0 ? static_cast<int>(emu::kSmSmem / smem) : 32;
  return std::max(1, std::min({emu::kThreadsPerSm / threads, by_smem, 32}));
}

}  // namespace arcana

#include "csrc/layernorm.cu"
#include "csrc/gelu.cu"
// cross_entropy.cu's emulated fast_exp2 calls exp2f where the GPU runs ex2.approx.ftz: its error and flush-to-zero.
#define exp2f(x) emu::ex2_approx_ftz(x)
#include "csrc/cross_entropy.cu"
#undef exp2f
#include "csrc/attention.cu"
#include "csrc/ops.cpp"
