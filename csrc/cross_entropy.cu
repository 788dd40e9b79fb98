// Cross-entropy of rows of logits and its gradient in one kernel (the softmax/loss/dlogits part of the chunked
// lm_head loss, train_gpt.py lm_head_loss_op):
//   losses[r]    = logsumexp(logits[r]) - logits[r, t]                 (t = targets[r]; 0 where t == -1)
//   dlogits[r]   = (softmax(logits[r]) - onehot(t)) * grad_scale       (0 where t == -1)
// with every sum, exp and log in fp32 and dlogits rounded once to the logits' dtype. grad_scale is a
// one-element fp32 tensor on the GPU, read by the kernel: the chunked loss computes it from the targets there
// (1 / rows with a target), so it never makes the host wait for the GPU. A target outside
// [-1, V) is never used as an index: its row gets a NaN loss (and NaN dlogits), so a run with bad token ids
// stops at train_gpt.py's non-finite-loss check instead of reading or writing out of bounds.
//
// Plain kernel (variant 0): one warp per row, scalar loads, three sweeps over the row in global memory (max,
// sum of exp, dlogits) with expf/logf. Obviously correct and slow; the reference for the fast kernel.
//
// Fast kernel (variants 1 and 2): one block of up to 1024 threads per row. Sweep 1 reads the row once with
// 128-bit loads (8 bf16/fp16 or 4 fp32 values per load, two loads in flight per thread) and keeps a running
// (max m, sum s of exp(x - m)) per thread, in base 2: per vector, at most one rescale of s when its max exceeds
// m, then one FMA and one MUFU.EX2 per element. The per-thread pairs are combined over the warp with shuffles
// and over the warps in shared memory, in a fixed order (bitwise reproducible). Sweep 2 needs the row again to
// write dlogits = exp(x - m) / s * grad_scale, minus grad_scale at the target, with 128-bit streaming stores.
// The target's logit is one scalar load issued before sweep 1.
//
// Where sweep 2 reads the row from is the design decision. At GPT-2 sizes a bf16 row is 50304 * 2 = 100.6 KB.
//   - Registers cannot hold it: the whole 256 KB register file of an SM holds two such rows at most, leaving no
//     room for a second block to hide the block-wide reduction between the sweeps.
//   - Shared memory can (variant 1 where two rows fit an SM): sweep 1 also stores each raw 16-byte vector into
//     dynamic shared memory and sweep 2 reads it back (each thread only its own vectors, so no barrier), so every
//     byte of the row comes from device memory exactly once. On an H100 (228 KB of shared memory per SM) two
//     1024-thread blocks fit per SM, which is also the thread limit (2048 per SM): full occupancy, and one block
//     computes its reduction while the other streams. Cost: 2 x 100.6 KB of shared-memory traffic per row, at
//     128 B/clock about 1.6K clocks against the ~14K clocks the row's 200 KB of device-memory traffic takes at
//     an SM's share of 3.35 TB/s.
//   - Otherwise sweep 2 re-reads the row from global memory, expecting L2 hits (variant 2, and variant 1 where
//     two rows do not fit an SM's shared memory: A100, RTX 30/40, fp32 rows). The rows being worked on occupy
//     (SMs x 2 blocks x row bytes) of L2: 26 MB of the H100's 50 MB, 22 MB of the A100's 40 MB for bf16.
//     Sweep 2 loads with ld.global.cs (evict first: last use) and dlogits goes out with st.global.cs, since a
//     chunk's dlogits (824 MB at 8192 rows) never fits L2 anyway and must not evict rows still waiting for
//     their second sweep. The hit rate is the thing to check with a profiler on a new GPU: `python bench.py
//     cross_entropy` times both variants against the device's copy bandwidth (the ideal is one read and one
//     write of the row: the copy's own traffic).
//
// Arithmetic per element, from the sm_90 SASS of the bf16 kernel: about 6.5 instructions in sweep 1 and 7.5 in
// sweep 2 (one MUFU.EX2 each), about 5.5K issue clocks per row per SM against the ~14K clocks of its memory
// traffic: the kernel stays memory-bound with room to spare for the block that is not streaming.
//
// Threads per block: min(1024, vectors per row rounded up to a warp). On sm_80 and sm_90, whose SMs hold 2048
// threads, __launch_bounds__(1024, 2) limits the fast kernel to 32 registers per thread so that two 1024-thread
// blocks fit an SM; ptxas reports 30-32, no spills. (sm_86 and sm_89 SMs hold 1536 threads: see kFastMinBlocks.)

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "common.cuh"

