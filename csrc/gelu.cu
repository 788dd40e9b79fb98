// GELU, tanh approximation (GPT-2's): gelu(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), optionally
// of u = x + bias with bias the (C,) bias of the Linear layer before it, fused here instead of in the matmul.
//   gelu_fwd:  out = gelu(x [+ bias])
//   gelu_bwd:  dx = dout * gelu'(x [+ bias]); dbias = dx summed over rows (in fp32, deterministically), or an
//              empty (0,) tensor when there is no bias
// All arithmetic is fp32.
//
// The plain kernels (variant 0) take one element per thread and the textbook tanhf formula; dbias comes from a
// thread per column summing every row. The fast kernels (variant 1) move 128-bit vectors and use
// 0.5 (1 + tanh(z)) = sigmoid(2 z) = 1 / (1 + exp(-2 z)), one exponential and no cancellation near
// tanh = -1. The exponential is the hardware approximation __expf for bf16/fp16 (relative error ~1e-6 at these
// arguments, far below the 16-bit rounding) and the IEEE expf for fp32; the division is always __fdividef (2 ulp
// for a denominator below 2^126: here 1 + e <= 1 + e^80; the IEEE division's slow-path call spilled registers on
// sm_80). Without bias the tensor is one flat array (grid-stride, tail of numel % 8 handled one element per
// thread); with bias a block is 32 column vectors by 8 rows, each thread keeps its bias vector (and in the
// backward its dbias partial) in registers, and the backward's partials are combined in a fixed order as in
// layernorm.cu. Both grids are one resident wave, sized from the occupancy API.
//
// The fast kernels need 16-byte aligned data and, with bias, C * itemsize a multiple of 16 bytes; other inputs
// run the plain kernels.

#include "common.cuh"

#include <tuple>

namespace arcana {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// -----------------------------------------------------------------------------
// the math

__device__ __forceinline__ float gelu_plain(float u) {
  return 0.5f * u * (1.f + tanhf(kSqrt2OverPi * (u + kCubic * u * u * u)));
}

__device__ __forceinline__ float gelu_grad_plain(float u) {
  const float t = tanhf(kSqrt2OverPi * (u + kCubic * u * u * u));
  return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kCubic * u * u);
}

// exp(-2 z) with 2 z clamped to [-80, 80]: past that gelu(u) is u or 0 to far below fp32 resolution, and the
// clamp keeps e * s in the gradient finite (e overflows to inf near u = -10.1 otherwise). A NaN u stays NaN:
// every result below is multiplied by u.
template <bool PRECISE>
__device__ __forceinline__ float exp_minus_2z(float u) {
  const float z2 = fminf(fmaxf(2.f * kSqrt2OverPi * (u + kCubic * u * u * u), -80.f), 80.f);
  return PRECISE ? expf(-z2) : __expf(-z2);
}

template <bool PRECISE>
__device__ __forceinline__ float gelu_fast(float u) {
  return __fdividef(u, 1.f + exp_minus_2z<PRECISE>(u));
}

// d/du [u s(u)] with s = sigmoid(2 z(u)): s + u * 2 z'(u) * s (1 - s), and 1 - s = e s computed without
// cancellation.
template <bool PRECISE>
__device__ __forceinline__ float gelu_grad_fast(float u) {
  const float e = exp_minus_2z<PRECISE>(u);
  const float s = __fdividef(1.f, 1.f + e);
  const float dz2 = 2.f * kSqrt2OverPi * (1.f + 3.f * kCubic * u * u);
  return s + u * dz2 * s * (e * s);
}

// -----------------------------------------------------------------------------
// plain kernels (variant 0)

// One element per thread (grid-stride); the bias column is i % C.
template <typename T, bool BWD>
__global__ void __launch_bounds__(256) gelu_plain_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                                         const float* __restrict__ bias, T* __restrict__ out,
                                                         int64_t n, int64_t C) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float u = to_float(x[i]) + (bias != nullptr ? bias[i % C] : 0.f);
    out[i] = from_float<T>(BWD ? to_float(dout[i]) * gelu_grad_plain(u) : gelu_plain(u));
  }
}

