// LayerNorm over the last dimension, and the fused residual add + LayerNorm:
//   layer_norm_fwd:      out = (x - mean) * rstd * weight + bias, saving mean and rstd (fp32, one per row)
//   add_layer_norm_fwd:  r = x + y; out = LayerNorm(r), returning r as well
//   layer_norm_bwd:      dx (+ the incoming gradient of r, for the fused op), dweight, dbias, and on request dx
//                        once more in y's dtype (dy, for the fused op's 16-bit y)
// Rows are the last dimension of a contiguous tensor, C = x.size(-1); all arithmetic is fp32. The other
// row tensors (y, out, dout, dy) have x's dtype, or x is float32 and they have any kernel dtype: under autocast
// the residual stream x and r stay float32 while y, out and their gradients are in the matmuls' 16-bit dtype,
// so no cast kernel runs between a LayerNorm and the Linear after it, in either direction.
//
// Two kernels per op. The plain ones (variant 0) give a row to one warp and walk it with scalar loads, three
// passes over global memory; dweight/dbias come from a thread per column summing every row. The fast ones
// (variant 1) give a row to blockDim.x threads (a multiple of 32) that hold it in registers as fp32, read with
// one 128-bit load of x per thread, reduced first over each warp with shuffles and then over the row's warps
// through shared memory. A block works on blockDim.y rows at a time and the grid is one resident wave
// (persistent), so each thread owns the same columns in every row it visits: the block copies weight and bias
// to shared memory once, before its first row, and every load of a row (x, y; dout, x, dr in the backward) is
// issued before the row's reductions, whose latency then covers theirs. The backward sums its share of dweight
// and dbias in registers; the blockDim.y row groups then add theirs in a fixed order in shared memory, each
// block writes one partial row, and sum_partials_kernel adds the partials in a fixed order (deterministic, no
// atomics).
//
// The fast kernels need C a multiple of x's vector width (16 bytes), 16-byte aligned data and at most 1024
// vectors per row (C <= 8192 for bf16/fp16 x, 4096 for fp32), and the forward C <= 6144 (kMaxDynamicSmem); any
// other input runs the plain kernels.

