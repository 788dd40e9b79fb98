// Shared code for the arcana kernels: input checks and output allocation for the host launchers, the dtype
// dispatch, packed 128-bit loads and stores, fp32 conversions, and warp/row reductions for the device code.
// Every .cu file includes this header; ops.cpp (the schemas) does not.
//
// Three builds compile it. The extension (nvcc): everything. A kernel emulator (tests/*_emu.cpp, ARCANA_EMULATE):
// the device code and the torch-free launchers, for the CPU; the emulator supplies launch, device_shape,
// resident_blocks_per_sm and ARCANA_SHARED_FLOATS itself. The emulated library (tests/emu_ops.cpp,
// ARCANA_EMULATE and ARCANA_EMULATE_OPS): the same plus the torch bindings (ARCANA_BINDINGS), registered for the
// CPU, so that the emulated kernels run behind the checks, allocation and dispatch a GPU run uses; it defines the
// bindings' few GPU-only calls (the seams below) and answers their CUDA runtime calls for an emulated device.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if !defined(ARCANA_EMULATE) || defined(ARCANA_EMULATE_OPS)
#define ARCANA_BINDINGS 1
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#endif
#ifndef ARCANA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// The architecture that device code is compiled for, in __CUDA_ARCH__'s numbers (800 for sm_80, 900 for sm_90), and
// 0 in nvcc's host pass. Device code branches on this, not on __CUDA_ARCH__: the CPU emulators cannot define
// __CUDA_ARCH__ (the CUDA headers would take g++ for nvcc), so they set ARCANA_ARCH instead, once per target.
#ifndef ARCANA_ARCH
#ifdef __CUDA_ARCH__
#define ARCANA_ARCH __CUDA_ARCH__
#else
#define ARCANA_ARCH 0
#endif
#endif

namespace arcana {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Streaming multiprocessors and resident threads per SM of the current device: sizes persistent grids.
struct DeviceShape {
  int sms;
  int threads_per_sm;
};

#ifndef ARCANA_EMULATE
// -----------------------------------------------------------------------------
// host side: launching

inline DeviceShape device_shape() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  DeviceShape s{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&s.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  return s;
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that fit on one SM at once.
template <typename... Params>
int resident_blocks_per_sm(void (*kernel)(Params...), int threads, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return std::max(blocks, 1);
}

// The kernel's dynamic shared memory, as floats.
#define ARCANA_SHARED_FLOATS(name) extern __shared__ __align__(16) float name[]

// The bindings' GPU-only calls, each named once (tests/emu_ops.cpp defines them for the CPU).
#define ARCANA_KERNEL_KEY CUDA               // the dispatch key the ops' kernels are registered for
#define ARCANA_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)  // a CUDA runtime call that must succeed
using DeviceGuard = c10::cuda::CUDAGuard;  // makes the inputs' GPU the current one
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
#endif  // ARCANA_EMULATE

#ifdef ARCANA_BINDINGS
// -----------------------------------------------------------------------------
// host side: checks that say what is wrong and what to do

// Defined in ops.cpp: set by torch.ops.arcana._set_poison (tests only).
bool poison_enabled();
// Defined in ops.cpp: the kernels the ops run, set by torch.ops.arcana._set_variant (tests and benchmarks only):
// 0 the plain ones, 1 the fast ones (the default), 2 the fast ones with cross-entropy rows re-read from L2 (the
// other ops run their fast kernels under 2).
int kernel_variant();

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " must be a CUDA tensor, got ", t.device(),
              "; move it with .cuda() or use --kernels torch");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; put every input on the same GPU");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got sizes ", t.sizes(), " and strides ",
              t.strides(), "; call .contiguous() on it first");
}

inline bool is_kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

inline void check_kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
              "; expected float32, bfloat16 or float16");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name,
                        const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              expected, " (", why, ")");
}

// A vector of per-column parameters (LayerNorm weight/bias, a Linear bias): 1-D of length C, any kernel dtype.
// The kernels read them as fp32; converting C elements here costs nothing next to the (rows, C) tensors.
inline at::Tensor column_param_f32(const at::Tensor& p, int64_t C, const at::Tensor& x, const char* op,
                                   const char* name) {
  check_cuda(p, op, name);
  check_same_device(p, x, op, name, "x");
  check_kernel_dtype(p, op, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must have shape (", C,
              ",) to match x's last dimension, got ", p.sizes());
  return p.to(at::kFloat).contiguous();
}

// Every output and scratch buffer comes from here, so the tests can poison them (all bits set: NaN in fp32,
// bf16 and fp16) and catch an element a kernel forgot to write.
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_enabled() && t.numel() > 0) {
    ARCANA_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), stream));
  }
  return t;
}