// dbias[c] = sum over rows of dout * gelu'(x + bias), one thread per column, every row in order.
template <typename T>
__global__ void __launch_bounds__(256) gelu_dbias_plain_kernel(const T* __restrict__ dout,
                                                               const T* __restrict__ x,
                                                               const float* __restrict__ bias,
                                                               float* __restrict__ dbias, int64_t N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum = 0.f;
  for (int64_t row = 0; row < N; ++row) {
    sum += to_float(dout[row * C + c]) * gelu_grad_plain(to_float(x[row * C + c]) + bias[c]);
  }
  dbias[c] = sum;
}

// -----------------------------------------------------------------------------
// fast kernels (variant 1)

// No bias: x is nvec = n / V packed vectors and a tail of n % V elements.
template <typename T, bool BWD>
__global__ void __launch_bounds__(256) gelu_flat_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                                        T* __restrict__ out, int64_t n) {
  constexpr int V = vec_width<T>();
  constexpr bool kPrecise = std::is_same_v<T, float>;
  const int64_t nvec = n / V;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t start = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t i = start; i < nvec; i += stride) {
    float u[V], o[V];
    load_floats<V>(x + i * V, u);
    if constexpr (BWD) {
      float dy[V];
      load_floats<V>(dout + i * V, dy);
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = dy[k] * gelu_grad_fast<kPrecise>(u[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = gelu_fast<kPrecise>(u[k]);
    }
    store_floats<V>(out + i * V, o);
  }
  for (int64_t i = nvec * V + start; i < n; i += stride) {
    const float u = to_float(x[i]);
    out[i] = from_float<T>(BWD ? to_float(dout[i]) * gelu_grad_fast<kPrecise>(u) : gelu_fast<kPrecise>(u));
  }
}

constexpr int kBiasRows = 8;  // blockDim.y of gelu_bias_kernel; blockDim.x is 32 column vectors

// With bias: grid (column tiles of 32 vectors, row groups); each thread owns one column vector and visits rows
// threadIdx.y + kBiasRows * (blockIdx.y + gridDim.y * k). The backward writes part[blockIdx.y] (C floats), the
// dbias partial of its row group.
template <typename T, bool BWD>
__global__ void __launch_bounds__(32 * kBiasRows) gelu_bias_kernel(const T* __restrict__ dout,
                                                                   const T* __restrict__ x,
                                                                   const float* __restrict__ bias,
                                                                   T* __restrict__ out, float* __restrict__ part,
                                                                   int64_t N, int C) {
  constexpr int V = vec_width<T>();
  constexpr bool kPrecise = std::is_same_v<T, float>;
  const int nvec = C / V;
  const int j = blockIdx.x * 32 + threadIdx.x;
  const bool valid = j < nvec;
  float b[V], acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) b[k] = acc[k] = 0.f;
  if (valid) load_params<V>(bias + j * V, b);
  if (valid) {
    for (int64_t row = (int64_t)blockIdx.y * kBiasRows + threadIdx.y; row < N;
         row += (int64_t)gridDim.y * kBiasRows) {
      const int64_t off = row * C + (int64_t)j * V;
      float u[V], o[V];
      load_floats<V>(x + off, u);
      if constexpr (BWD) {
        float dy[V];
        load_floats<V>(dout + off, dy);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          o[k] = dy[k] * gelu_grad_fast<kPrecise>(u[k] + b[k]);
          acc[k] += o[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = gelu_fast<kPrecise>(u[k] + b[k]);
      }
      store_floats<V>(out + off, o);
    }
  }
  if constexpr (BWD) {
    // Fixed-order sum of the kBiasRows row partials of each column, then one partial per block.
    __shared__ float tile[kBiasRows][32 * V];
#pragma unroll
    for (int k = 0; k < V; ++k) tile[threadIdx.y][threadIdx.x * V + k] = acc[k];
    __syncthreads();
    const int c0 = blockIdx.x * 32 * V;  // first column of this tile
    for (int cc = threadIdx.y * 32 + threadIdx.x; cc < 32 * V; cc += 32 * kBiasRows) {
      if (c0 + cc < C) {
        float s = 0.f;
#pragma unroll
        for (int r = 0; r < kBiasRows; ++r) s += tile[r][cc];
        part[(int64_t)blockIdx.y * C + c0 + cc] = s;
      }
    }
  }
}

// -----------------------------------------------------------------------------
// launchers: raw pointers and sizes, no torch (tests/norm_gelu_emu.cpp runs them on the CPU)

struct GeluRun {
  const void* dout;  // nullptr: the forward, out = gelu(u); else the backward, out = dout * gelu'(u)
  const void* x;
  const float* bias;  // nullable; u = x + bias (broadcast over rows of c)
  void* out;
  float* dbias;  // the backward with bias: (c,) fp32, the sum of out over rows
  int64_t n;  // elements, at least 1
  int64_t c;  // bias length (x's last dimension) when there is a bias
  int variant;
  cudaStream_t stream;
};

// scratch(count) returns room for count floats (the dbias partials), alive until the kernels have run.
template <typename T, typename Scratch>
void gelu_launch(const GeluRun& g, Scratch&& scratch) {
  constexpr int V = vec_width<T>();
  const bool bwd = g.dout != nullptr;
  const bool has_bias = g.bias != nullptr;
  const bool fast = g.variant == 1 && aligned16(g.x) && aligned16(g.out) && (!bwd || aligned16(g.dout)) &&
                    (!has_bias || (aligned16(g.bias) && g.c % V == 0));
  const T* dout = static_cast<const T*>(g.dout);
  const T* x = static_cast<const T*>(g.x);
  T* out = static_cast<T*>(g.out);
  const DeviceShape dev = device_shape();
  if (!fast) {
    const int64_t blocks = std::min<int64_t>(ceil_div(g.n, 256), (int64_t)dev.sms * 32);
    const int64_t C = has_bias ? g.c : 1;
    if (bwd) {
      launch(gelu_plain_kernel<T, true>, dim3((unsigned)blocks), dim3(256), 0, g.stream, dout, x, g.bias, out, g.n,
             C);
      if (has_bias) {
        launch(gelu_dbias_plain_kernel<T>, dim3((unsigned)ceil_div(g.c, 256)), dim3(256), 0, g.stream, dout, x,
               g.bias, g.dbias, g.n / g.c, (int)g.c);
      }
    } else {
      launch(gelu_plain_kernel<T, false>, dim3((unsigned)blocks), dim3(256), 0, g.stream, dout, x, g.bias, out, g.n,
             C);
    }
    return;
  }
  // One resident wave: the blocks that the occupancy API says fit (the kernels' register counts differ), each
  // thread then looping over a few vectors.
  if (!has_bias) {
    const auto kernel = bwd ? gelu_flat_kernel<T, true> : gelu_flat_kernel<T, false>;
    const int64_t resident = (int64_t)dev.sms * resident_blocks_per_sm(kernel, 256, 0);
    const int64_t blocks = std::min<int64_t>(ceil_div(std::max<int64_t>(g.n / V, 1), 256), resident);
    launch(kernel, dim3((unsigned)blocks), dim3(256), 0, g.stream, dout, x, out, g.n);
    return;
  }
  const int64_t N = g.n / g.c;
  const int C = (int)g.c;
  const int64_t tiles = ceil_div(C / V, 32);
  const auto kernel = bwd ? gelu_bias_kernel<T, true> : gelu_bias_kernel<T, false>;
  const int64_t resident = (int64_t)dev.sms * resident_blocks_per_sm(kernel, 32 * kBiasRows, 0);
  const int64_t row_groups = std::min<int64_t>(
      std::min<int64_t>(ceil_div(N, kBiasRows), std::max<int64_t>(resident / tiles, 1)), 65535);
  const dim3 grid((unsigned)tiles, (unsigned)row_groups);
  float* part = bwd ? scratch(row_groups * C) : nullptr;  // the backward's dbias partials, one row per row group
  launch(kernel, grid, dim3(32, kBiasRows), 0, g.stream, dout, x, g.bias, out, part, N, C);
  if (bwd) launch_sum_partials(part, C, (int)row_groups, C, g.dbias, (float*)nullptr, g.stream);
}

#ifdef ARCANA_BINDINGS
// -----------------------------------------------------------------------------
// torch ops: checks, allocation, dispatch

// x (and its bias, converted to fp32) after the checks; n elements, c the bias length.
struct GeluInputs {
  int64_t n;
  int64_t c;
  at::Tensor bias;  // fp32, or undefined
};

GeluInputs check_gelu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_cuda(x, op, "x");
  check_kernel_dtype(x, op, "x");
  check_contiguous(x, op, "x");
  GeluInputs a{x.numel(), 0, at::Tensor()};
  if (bias.has_value()) {
    TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension when a bias is given, got a scalar");
    a.c = x.size(-1);
    TORCH_CHECK(a.c >= 1 && a.c <= INT32_MAX, op, ": x's last dimension must be between 1 and 2^31 - 1, got ",
                a.c);
    a.bias = column_param_f32(*bias, a.c, x, op, "bias");
  }
  return a;
}

