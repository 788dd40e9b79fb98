// LayerNorm over the last dimension, and the fused residual add + LayerNorm:
//   layer_norm_fwd:      out = (x - mean) * rstd * weight + bias, saving mean and rstd (fp32, one per row)
//   add_layer_norm_fwd:  r = x + y; out = LayerNorm(r), returning r as well
//   layer_norm_bwd:      dx (+ the incoming gradient of r, for the fused op), dweight, dbias
// Rows are the last dimension of a contiguous tensor, C = x.size(-1); all arithmetic is fp32.
//
// Two kernels per op. The plain ones (variant 0) give a row to one warp and walk it with scalar loads, three
// passes over global memory; dweight/dbias come from a thread per column summing every row. The fast ones
// (variant 1) give a row to blockDim.x threads (a multiple of 32) that hold it in registers as fp32, read
// with one 128-bit load per thread per VPT vector, reduced first over each warp with shuffles and then over
// the row's warps through shared memory. A block works on blockDim.y rows at a time. The backward is
// persistent: each thread owns the same columns in every row it visits, so it sums its share of dweight and
// dbias in registers; the blockDim.y row groups then add theirs in a fixed order in shared memory, each block
// writes one partial row, and sum_partials_kernel adds the partials in a fixed order (deterministic, no
// atomics).
//
// The fast kernels need C * itemsize to be a multiple of 16 bytes, 16-byte aligned data and at most 2048
// vectors per row (C <= 16384 for bf16/fp16, 8192 for fp32); any other input runs the plain kernels.

#include "common.cuh"

#include <cmath>
#include <tuple>
#include <vector>

namespace arcana {
namespace {

constexpr int kMaxRowVectors = 2048;  // fast forward: 128-bit vectors per row (VPT <= 2, 1024 threads per row)
constexpr int kMaxRowVectorsBwd = 1024;  // fast backward: VPT = 1 (at VPT = 2 it would spill under 64 registers)

// -----------------------------------------------------------------------------
// plain kernels (variant 0)

// One warp per row (blockDim.x = 256: 8 rows per block). With ADD, pass 1 writes r and the later passes read
// it back; each lane reads only the elements it wrote itself.
template <typename TX, typename TY, bool ADD>
__global__ void __launch_bounds__(256) ln_fwd_plain_kernel(const TX* __restrict__ x, const TY* __restrict__ y,
                                                           TX* __restrict__ r, TX* __restrict__ out,
                                                           const float* __restrict__ w,
                                                           const float* __restrict__ b, float* __restrict__ mean,
                                                           float* __restrict__ rstd, int64_t N, int C, float eps) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const TX* xr = x + row * C;
  const TX* src = xr;
  if constexpr (ADD) {
    const TY* yr = y + row * C;
    TX* rr = r + row * C;
    for (int c = lane; c < C; c += 32) rr[c] = from_float<TX>(to_float(xr[c]) + to_float(yr[c]));
    src = rr;
  }
  float sum = 0.f;
  for (int c = lane; c < C; c += 32) sum += to_float(src[c]);
  const float mu = warp_sum(sum) / C;
  float sq = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float d = to_float(src[c]) - mu;
    sq += d * d;
  }
  const float rs = 1.f / sqrtf(warp_sum(sq) / C + eps);
  TX* outr = out + row * C;
  for (int c = lane; c < C; c += 32) outr[c] = from_float<TX>((to_float(src[c]) - mu) * rs * w[c] + b[c]);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx for one row per warp: two passes, the row sums first, then dx.
template <typename T>
__global__ void __launch_bounds__(256) ln_bwd_dx_plain_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                                              const float* __restrict__ w,
                                                              const float* __restrict__ mean,
                                                              const float* __restrict__ rstd,
                                                              const T* __restrict__ dr, T* __restrict__ dx,
                                                              int64_t N, int C) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const int64_t base = row * C;
  const float mu = mean[row], rs = rstd[row];
  float sum_g = 0.f, sum_gx = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float xhat = (to_float(x[base + c]) - mu) * rs;
    const float g = to_float(dout[base + c]) * w[c];
    sum_g += g;
    sum_gx += g * xhat;
  }
  const float mean_g = warp_sum(sum_g) / C;
  const float mean_gx = warp_sum(sum_gx) / C;
  for (int c = lane; c < C; c += 32) {
    const float xhat = (to_float(x[base + c]) - mu) * rs;
    const float g = to_float(dout[base + c]) * w[c];
    float d = rs * (g - mean_g - xhat * mean_gx);
    if (dr != nullptr) d += to_float(dr[base + c]);
    dx[base + c] = from_float<T>(d);
  }
}