namespace arcana {
namespace {

#ifndef ARCANA_EMULATE
// The dynamic shared memory, declared 16-byte aligned (128-bit accesses; an extern float array would promise 4).
#define ARCANA_CE_SHARED_BYTES(name) extern __shared__ __align__(16) unsigned char name[]
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxThreads = 1024;  // fast kernel: threads per block (one row per block)
constexpr int kBlocksPerSm = 2;    // fast kernel: blocks per SM where they fit (one reduces while one streams)
constexpr int kPlainRowsPerBlock = 8;  // plain kernel: one warp per row, 256 threads per block

// __launch_bounds__'s minimum of resident fast-kernel blocks per SM, by the architecture being compiled:
// kBlocksPerSm where an SM holds kBlocksPerSm x kMaxThreads threads (sm_80, sm_90: 2048), which caps the kernel
// at 32 registers per thread; 1 elsewhere (sm_86, sm_89: 1536 threads per SM, where two 1024-thread blocks never
// fit and ptxas would ignore the request with a warning). The launcher keeps rows in shared memory only where
// kBlocksPerSm blocks fit an SM (ce_row_fits_shared_memory), so on those GPUs variant 1 re-reads them from L2.
#if ARCANA_ARCH != 0 && ARCANA_ARCH != 800 && ARCANA_ARCH != 900
constexpr int kFastMinBlocks = 1;
#else
constexpr int kFastMinBlocks = kBlocksPerSm;
#endif

// -----------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// 2^x in one MUFU.EX2 (relative error about 2^-22), results below 2^-126 flushed to 0: a term that small does
// not change a sum that is at least 1, nor a gradient stored in 16 bits; exp2f would add a denormal
// range check and two multiplies per element.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef ARCANA_EMULATE
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// A row's running (m, s) in base 2: m = max(x) * log2(e) rounded once, s = sum of 2^(x log2(e) - m) over the
// elements seen so far, each exponent one FMA; logsumexp(x) = (m + log2(s)) ln(2) exactly for that m,
// whatever its rounding, as long as every term used the same m. m starts at -FLT_MAX rather than -inf, so
// that no exponent computes -inf - (-inf) = NaN (an all -inf share of a row keeps s = 0); m is never NaN
// (fmaxf skips NaN, the update compares with >), so a NaN logit reaches the loss through s.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * fast_exp2(a.m - m) + b.s * fast_exp2(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other);
  }
  return v;
}

// Adds N values to the running pair: at most one rescale of s per vector, then one FMA and one exp2 per element.
template <int N>
__device__ __forceinline__ void accumulate(MaxSum& acc, const float (&x)[N]) {
  float vmax = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, x[i]);
  const float vm = vmax * kLog2e;
  if (vm > acc.m) {
    acc.s *= fast_exp2(acc.m - vm);
    acc.m = vm;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) acc.s += fast_exp2(fmaf(x[i], kLog2e, -acc.m));
}