#include "common.cuh"

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace arcana {
namespace {

// Fast kernels: 128-bit vectors of x per row, one per thread (1024 threads; two per thread would spill under the
// 64 registers that 1024-thread blocks leave).
constexpr int kMaxRowVectors = 1024;
// Dynamic shared memory a launch gets without opting in (cudaFuncSetAttribute). The forward's weight and bias take
// 2 C floats, so it takes the fast path up to C = 6144; the backward's C floats (3 C with several rows to a
// block, which needs C / V <= 256) stay under it for every row the fast path takes.
constexpr size_t kMaxDynamicSmem = 48 * 1024;

// The dtype rule above: a row tensor of dtype T may go with x of dtype TX.
template <typename TX, typename T>
constexpr bool pairs_with_x = std::is_same_v<T, TX> || std::is_same_v<TX, float>;

// -----------------------------------------------------------------------------
// plain kernels (variant 0)

// One warp per row (blockDim.x = 256: 8 rows per block). With ADD, pass 1 writes r and the later passes read
// it back; each lane reads only the elements it wrote itself.
template <typename TX, typename TY, typename TO, bool ADD>
__global__ void __launch_bounds__(256) ln_fwd_plain_kernel(const TX* __restrict__ x, const TY* __restrict__ y,
                                                           TX* __restrict__ r, TO* __restrict__ out,
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
  TO* outr = out + row * C;
  for (int c = lane; c < C; c += 32) outr[c] = from_float<TO>((to_float(src[c]) - mu) * rs * w[c] + b[c]);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx (and dy) for one row per warp: two passes, the row sums first, then dx.
template <typename TX, typename TD, typename TY>
__global__ void __launch_bounds__(256) ln_bwd_dx_plain_kernel(const TD* __restrict__ dout,
                                                              const TX* __restrict__ x, const float* __restrict__ w,
                                                              const float* __restrict__ mean,
                                                              const float* __restrict__ rstd,
                                                              const TX* __restrict__ dr, TX* __restrict__ dx,
                                                              TY* __restrict__ dy, int64_t N, int C) {
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
    dx[base + c] = from_float<TX>(d);
    if (dy != nullptr) dy[base + c] = from_float<TY>(d);
  }
}

// dweight and dbias: one thread per column, every row in order.
template <typename TX, typename TD>
__global__ void __launch_bounds__(256) ln_bwd_params_plain_kernel(const TD* __restrict__ dout,
                                                                  const TX* __restrict__ x,
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

// Rows per block and threads per row for a row of nvec 128-bit vectors, one per thread.
struct RowLayout {
  int threads;  // per row, a multiple of 32
  int rows;  // per block
};

// Blocks of about 512 threads: short rows (up to 256 vectors) go two or more to a block, so that blocks of
// short rows reach the SM's thread limit before its block limit (16 or 32 blocks: 32-thread blocks would fill at
// most a quarter or half of an SM), and a block's shared copy of weight and bias serves more rows.
inline RowLayout row_layout(int nvec) {
  constexpr int kBlockThreads = 512;
  const int threads = (int)ceil_div(nvec, 32) * 32;
  return RowLayout{threads, std::max(kBlockThreads / threads, 1)};
}

// Blocks of `threads` threads and `smem` bytes for a one-wave (persistent) grid of kernel: as many as fit on the
// device at once, and no more than there are units of work.
template <typename... Params>
int64_t one_wave(void (*kernel)(Params...), int threads, size_t smem, int64_t work) {
  const int64_t resident = (int64_t)device_shape().sms * resident_blocks_per_sm(kernel, threads, smem);
  return std::min(work, resident);
}

// Persistent, one vector of V columns per thread, the same in every row. Dynamic shared memory: weight and bias
// (2 * C floats), copied in once per block before any row, so that after a row's reductions they are a
// shared-memory read away rather than a global one (in registers they would cost 2 V per thread, and occupancy).
// Grid-stride over groups of blockDim.y rows; the loop condition is the same for the whole block (every thread
// must reach the __syncthreads in row_sum), and threads whose row is past N only take part in the reductions.
template <typename TX, typename TY, typename TO, bool ADD>
__global__ void __launch_bounds__(1024) ln_fwd_kernel(const TX* __restrict__ x, const TY* __restrict__ y,
                                                      TX* __restrict__ r, TO* __restrict__ out,
                                                      const float* __restrict__ w, const float* __restrict__ b,
                                                      float* __restrict__ mean, float* __restrict__ rstd,
                                                      int64_t N, int C, float eps) {
  constexpr int V = vec_width<TX>();
  ARCANA_SHARED_FLOATS(params);
  __shared__ float red_mean[32];
  __shared__ float red_var[32];
  const int j = threadIdx.x;
  const bool owner = j < C / V;
  const float inv_c = 1.f / C;
  float* w_s = params;
  float* b_s = params + C;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < C / 4; i += blockDim.x * blockDim.y) {
    reinterpret_cast<float4*>(w_s)[i] = __ldg(reinterpret_cast<const float4*>(w) + i);
    reinterpret_cast<float4*>(b_s)[i] = __ldg(reinterpret_cast<const float4*>(b) + i);
  }
  __syncthreads();
  const int64_t step = (int64_t)gridDim.x * blockDim.y;
  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < N; first += step) {
    const int64_t row = first + threadIdx.y;
    const bool active = owner && row < N;
    const int64_t off = row * C + (int64_t)j * V;
    float v[V];  // the row slice this thread owns, as fp32
    float sum = 0.f;
    if (active) {
      load_floats<V>(x + off, v);
      if constexpr (ADD) {
        float yv[V];
        load_floats<V>(y + off, yv);
        Pack<TX, V> rp;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          rp.v[i] = from_float<TX>(v[i] + yv[i]);
          v[i] = to_float(rp.v[i]);  // normalize r as stored, as x + y followed by LayerNorm would
        }
        store_pack<V>(r + off, rp);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) sum += v[i];
    }
    const float mu = row_sum(sum, red_mean) * inv_c;
    float sq = 0.f;  // two-pass variance on the register-held row: no E[x^2] - E[x]^2 cancellation
    if (active) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = v[i] - mu;
        sq += d * d;
      }
    }
    const float rs = rsqrtf(row_sum(sq, red_var) * inv_c + eps);
    if (active) {
      float o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = (v[i] - mu) * rs * w_s[j * V + i] + b_s[j * V + i];
      store_floats<V>(out + off, o);  // 16 or 8 bytes: out's dtype may be narrower than x's
      if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
      }
    }
  }
}