// dweight and dbias: one thread per column, every row in order.
template <typename T>
__global__ void __launch_bounds__(256) ln_bwd_params_plain_kernel(const T* __restrict__ dout,
                                                                  const T* __restrict__ x,
                                                                  const float* __restrict__ mean,
                                                                  const float* __restrict__ rstd,
                                                                  float* __restrict__ dw, float* __restrict__ db,
                                                                  int64_t N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum_w = 0.f, sum_b = 0.f;
  for (int64_t row = 0; row < N; ++row) {
    const float dy = to_float(dout[row * C + c]);
    sum_w += dy * (to_float(x[row * C + c]) - mean[row]) * rstd[row];
    sum_b += dy;
  }
  dw[c] = sum_w;
  db[c] = sum_b;
}

// -----------------------------------------------------------------------------
// fast kernels (variant 1)

// Rows per block and threads per row for a row of nvec 128-bit vectors.
struct RowLayout {
  int vpt;  // vectors per thread
  int threads;  // per row, a multiple of 32
  int rows;  // per block
};

inline RowLayout row_layout(int nvec, int target_block_threads) {
  RowLayout l{};
  l.vpt = nvec <= 1024 ? 1 : 2;
  l.threads = (int)ceil_div(ceil_div(nvec, l.vpt), 32) * 32;
  l.rows = target_block_threads / l.threads > 1 ? target_block_threads / l.threads : 1;
  return l;
}