__device__ __forceinline__ float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// The N values of T in one raw vector as fp32. bf16 pairs are unpacked with one shift or mask each (the
// compiler's generic conversion takes two instructions for the high half).
template <int N, typename T>
__device__ __forceinline__ void unpack(const typename RawBits<sizeof(T) * N>::type& raw, float (&out)[N]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
    uint32_t w[N / 2];
    memcpy(w, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      out[2 * i] = bits_to_float(w[i] << 16);
      out[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  } else {
    Pack<T, N> pack;
    memcpy(&pack, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ typename RawBits<sizeof(T) * N>::type repack(const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  typename RawBits<sizeof(T) * N>::type raw;
  memcpy(&raw, &pack, sizeof(raw));
  return raw;
}

// Streaming (evict-first) loads and stores of one raw vector; the 2-byte case is the scalar bf16/fp16 path.
__device__ __forceinline__ uint4 load_last_use(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ unsigned int load_last_use(const unsigned int* p) { return __ldcs(p); }
__device__ __forceinline__ unsigned short load_last_use(const unsigned short* p) { return __ldcs(p); }
__device__ __forceinline__ void store_streaming(uint4* p, uint4 v) { __stcs(p, v); }
__device__ __forceinline__ void store_streaming(unsigned int* p, unsigned int v) { __stcs(p, v); }
__device__ __forceinline__ void store_streaming(unsigned short* p, unsigned short v) { __stcs(p, v); }

// -----------------------------------------------------------------------------
// plain kernel (variant 0)

// One warp per row; dlogits is null when no gradient is wanted.
template <typename T>
__global__ void __launch_bounds__(32 * kPlainRowsPerBlock)
    ce_plain_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ losses,
                    T* __restrict__ dlogits, int64_t n, int V, const float* __restrict__ grad_scale_ptr) {
  const int64_t row = (int64_t)blockIdx.x * kPlainRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const T* x = logits + row * V;
  T* dx = dlogits != nullptr ? dlogits + row * V : nullptr;
  const int64_t t = targets[row];
  if (t < 0 || t >= V) {  // -1: ignored row; anything else out of range: NaN, never an index
    const float fill = t == -1 ? 0.f : NAN;
    if (lane == 0) losses[row] = fill;
    if (dx != nullptr) {
      for (int c = lane; c < V; c += 32) dx[c] = from_float<T>(fill);
    }
    return;
  }
  float m = -INFINITY;
  for (int c = lane; c < V; c += 32) m = fmaxf(m, to_float(x[c]));
  m = warp_max(m);
  float s = 0.f;
  for (int c = lane; c < V; c += 32) s += expf(to_float(x[c]) - m);
  s = warp_sum(s);
  if (lane == 0) losses[row] = m + logf(s) - to_float(x[t]);
  if (dx == nullptr) return;
  const float grad_scale = *grad_scale_ptr;
  for (int c = lane; c < V; c += 32) {
    const float p = expf(to_float(x[c]) - m) / s;
    dx[c] = from_float<T>((p - (c == t ? 1.f : 0.f)) * grad_scale);
  }
}

// -----------------------------------------------------------------------------
// fast kernel (variants 1 and 2)

// One row per block, N values of T per vector (a 128-bit vector, or N = 1 when the rows are not 16-byte
// aligned). SMEM: keep the row's raw vectors in dynamic shared memory between the sweeps (V * sizeof(T)
// bytes), else re-read it from global memory (L2). dlogits is null when no gradient is wanted.
template <typename T, int N, bool SMEM>
__global__ void __launch_bounds__(kMaxThreads, kFastMinBlocks)
    ce_fast_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ losses,
                   T* __restrict__ dlogits, int V, const float* __restrict__ grad_scale_ptr) {
  using Raw = typename RawBits<sizeof(T) * N>::type;
  ARCANA_CE_SHARED_BYTES(ce_row_cache);  // with SMEM: the row, V * sizeof(T) bytes; else none
  __shared__ MaxSum warp_parts[kMaxThreads / 32];
  __shared__ MaxSum row_total;
  Raw* cache = reinterpret_cast<Raw*>(ce_row_cache);

  const int64_t row = blockIdx.x;
  const Raw* x = reinterpret_cast<const Raw*>(logits + row * V);
  Raw* dx = dlogits != nullptr ? reinterpret_cast<Raw*>(dlogits + row * V) : nullptr;
  const int nvec = V / N;
  const int stride = blockDim.x;
  const int64_t t = targets[row];  // the same for the whole block: the early return below is uniform

  if (t < 0 || t >= V) {  // -1: ignored row; anything else out of range: NaN, never an index
    const float fill = t == -1 ? 0.f : NAN;
    if (threadIdx.x == 0) losses[row] = fill;
    if (dx != nullptr) {
      float f[N];
#pragma unroll
      for (int i = 0; i < N; ++i) f[i] = fill;
      const Raw raw = repack<N, T>(f);
      for (int j = threadIdx.x; j < nvec; j += stride) store_streaming(dx + j, raw);
    }
    return;
  }
  // The target's logit and the gradient's scale, issued first so that their latency hides behind sweep 1.
  const float xt = threadIdx.x == 0 ? to_float(logits[row * V + t]) : 0.f;
  const float grad_scale = dx != nullptr ? *grad_scale_ptr : 0.f;

  // sweep 1: two vectors in flight per thread (with 2048 threads per SM, 64 KB: more than the ~20 KB per SM
  // that 3.35 TB/s times the memory latency needs), then the tail
  MaxSum acc{-FLT_MAX, 0.f};
  int j = threadIdx.x;
  for (; j + stride < nvec; j += 2 * stride) {
    const Raw r0 = x[j];
    const Raw r1 = x[j + stride];
    if constexpr (SMEM) {
      cache[j] = r0;
      cache[j + stride] = r1;
    }
    float v[N];
    unpack<N, T>(r0, v);
    accumulate<N>(acc, v);
    unpack<N, T>(r1, v);
    accumulate<N>(acc, v);
  }
  if (j < nvec) {
    const Raw r0 = x[j];
    if constexpr (SMEM) cache[j] = r0;
    float v[N];
    unpack<N, T>(r0, v);
    accumulate<N>(acc, v);
  }

  // the row's (m, s): warps, then the warp results in order
  acc = warp_combine(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_parts[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    MaxSum part = lane < (int)(blockDim.x / 32) ? warp_parts[lane] : MaxSum{-FLT_MAX, 0.f};
    part = warp_combine(part);
    if (lane == 0) row_total = part;
  }
  __syncthreads();
  const MaxSum total = row_total;
  if (threadIdx.x == 0) losses[row] = (total.m + log2f(total.s)) * kLn2 - xt;
  if (dx == nullptr) return;

  // sweep 2: dlogits = 2^(x log2(e) - m) * (grad_scale / s), minus grad_scale at the target
  const float scale = grad_scale / total.s;
  const int target = (int)t;
  auto write = [&](int jj, const Raw& raw) {
    float v[N];
    unpack<N, T>(raw, v);
    const int k = target - jj * N;  // the target's place in this vector, if in [0, N)
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float p = fast_exp2(fmaf(v[i], kLog2e, -total.m)) * scale;
      v[i] = i == k ? p - grad_scale : p;
    }
    store_streaming(dx + jj, repack<N, T>(v));
  };
  j = threadIdx.x;
  for (; j + stride < nvec; j += 2 * stride) {
    const Raw r0 = SMEM ? cache[j] : load_last_use(x + j);
    const Raw r1 = SMEM ? cache[j + stride] : load_last_use(x + j + stride);
    write(j, r0);
    write(j + stride, r1);
  }
  if (j < nvec) write(j, SMEM ? cache[j] : load_last_use(x + j));
}

// -----------------------------------------------------------------------------
// host launcher (torch-free: with ARCANA_EMULATE, tests/cross_entropy_emu.cpp runs it on the CPU, telling it
// what ce_row_fits_shared_memory would)

struct CeRun {
  const void* logits;
  const int64_t* targets;
  float* losses;
  void* dlogits;  // null without gradient
  int64_t n;
  int V;
  const float* grad_scale;  // one fp32 value in device memory: callers never wait for it on the host
  int64_t variant;
  bool vec;  // 128-bit vectors: V a multiple of 16 / sizeof(T), the data 16-byte aligned
  cudaStream_t stream;
};

#ifdef ARCANA_BINDINGS
// Whether variant 1 keeps the row in shared memory: only where kBlocksPerSm blocks with a row each fit an SM,
// by threads (the GPUs whose kernels are built for them, kFastMinBlocks) and by shared memory. With one block
// per SM the reduction between the sweeps would go unhidden; the L2 re-read keeps two blocks per SM.
bool ce_row_fits_shared_memory(size_t row_bytes) {
  int dev = 0, per_block = 0, per_sm = 0, threads_per_sm = 0;
  ARCANA_CUDA_CHECK(cudaGetDevice(&dev));
  ARCANA_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  ARCANA_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  ARCANA_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  const size_t overhead = 2048;  // the reduction's static shared memory and the per-block reservation
  return kBlocksPerSm * kMaxThreads <= threads_per_sm && row_bytes + overhead <= (size_t)per_block &&
         kBlocksPerSm * (row_bytes + overhead) <= (size_t)per_sm;
}

// Above 48 KB of dynamic shared memory a kernel must opt in.
template <typename... Params>
void ce_allow_shared_memory(void (*kernel)(Params...), size_t bytes) {
  if (bytes > 48 * 1024) {
    ARCANA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
}
#endif  // ARCANA_BINDINGS

template <typename T, int N, bool SMEM>
void ce_launch_fast(const CeRun& r) {
  const int nvec = r.V / N;
  const int threads = (int)std::min<int64_t>(kMaxThreads, ceil_div(nvec, 32) * 32);
  const size_t smem = SMEM ? (size_t)r.V * sizeof(T) : 0;
  ce_allow_shared_memory(ce_fast_kernel<T, N, SMEM>, smem);
  launch(ce_fast_kernel<T, N, SMEM>, dim3((unsigned)r.n), dim3(threads), smem, r.stream,
         static_cast<const T*>(r.logits), r.targets, r.losses, static_cast<T*>(r.dlogits), r.V, r.grad_scale);
}

template <typename T>
void ce_launch(const CeRun& r) {
  if (r.variant == 0) {
    launch(ce_plain_kernel<T>, dim3((unsigned)ceil_div(r.n, kPlainRowsPerBlock)), dim3(32 * kPlainRowsPerBlock), 0,
           r.stream, static_cast<const T*>(r.logits), r.targets, r.losses, static_cast<T*>(r.dlogits), r.n, r.V,
           r.grad_scale);
    return;
  }
  constexpr int kVec = vec_width<T>();
  // the shared-memory copy of the row only serves sweep 2, which runs only with a gradient
  const bool smem = r.variant == 1 && r.dlogits != nullptr && ce_row_fits_shared_memory((size_t)r.V * sizeof(T));
  if (r.vec) {
    smem ? ce_launch_fast<T, kVec, true>(r) : ce_launch_fast<T, kVec, false>(r);
  } else {
    smem ? ce_launch_fast<T, 1, true>(r) : ce_launch_fast<T, 1, false>(r);
  }
}

#ifdef ARCANA_BINDINGS
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd(const at::Tensor& logits, const at::Tensor& targets,
                                                         const at::Tensor& grad_scale, bool compute_grad) {
  const char* op = "arcana::cross_entropy_fwd_bwd";
  check_cuda(logits, op, "logits");
  check_kernel_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, vocab), got shape ", logits.sizes(),
              "; reshape it to (-1, vocab) first");
  check_contiguous(logits, op, "logits");
  check_cuda(targets, op, "targets");
  check_same_device(targets, logits, op, "targets", "logits");
  check_dtype(targets, at::kLong, op, "targets", "token ids, -1 for rows without a target");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
              logits.size(0), ",), one per row of logits, got ", targets.sizes());
  check_contiguous(targets, op, "targets");
  const int64_t n = logits.size(0);
  const int64_t V = logits.size(1);
  TORCH_CHECK(V >= 1 && V <= INT32_MAX, op, ": logits must have between 1 and ", INT32_MAX,
              " columns (the vocabulary), got ", V);
  TORCH_CHECK(n <= INT32_MAX, op, ": at most ", INT32_MAX, " rows per call, got ", n, "; call it on chunks of rows");
  check_cuda(grad_scale, op, "grad_scale");
  check_same_device(grad_scale, logits, op, "grad_scale", "logits");
  check_dtype(grad_scale, at::kFloat, op, "grad_scale", "the gradient's scale, e.g. 1 / rows with a target");
  TORCH_CHECK(grad_scale.numel() == 1, op, ": grad_scale must hold one value, got shape ", grad_scale.sizes());

  const DeviceGuard guard(logits.device());
  const cudaStream_t stream = current_stream();
  at::Tensor losses = new_buffer({n}, logits.options().dtype(at::kFloat), stream);
  const std::vector<int64_t> dlogits_shape = compute_grad ? std::vector<int64_t>{n, V} : std::vector<int64_t>{0};
  at::Tensor dlogits = new_buffer(dlogits_shape, logits.options(), stream);
  if (n == 0) return {losses, dlogits};

  const int vec = 16 / (int)logits.element_size();
  const CeRun r{logits.data_ptr(),
                targets.data_ptr<int64_t>(),
                losses.data_ptr<float>(),
                compute_grad ? dlogits.data_ptr() : nullptr,
                n,
                (int)V,
                grad_scale.data_ptr<float>(),
                kernel_variant(),
                V % vec == 0 && aligned16(logits.data_ptr()) && (!compute_grad || aligned16(dlogits.data_ptr())),
                stream};
  ARCANA_DISPATCH(logits.scalar_type(), op, T, [&] { ce_launch<T>(r); });
  return {losses, dlogits};
}
#endif  // ARCANA_BINDINGS

}  // namespace

#ifdef ARCANA_BINDINGS
TORCH_LIBRARY_IMPL(arcana, ARCANA_KERNEL_KEY, m) { m.impl("cross_entropy_fwd_bwd", &cross_entropy_fwd_bwd); }
#endif

}  // namespace arcana