// The one dtype switch: runs the lambda __VA_ARGS__ with T bound to the CUDA type (float, __nv_bfloat16,
// __half) of SCALAR_TYPE, and refuses any other dtype.
#define ARCANA_DISPATCH(SCALAR_TYPE, OP, T, ...)                                                     \
  [&] {                                                                                              \
    switch (SCALAR_TYPE) {                                                                           \
      case at::ScalarType::Float: {                                                                  \
        using T = float;                                                                             \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::ScalarType::BFloat16: {                                                               \
        using T = __nv_bfloat16;                                                                     \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::ScalarType::Half: {                                                                   \
        using T = __half;                                                                            \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      default:                                                                                       \
        TORCH_CHECK(false, OP, ": unsupported dtype ", SCALAR_TYPE,                                  \
                    "; expected float32, bfloat16 or float16");                                      \
    }                                                                                                \
  }()

#endif  // ARCANA_BINDINGS

// -----------------------------------------------------------------------------
// device side: conversions, packed memory access, reductions

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Elements of T in one 128-bit access: 4 floats or 8 bf16/fp16 values.
template <typename T>
constexpr int vec_width() { return 16 / sizeof(T); }

// N values of T moved as one access of sizeof(T) * N bytes (16 -> LDG.E.128/STG.E.128, 8 -> .64).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int BYTES>
struct RawBits;
template <>
struct RawBits<16> { using type = uint4; };
template <>
struct RawBits<8> { using type = uint2; };
template <>
struct RawBits<4> { using type = unsigned int; };
template <>
struct RawBits<2> { using type = unsigned short; };

// p must be aligned to sizeof(T) * N bytes (the launchers check it before choosing the packed kernels).
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  using Raw = typename RawBits<sizeof(T) * N>::type;
  Raw raw = *reinterpret_cast<const Raw*>(p);
  Pack<T, N> out;
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& value) {
  using Raw = typename RawBits<sizeof(T) * N>::type;
  Raw raw;
  memcpy(&raw, &value, sizeof(raw));
  *reinterpret_cast<Raw*>(p) = raw;
}

// N consecutive values of T as fp32.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = load_pack<N>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

// N fp32 values rounded to T and stored as one packed access.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  store_pack<N>(p, pack);
}

// N fp32 parameters (weight, bias), read through the read-only path as float4s; p is 16-byte aligned.
template <int N>
__device__ __forceinline__ void load_params(const float* p, float (&out)[N]) {
  static_assert(N % 4 == 0, "parameters are read four floats at a time");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p + i));
    out[i] = q.x;
    out[i + 1] = q.y;
    out[i + 2] = q.z;
    out[i + 3] = q.w;
  }
}

// N fp32 values stored as float4s (per-column partial sums); p is 16-byte aligned.
template <int N>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[N]) {
  static_assert(N % 4 == 0, "stored four floats at a time");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    *reinterpret_cast<float4*>(p + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
  }
}

// Sum over the 32 lanes of a warp; every lane gets the same (bitwise) result, since each butterfly step
// adds the same two partial sums on both partner lanes.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads of one row group: a block is blockDim.y rows of blockDim.x threads (a multiple of 32),
// and the threads with the same threadIdx.y own one row. red holds one float per warp of the block. Every
// thread of the block must call this (it synchronizes the block when a row spans several warps); every thread
// of the row gets the same result, summed in a fixed order. Consecutive calls must use different red arrays
// (two suffice: see the kernels that alternate them).
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return v;
  float* mine = red + threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps_per_row; ++w) s += mine[w];
  return s;
}

// row_sum for two values at once (one synchronization instead of two); red holds one float2 per warp.
__device__ __forceinline__ float2 row_sum2(float2 v, float2* red) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return v;
  float2* mine = red + threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  for (int w = 0; w < warps_per_row; ++w) {
    s.x += mine[w].x;
    s.y += mine[w].y;
  }
  return s;
}

// Column sums of per-block partials, the second half of every deterministic column reduction (LayerNorm's
// dweight/dbias, GELU's dbias): out_k[c] = sum over p < P of part[p * stride + k * C + c] for k = blockIdx.y
// (0 or 1), always in the same order. blockDim = (32, ROWS): threadIdx.x picks the column, threadIdx.y strides
// over p, and the ROWS partial sums are added in order at the end.
template <int ROWS>
__global__ void __launch_bounds__(32 * ROWS) sum_partials_kernel(const float* __restrict__ part, int64_t stride,
                                                                  int P, int C, float* __restrict__ out0,
                                                                  float* __restrict__ out1) {
  __shared__ float tile[ROWS][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const float* src = part + (int64_t)blockIdx.y * C;
  float s = 0.f;
  if (c < C) {
    for (int p = threadIdx.y; p < P; p += ROWS) s += src[(int64_t)p * stride + c];
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) t += tile[i][threadIdx.x];
    (blockIdx.y == 0 ? out0 : out1)[c] = t;
  }
}

// Launches sum_partials_kernel for one (out1 == nullptr) or two column sums.
inline void launch_sum_partials(const float* part, int64_t stride, int P, int C, float* out0, float* out1,
                                cudaStream_t stream) {
  constexpr int kRows = 32;
  const dim3 grid((unsigned)ceil_div(C, 32), out1 ? 2 : 1);
  launch(sum_partials_kernel<kRows>, grid, dim3(32, kRows), 0, stream, part, stride, P, C, out0, out1);
}

}  // namespace arcana