// Grid-stride over groups of blockDim.y rows; the loop condition is the same for the whole block (every thread
// must reach the __syncthreads in row_sum), and threads whose row is past N only take part in the reductions.
template <typename TX, typename TY, bool ADD, int VPT>
__global__ void __launch_bounds__(1024) ln_fwd_kernel(const TX* __restrict__ x, const TY* __restrict__ y,
                                                      TX* __restrict__ r, TX* __restrict__ out,
                                                      const float* __restrict__ w, const float* __restrict__ b,
                                                      float* __restrict__ mean, float* __restrict__ rstd,
                                                      int64_t N, int C, float eps) {
  constexpr int V = vec_width<TX>();
  __shared__ float red_mean[32];
  __shared__ float red_var[32];
  const int nvec = C / V;
  const float inv_c = 1.f / C;
  const int64_t step = (int64_t)gridDim.x * blockDim.y;
  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < N; first += step) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < N;
    float v[VPT][V];  // the row slice this thread owns, as fp32
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (active && j < nvec) {
        const int64_t off = row * C + (int64_t)j * V;
        load_floats<V>(x + off, v[k]);
        if constexpr (ADD) {
          float yv[V];
          load_floats<V>(y + off, yv);
          Pack<TX, V> rp;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            rp.v[i] = from_float<TX>(v[k][i] + yv[i]);
            v[k][i] = to_float(rp.v[i]);  // normalize r as stored, as x + y followed by LayerNorm would
          }
          store_pack<V>(r + off, rp);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) sum += v[k][i];
      }
    }
    const float mu = row_sum(sum, red_mean) * inv_c;
    float sq = 0.f;  // two-pass variance on the register-held row: no E[x^2] - E[x]^2 cancellation
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (active && j < nvec) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = v[k][i] - mu;
          sq += d * d;
        }
      }
    }
    const float rs = rsqrtf(row_sum(sq, red_var) * inv_c + eps);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (active && j < nvec) {
        float wv[V], bv[V], o[V];
        load_params<V>(w + j * V, wv);
        load_params<V>(b + j * V, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = (v[k][i] - mu) * rs * wv[i] + bv[i];
        store_floats<V>(out + row * C + (int64_t)j * V, o);
      }
    }
    if (active && threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// Persistent backward: dx row by row, dweight/dbias partials in registers, then one partial row per block in
// part[blockIdx.x] = (dweight partial (C), dbias partial (C)). Dynamic shared memory: 2 * C floats when
// blockDim.y > 1 (the fixed-order combine of the row groups), else none.
template <typename T, int VPT>
__global__ void __launch_bounds__(1024) ln_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                                      const float* __restrict__ w, const float* __restrict__ mean,
                                                      const float* __restrict__ rstd, const T* __restrict__ dr,
                                                      T* __restrict__ dx, float* __restrict__ part, int64_t N,
                                                      int C) {
  constexpr int V = vec_width<T>();
  ARCANA_SHARED_FLOATS(combine);
  __shared__ float2 red[2][32];
  const int nvec = C / V;
  const float inv_c = 1.f / C;
  float acc_w[VPT][V], acc_b[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int i = 0; i < V; ++i) acc_w[k][i] = acc_b[k][i] = 0.f;
  }
  const int64_t step = (int64_t)gridDim.x * blockDim.y;
  int parity = 0;  // alternate the reduction scratch between rows (see row_sum)
  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < N; first += step, parity ^= 1) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < N;
    const float mu = active ? mean[row] : 0.f;
    const float rs = active ? rstd[row] : 0.f;
    float xhat[VPT][V], g[VPT][V];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (active && j < nvec) {
        const int64_t off = row * C + (int64_t)j * V;
        float dy[V], xv[V], wv[V];
        load_floats<V>(dout + off, dy);
        load_floats<V>(x + off, xv);
        load_params<V>(w + j * V, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          xhat[k][i] = (xv[i] - mu) * rs;
          g[k][i] = dy[i] * wv[i];
          acc_w[k][i] += dy[i] * xhat[k][i];
          acc_b[k][i] += dy[i];
          sum_g += g[k][i];
          sum_gx += g[k][i] * xhat[k][i];
        }
      }
    }
    const float2 sums = row_sum2(make_float2(sum_g, sum_gx), red[parity]);
    const float mean_g = sums.x * inv_c, mean_gx = sums.y * inv_c;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (active && j < nvec) {
        const int64_t off = row * C + (int64_t)j * V;
        float d[V];
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = rs * (g[k][i] - mean_g - xhat[k][i] * mean_gx);
        if (dr != nullptr) {
          float dres[V];
          load_floats<V>(dr + off, dres);
#pragma unroll
          for (int i = 0; i < V; ++i) d[i] += dres[i];
        }
        store_floats<V>(dx + off, d);
      }
    }
  }

  float* part_w = part + (int64_t)blockIdx.x * 2 * C;
  float* part_b = part_w + C;
  if (blockDim.y == 1) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < nvec) {
        store_f32<V>(part_w + j * V, acc_w[k]);
        store_f32<V>(part_b + j * V, acc_b[k]);
      }
    }
    return;
  }
  float* s_w = combine;
  float* s_b = combine + C;
  for (int ry = 0; ry < (int)blockDim.y; ++ry) {  // row group 0 writes, the others add in order
    if (threadIdx.y == ry) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const int c = j * V + i;
            s_w[c] = ry == 0 ? acc_w[k][i] : s_w[c] + acc_w[k][i];
            s_b[c] = ry == 0 ? acc_b[k][i] : s_b[c] + acc_b[k][i];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < C; c += blockDim.x * blockDim.y) {
    part_w[c] = s_w[c];
    part_b[c] = s_b[c];
  }
}