// Persistent backward, one vector of V columns per thread, the same in every row: dx (and dy) row by row,
// dweight/dbias partials in registers, then one partial row per block in part[blockIdx.x] = (dweight partial (C),
// dbias partial (C)). Dynamic shared memory: weight (C floats, copied in once per block, as in the forward), then
// 2 * C floats when blockDim.y > 1 for the fixed-order combine of the row groups.
template <typename TX, typename TD, typename TY>
__global__ void __launch_bounds__(1024) ln_bwd_kernel(const TD* __restrict__ dout, const TX* __restrict__ x,
                                                      const float* __restrict__ w, const float* __restrict__ mean,
                                                      const float* __restrict__ rstd, const TX* __restrict__ dr,
                                                      TX* __restrict__ dx, TY* __restrict__ dy,
                                                      float* __restrict__ part, int64_t N, int C) {
  constexpr int V = vec_width<TX>();
  ARCANA_SHARED_FLOATS(smem);
  __shared__ float2 red[2][32];
  const int j = threadIdx.x;
  const bool owner = j < C / V;
  const float inv_c = 1.f / C;
  float* w_s = smem;
  for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < C / 4; i += blockDim.x * blockDim.y) {
    reinterpret_cast<float4*>(w_s)[i] = __ldg(reinterpret_cast<const float4*>(w) + i);
  }
  __syncthreads();
  float acc_w[V], acc_b[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc_w[i] = acc_b[i] = 0.f;
  const int64_t step = (int64_t)gridDim.x * blockDim.y;
  int parity = 0;  // alternate the reduction scratch between rows (see row_sum)
  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < N; first += step, parity ^= 1) {
    const int64_t row = first + threadIdx.y;
    const bool active = owner && row < N;
    const int64_t off = row * C + (int64_t)j * V;
    const float rs = active ? rstd[row] : 0.f;
    float xhat[V], g[V], dres[V];
    float sum_g = 0.f, sum_gx = 0.f;
    if (active) {
      const float mu = mean[row];
      float dyv[V], xv[V];
      load_floats<V>(dout + off, dyv);
      load_floats<V>(x + off, xv);
      if (dr != nullptr) load_floats<V>(dr + off, dres);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        xhat[i] = (xv[i] - mu) * rs;
        g[i] = dyv[i] * w_s[j * V + i];
        acc_w[i] += dyv[i] * xhat[i];
        acc_b[i] += dyv[i];
        sum_g += g[i];
        sum_gx += g[i] * xhat[i];
      }
    }
    const float2 sums = row_sum2(make_float2(sum_g, sum_gx), red[parity]);
    const float mean_g = sums.x * inv_c, mean_gx = sums.y * inv_c;
    if (active) {
      float d[V];
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = rs * (g[i] - mean_g - xhat[i] * mean_gx);
      if (dr != nullptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] += dres[i];
      }
      store_floats<V>(dx + off, d);
      if (dy != nullptr) store_floats<V>(dy + off, d);  // the same fp32 values, rounded once to y's dtype
    }
  }

  float* part_w = part + (int64_t)blockIdx.x * 2 * C;
  float* part_b = part_w + C;
  if (blockDim.y == 1) {
    if (owner) {
      store_f32<V>(part_w + j * V, acc_w);
      store_f32<V>(part_b + j * V, acc_b);
    }
    return;
  }
  float* s_w = smem + C;
  float* s_b = smem + 2 * C;
  for (int ry = 0; ry < (int)blockDim.y; ++ry) {  // row group 0 writes, the others add in order
    if (threadIdx.y == ry && owner) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int c = j * V + i;
        s_w[c] = ry == 0 ? acc_w[i] : s_w[c] + acc_w[i];
        s_b[c] = ry == 0 ? acc_b[i] : s_b[c] + acc_b[i];
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

// x, y, out of dtypes TX, TY, TO (TY = TX without y); pairs other than pairs_with_x are never launched (the caller
// checks the dtypes).
template <typename TX, typename TY, typename TO>
void ln_forward_launch(const LnFwd& f) {
  if constexpr (pairs_with_x<TX, TY> && pairs_with_x<TX, TO>) {
    constexpr int V = vec_width<TX>();
    const TX* x = static_cast<const TX*>(f.x);
    const TY* y = static_cast<const TY*>(f.y);
    TX* r = static_cast<TX*>(f.r);
    TO* out = static_cast<TO*>(f.out);
    const bool add = f.y != nullptr;
    const size_t smem = 2 * (size_t)f.c * sizeof(float);
    const bool fast = f.variant == 1 && f.c % V == 0 && f.c / V <= kMaxRowVectors && smem <= kMaxDynamicSmem &&
                      aligned16(f.x) && aligned16(f.out) && (!add || (aligned16(f.y) && aligned16(f.r))) &&
                      aligned16(f.w) && aligned16(f.b);
    if (!fast) {
      const dim3 grid((unsigned)ceil_div(f.n, 8));
      if (add) {
        launch(ln_fwd_plain_kernel<TX, TY, TO, true>, grid, dim3(256), 0, f.stream, x, y, r, out, f.w, f.b, f.mean,
               f.rstd, f.n, f.c, f.eps);
      } else if constexpr (std::is_same_v<TX, TY>) {
        launch(ln_fwd_plain_kernel<TX, TX, TO, false>, grid, dim3(256), 0, f.stream, x, y, r, out, f.w, f.b, f.mean,
               f.rstd, f.n, f.c, f.eps);
      }
      return;
    }
    const RowLayout l = row_layout(f.c / V);
    auto run = [&](auto kernel) {
      const int64_t blocks = one_wave(kernel, l.threads * l.rows, smem, ceil_div(f.n, l.rows));
      launch(kernel, dim3((unsigned)blocks), dim3(l.threads, l.rows), smem, f.stream, x, y, r, out, f.w, f.b, f.mean,
             f.rstd, f.n, f.c, f.eps);
    };
    if (add) {
      run(ln_fwd_kernel<TX, TY, TO, true>);
    } else if constexpr (std::is_same_v<TX, TY>) {
      run(ln_fwd_kernel<TX, TX, TO, false>);
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
  void* dy;  // nullable: dx once more, in another dtype
  float* dw;
  float* db;
  int64_t n;  // rows, at least 1
  int c;
  int variant;
  cudaStream_t stream;
};

// dout, x, dy of dtypes TD, TX, TY (TY = TX without dy); dr and dx are TX. scratch(count) returns room for count
// floats (the per-block partials), alive until the kernels have run.
template <typename TX, typename TD, typename TY, typename Scratch>
void ln_backward_launch(const LnBwd& a, Scratch&& scratch) {
  if constexpr (pairs_with_x<TX, TD> && pairs_with_x<TX, TY>) {
    constexpr int V = vec_width<TX>();
    const TD* dout = static_cast<const TD*>(a.dout);
    const TX* x = static_cast<const TX*>(a.x);
    const TX* dr = static_cast<const TX*>(a.dr);
    TX* dx = static_cast<TX*>(a.dx);
    TY* dy = static_cast<TY*>(a.dy);
    const bool fast = a.variant == 1 && a.c % V == 0 && a.c / V <= kMaxRowVectors && aligned16(a.x) &&
                      aligned16(a.dout) && aligned16(a.dx) && (a.dr == nullptr || aligned16(a.dr)) &&
                      (a.dy == nullptr || aligned16(a.dy)) && aligned16(a.w);
    if (!fast) {
      launch(ln_bwd_dx_plain_kernel<TX, TD, TY>, dim3((unsigned)ceil_div(a.n, 8)), dim3(256), 0, a.stream, dout, x,
             a.w, a.mean, a.rstd, dr, dx, dy, a.n, a.c);
      launch(ln_bwd_params_plain_kernel<TX, TD>, dim3((unsigned)ceil_div(a.c, 256)), dim3(256), 0, a.stream, dout,
             x, a.mean, a.rstd, a.dw, a.db, a.n, a.c);
      return;
    }
    const RowLayout l = row_layout(a.c / V);
    const size_t smem = (l.rows > 1 ? 3 : 1) * (size_t)a.c * sizeof(float);
    // One wave: every block then visits about the same number of rows, and the partials stay few.
    const int64_t blocks = one_wave(ln_bwd_kernel<TX, TD, TY>, l.threads * l.rows, smem, ceil_div(a.n, l.rows));
    float* part = scratch(blocks * 2 * a.c);
    launch(ln_bwd_kernel<TX, TD, TY>, dim3((unsigned)blocks), dim3(l.threads, l.rows), smem, a.stream, dout, x, a.w,
           a.mean, a.rstd, dr, dx, dy, part, a.n, a.c);
    launch_sum_partials(part, 2 * (int64_t)a.c, (int)blocks, a.c, a.dw, a.db, a.stream);
  }
}

#ifdef ARCANA_BINDINGS
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

// Same shape and device as ref, contiguous (dout, dr against x; y against x); dtypes are checked apart.
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes(), "; they must match");
  check_contiguous(t, op, name);
}

// The dtype rule of this file for a row tensor or an output dtype (`what`: "y of dtype", "out_dtype", ...).
void check_pairs_with_x(at::ScalarType t, const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(is_kernel_dtype(t), op, ": ", what, " ", t, " is not float32, bfloat16 or float16");
  TORCH_CHECK(t == x.scalar_type() || x.scalar_type() == at::kFloat, op, ": ", what, " ", t,
              " does not go with x of dtype ", x.scalar_type(), "; it must be x's dtype, or x must be float32 "
              "(cast them first)");
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
                                   const at::Tensor& weight, const at::Tensor& bias, double eps,
                                   std::optional<at::ScalarType> out_dtype) {
  const Rows rows = check_rows(x, op, "x");
  if (y != nullptr) {
    check_like(*y, x, op, "y", "x");
    check_pairs_with_x(y->scalar_type(), x, op, "y of dtype");
  }
  const at::ScalarType otype = out_dtype.value_or(x.scalar_type());
  check_pairs_with_x(otype, x, op, "out_dtype");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  const at::Tensor w = column_param_f32(weight, rows.c, x, op, "weight");
  const at::Tensor b = column_param_f32(bias, rows.c, x, op, "bias");

  at::Tensor out = new_buffer(x.sizes(), x.options().dtype(otype), stream);
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
    ARCANA_DISPATCH(ytype, op, TY, [&] {
      ARCANA_DISPATCH(otype, op, TO, [&] { ln_forward_launch<TX, TY, TO>(f); });
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps,
                                                              std::optional<at::ScalarType> out_dtype) {
  auto res = ln_forward("arcana::layer_norm_fwd", x, nullptr, weight, bias, eps, out_dtype);
  return {res[0], res[1], res[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias, double eps,
    std::optional<at::ScalarType> out_dtype) {
  auto res = ln_forward("arcana::add_layer_norm_fwd", x, &y, weight, bias, eps, out_dtype);
  return {res[0], res[1], res[2], res[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& dr, std::optional<at::ScalarType> dy_dtype) {
  const char* op = "arcana::layer_norm_bwd";
  const Rows rows = check_rows(x, op, "x");
  check_like(dout, x, op, "dout", "x");
  check_pairs_with_x(dout.scalar_type(), x, op, "dout of dtype");
  if (dr.has_value()) {
    check_like(*dr, x, op, "dr", "x");
    check_dtype(*dr, x.scalar_type(), op, "dr", "the gradient of r has r's dtype, which is x's");
  }
  if (dy_dtype.has_value()) check_pairs_with_x(*dy_dtype, x, op, "dy_dtype");
  check_row_stat(mean, x, rows.n, op, "mean");
  check_row_stat(rstd, x, rows.n, op, "rstd");
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  const at::Tensor w = column_param_f32(weight, rows.c, x, op, "weight");

  at::Tensor dx = new_buffer(x.sizes(), x.options(), stream);
  at::Tensor dy = dy_dtype.has_value() ? new_buffer(x.sizes(), x.options().dtype(*dy_dtype), stream)
                                       : at::empty({0}, x.options());
  at::Tensor dw = new_buffer({rows.c}, x.options().dtype(at::kFloat), stream);
  at::Tensor db = new_buffer({rows.c}, x.options().dtype(at::kFloat), stream);
  if (rows.n == 0) {
    dw.zero_();
    db.zero_();
  } else {
    const LnBwd a{dout.data_ptr(), x.data_ptr(), w.data_ptr<float>(), mean.data_ptr<float>(),
                  rstd.data_ptr<float>(), dr.has_value() ? dr->data_ptr() : nullptr, dx.data_ptr(),
                  dy_dtype.has_value() ? dy.data_ptr() : nullptr, dw.data_ptr<float>(), db.data_ptr<float>(),
                  rows.n, rows.c, std::min(kernel_variant(), 1), stream};
    at::Tensor part;  // the partials, alive until this function returns (the caching allocator orders reuse)
    auto scratch = [&](int64_t count) {
      part = new_buffer({count}, x.options().dtype(at::kFloat), stream);
      return part.data_ptr<float>();
    };
    ARCANA_DISPATCH(x.scalar_type(), op, TX, [&] {
      ARCANA_DISPATCH(dout.scalar_type(), op, TD, [&] {
        ARCANA_DISPATCH(dy_dtype.value_or(x.scalar_type()), op, TY, [&] {
          ln_backward_launch<TX, TD, TY>(a, scratch);
        });
      });
    });
  }
  const at::ScalarType wtype = weight.scalar_type();
  return {dx, dw.to(wtype), db.to(wtype), dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(arcana, ARCANA_KERNEL_KEY, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

#else
}  // namespace
#endif  // ARCANA_BINDINGS

}  // namespace arcana