// gelu (dout == nullptr) or its gradient into out; with a bias and dbias, also dbias (fp32, (C,)).
void gelu_run(const char* op, const at::Tensor* dout, const at::Tensor& x, const GeluInputs& a, at::Tensor& out,
              at::Tensor* dbias, cudaStream_t stream) {
  if (a.n == 0) {
    if (dbias != nullptr) dbias->zero_();
    return;
  }
  const GeluRun g{dout != nullptr ? dout->data_ptr() : nullptr, x.data_ptr(),
                  a.bias.defined() ? a.bias.data_ptr<float>() : nullptr, out.data_ptr(),
                  dbias != nullptr ? dbias->data_ptr<float>() : nullptr, a.n, a.c, std::min(kernel_variant(), 1),
                  stream};
  at::Tensor part;  // the dbias partials, alive until this function returns
  auto scratch = [&](int64_t count) {
    part = new_buffer({count}, x.options().dtype(at::kFloat), stream);
    return part.data_ptr<float>();
  };
  ARCANA_DISPATCH(x.scalar_type(), op, T, [&] { gelu_launch<T>(g, scratch); });
}

at::Tensor gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const char* op = "arcana::gelu_fwd";
  const GeluInputs a = check_gelu(op, x, bias);
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  at::Tensor out = new_buffer(x.sizes(), x.options(), stream);
  gelu_run(op, nullptr, x, a, out, nullptr, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd(const at::Tensor& dout, const at::Tensor& x,
                                            const std::optional<at::Tensor>& bias) {
  const char* op = "arcana::gelu_bwd";
  const GeluInputs a = check_gelu(op, x, bias);
  check_cuda(dout, op, "dout");
  check_same_device(dout, x, op, "dout", "x");
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(), op, ": dout (", dout.sizes(),
              ", ", dout.scalar_type(), ") must have x's shape and dtype (", x.sizes(), ", ", x.scalar_type(), ")");
  check_contiguous(dout, op, "dout");
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  at::Tensor dx = new_buffer(x.sizes(), x.options(), stream);
  if (!bias.has_value()) {
    gelu_run(op, &dout, x, a, dx, nullptr, stream);
    return {dx, at::empty({0}, x.options().dtype(at::kFloat))};
  }
  at::Tensor dbias = new_buffer({a.c}, x.options().dtype(at::kFloat), stream);
  gelu_run(op, &dout, x, a, dx, &dbias, stream);
  return {dx, dbias.to(bias->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(arcana, ARCANA_KERNEL_KEY, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
}

#else
}  // namespace
#endif  // ARCANA_BINDINGS

}  // namespace arcana