// -----------------------------------------------------------------------------
// launchers: raw pointers and sizes, no torch (tests/norm_gelu_emu.cpp runs them on the CPU)

struct LnFwd {
  const void* x;
  const void* y;  // nullptr: plain LayerNorm; else r = x + y is written to r and normalized
  void* r;
  void* out;
  const float* w;
  const float* b;
  float* mean;
  float* rstd;
  int64_t n;  // rows, at least 1
  int c;
  float eps;
  int variant;
  cudaStream_t stream;
};

// y's dtype TY is TX, or TX is float (checked by the caller; other pairs are never launched).
template <typename TX, typename TY>
void ln_forward_launch(const LnFwd& f) {
  if constexpr (std::is_same_v<TX, TY> || std::is_same_v<TX, float>) {
    constexpr int V = vec_width<TX>();
    const TX* x = static_cast<const TX*>(f.x);
    const TY* y = static_cast<const TY*>(f.y);
    TX* r = static_cast<TX*>(f.r);
    TX* out = static_cast<TX*>(f.out);
    const bool add = f.y != nullptr;
    const bool fast = f.variant == 1 && f.c % V == 0 && f.c / V <= kMaxRowVectors && aligned16(f.x) &&
                      aligned16(f.out) && (!add || (aligned16(f.y) && aligned16(f.r))) && aligned16(f.w) &&
                      aligned16(f.b);
    if (!fast) {
      const dim3 grid((unsigned)ceil_div(f.n, 8));
      if (add) {
        launch(ln_fwd_plain_kernel<TX, TY, true>, grid, dim3(256), 0, f.stream, x, y, r, out, f.w, f.b, f.mean,
               f.rstd, f.n, f.c, f.eps);
      } else {
        launch(ln_fwd_plain_kernel<TX, TX, false>, grid, dim3(256), 0, f.stream, x, (const TX*)nullptr,
               (TX*)nullptr, out, f.w, f.b, f.mean, f.rstd, f.n, f.c, f.eps);
      }
      return;
    }
    const RowLayout l = row_layout(f.c / V, 256);
    const dim3 block(l.threads, l.rows);
    const dim3 grid((unsigned)std::min<int64_t>(ceil_div(f.n, l.rows), 1 << 30));
    auto run = [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      if (add) {
        launch(ln_fwd_kernel<TX, TY, true, VPT>, grid, block, 0, f.stream, x, y, r, out, f.w, f.b, f.mean, f.rstd,
               f.n, f.c, f.eps);
      } else if constexpr (std::is_same_v<TX, TY>) {  // plain LayerNorm is dispatched with TY = TX
        launch(ln_fwd_kernel<TX, TX, false, VPT>, grid, block, 0, f.stream, x, (const TX*)nullptr, (TX*)nullptr,
               out, f.w, f.b, f.mean, f.rstd, f.n, f.c, f.eps);
      }
    };
    if (l.vpt == 1) {
      run(std::integral_constant<int, 1>());
    } else {
      run(std::integral_constant<int, 2>());
    }
  }
}

struct LnBwd {
  const void* dout;
  const void* x;
  const float* w;
  const float* mean;
  const float* rstd;
  const void* dr;  // nullable
  void* dx;
  float* dw;
  float* db;
  int64_t n;  // rows, at least 1
  int c;
  int variant;
  cudaStream_t stream;
};

// scratch(count) returns room for count floats (the per-block partials), alive until the kernels have run.
template <typename T, typename Scratch>
void ln_backward_launch(const LnBwd& a, Scratch&& scratch) {
  constexpr int V = vec_width<T>();
  const T* dout = static_cast<const T*>(a.dout);
  const T* x = static_cast<const T*>(a.x);
  const T* dr = static_cast<const T*>(a.dr);
  T* dx = static_cast<T*>(a.dx);
  const bool fast = a.variant == 1 && a.c % V == 0 && a.c / V <= kMaxRowVectorsBwd && aligned16(a.x) &&
                    aligned16(a.dout) && aligned16(a.dx) && (a.dr == nullptr || aligned16(a.dr)) && aligned16(a.w);
  if (!fast) {
    launch(ln_bwd_dx_plain_kernel<T>, dim3((unsigned)ceil_div(a.n, 8)), dim3(256), 0, a.stream, dout, x, a.w,
           a.mean, a.rstd, dr, dx, a.n, a.c);
    launch(ln_bwd_params_plain_kernel<T>, dim3((unsigned)ceil_div(a.c, 256)), dim3(256), 0, a.stream, dout, x,
           a.mean, a.rstd, a.dw, a.db, a.n, a.c);
    return;
  }
  const RowLayout l = row_layout(a.c / V, 512);  // vpt == 1 here (kMaxRowVectorsBwd)
  const dim3 block(l.threads, l.rows);
  const size_t smem = l.rows > 1 ? 2 * (size_t)a.c * sizeof(float) : 0;
  // One resident wave: every block then visits about the same number of rows, and the partials stay few.
  const int64_t resident = (int64_t)device_shape().sms * resident_blocks_per_sm(ln_bwd_kernel<T, 1>,
                                                                                 l.threads * l.rows, smem);
  const int64_t blocks = std::min<int64_t>(ceil_div(a.n, l.rows), resident);
  float* part = scratch(blocks * 2 * a.c);
  launch(ln_bwd_kernel<T, 1>, dim3((unsigned)blocks), block, smem, a.stream, dout, x, a.w, a.mean, a.rstd, dr, dx,
         part, a.n, a.c);
  launch_sum_partials(part, 2 * (int64_t)a.c, (int)blocks, a.c, a.dw, a.db, a.stream);
}

#ifndef ARCANA_EMULATE
// -----------------------------------------------------------------------------
// torch ops: checks, allocation, dispatch

struct Rows {
  int64_t n;  // rows
  int c;  // row length
};

// x: a contiguous CUDA tensor of a kernel dtype with a non-empty last dimension.
Rows check_rows(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  check_kernel_dtype(x, op, name);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have at least one dimension (rows of C values), got a scalar");
  check_contiguous(x, op, name);
  const int64_t C = x.size(-1);
  TORCH_CHECK(C >= 1 && C <= INT32_MAX, op, ": ", name, "'s last dimension must be between 1 and 2^31 - 1, got ",
              C);
  return Rows{x.numel() / C, (int)C};
}

// Same shape, dtype and device as ref (dout, dr against x; y against x, where its dtype is checked apart).
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name,
                bool same_dtype) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes(), "; they must match");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  }
  check_contiguous(t, op, name);
}

// A per-row statistic saved by the forward: fp32, contiguous, one value per row.
void check_row_stat(const at::Tensor& t, const at::Tensor& x, int64_t rows, const char* op, const char* name) {
  check_cuda(t, op, name);
  check_same_device(t, x, op, name, "x");
  check_dtype(t, at::kFloat, op, name, "the forward saves it in float32");
  TORCH_CHECK(t.numel() == rows, op, ": ", name, " must hold one value per row of x (", rows, "), got ",
              t.numel());
  check_contiguous(t, op, name);
}

at::Tensor row_stat_buffer(const at::Tensor& x, cudaStream_t stream) {
  return new_buffer(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat), stream);
}

std::vector<at::Tensor> ln_forward(const char* op, const at::Tensor& x, const at::Tensor* y,
                                   const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const Rows rows = check_rows(x, op, "x");
  if (y != nullptr) {
    check_like(*y, x, op, "y", "x", false);
    check_kernel_dtype(*y, op, "y");
    TORCH_CHECK(y->scalar_type() == x.scalar_type() || x.scalar_type() == at::kFloat, op, ": y has dtype ",
                y->scalar_type(), " and x has dtype ", x.scalar_type(),
                "; y must have x's dtype, or x must be float32 (r = x + y then has x's dtype); cast them first");
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = column_param_f32(weight, rows.c, x, op, "weight");
  const at::Tensor b = column_param_f32(bias, rows.c, x, op, "bias");

  at::Tensor out = new_buffer(x.sizes(), x.options(), stream);
  at::Tensor r = y != nullptr ? new_buffer(x.sizes(), x.options(), stream) : at::Tensor();
  at::Tensor mean = row_stat_buffer(x, stream);
  at::Tensor rstd = row_stat_buffer(x, stream);
  std::vector<at::Tensor> result = y != nullptr ? std::vector<at::Tensor>{r, out, mean, rstd}
                                                : std::vector<at::Tensor>{out, mean, rstd};
  if (rows.n == 0) return result;
  const LnFwd f{x.data_ptr(), y != nullptr ? y->data_ptr() : nullptr, y != nullptr ? r.data_ptr() : nullptr,
                out.data_ptr(), w.data_ptr<float>(), b.data_ptr<float>(), mean.data_ptr<float>(),
                rstd.data_ptr<float>(), rows.n, rows.c, (float)eps, std::min(kernel_variant(), 1), stream};
  const at::ScalarType ytype = y != nullptr ? y->scalar_type() : x.scalar_type();
  ARCANA_DISPATCH(x.scalar_type(), op, TX, [&] {
    ARCANA_DISPATCH(ytype, op, TY, [&] { ln_forward_launch<TX, TY>(f); });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  auto res = ln_forward("arcana::layer_norm_fwd", x, nullptr, weight, bias, eps);
  return {res[0], res[1], res[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(const at::Tensor& x,
                                                                              const at::Tensor& y,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bias, double eps) {
  auto res = ln_forward("arcana::add_layer_norm_fwd", x, &y, weight, bias, eps);
  return {res[0], res[1], res[2], res[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dout, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd,
                                                              const std::optional<at::Tensor>& dr) {
  const char* op = "arcana::layer_norm_bwd";
  const Rows rows = check_rows(x, op, "x");
  check_like(dout, x, op, "dout", "x", true);
  if (dr.has_value()) check_like(*dr, x, op, "dr", "x", true);
  check_row_stat(mean, x, rows.n, op, "mean");
  check_row_stat(rstd, x, rows.n, op, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = column_param_f32(weight, rows.c, x, op, "weight");

  at::Tensor dx = new_buffer(x.sizes(), x.options(), stream);
  at::Tensor dw = new_buffer({rows.c}, x.options().dtype(at::kFloat), stream);
  at::Tensor db = new_buffer({rows.c}, x.options().dtype(at::kFloat), stream);
  if (rows.n == 0) {
    dw.zero_();
    db.zero_();
  } else {
    const LnBwd a{dout.data_ptr(), x.data_ptr(), w.data_ptr<float>(), mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), dr.has_value() ? dr->data_ptr() : nullptr, dx.data_ptr(),
                  dw.data_ptr<float>(), db.data_ptr<float>(), rows.n, rows.c, std::min(kernel_variant(), 1), stream};
    at::Tensor part;  // the partials, alive until this function returns (the caching allocator orders reuse)
    auto scratch = [&](int64_t count) {
      part = new_buffer({count}, x.options().dtype(at::kFloat), stream);
      return part.data_ptr<float>();
    };
    ARCANA_DISPATCH(x.scalar_type(), op, T, [&] { ln_backward_launch<T>(a, scratch); });
  }
  const at::ScalarType wtype = weight.scalar_type();
  return {dx, dw.to(wtype), db.to(wtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(arcana, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

#else
}  // namespace
#endif  // ARCANA_EMULATE

}  // namespace arcana
