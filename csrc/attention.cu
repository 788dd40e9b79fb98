// Causal self-attention, FlashAttention-2 style: forward and backward (torch.ops.arcana.attention_*).
//
// Layout. qkv is c_attn's output viewed as (B, T, 3, H, D): any strides whose last one is 1 and the others
// multiples of 8 elements (16 bytes), so Q, K and V are read in place with no transpose copies. out is
// (B, T, H, D) contiguous (c_proj reads it as (B, T, C)); lse is (B, H, T) fp32, the natural-log log-sum-exp
// of each row's scaled scores. The backward takes dout (B, T, H, D) and returns dqkv (B, T, 3, H, D)
// contiguous with dQ, dK and dV in their slots, the gradient of c_attn's output as one tensor.
//
// Two variants of each direction, chosen by the `variant` argument:
//   0  plain: one warp per query row (forward, dQ) or key row (dK, dV), fp32 math, no tensor cores, no
//      shared memory. Slow and obviously right; it tells a failure of the fast path from one of the bindings.
//   1  fast: tiles in shared memory, mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) fed by ldmatrix,
//      cp.async double buffering, online softmax in fp32; the T x T scores never leave registers.
// Both compute softmax(Q K^T / sqrt(D) + causal mask) V and the same lse, in the same layouts.
//
// Backward of variant 1: D_i = rowsum(dO_i * O_i) first; then one block per (b, h, key tile) loops over the
// query tiles at or below the diagonal, recomputes P = exp(S - lse), accumulates dK and dV in registers and
// adds its share of dQ = dS K into an fp32 buffer with atomics; a last kernel scales and converts it.
// The order of those fp32 additions varies from run to run, so dQ (only dQ) is not bitwise deterministic.
// Its tiles depend on the GPU's shared memory per block (BwdCfg): the launcher is told how much there is.
//
// The device code needs no torch headers: with ARCANA_EMULATE defined, tests/attention_emu.cpp compiles this
// file for the CPU, with warp-level emulations of ldmatrix, mma, cp.async and shuffles, and runs the same
// kernels and launchers on awkward shapes and both tile sets (tests/test_attention.py), so the index arithmetic
// and the barriers are checked without a GPU; tests/emu_ops.cpp compiles it with its torch bindings, for the
// CPU. The PTX semantics themselves are checked on a GPU by attention_selftest.

#ifndef ARCANA_EMULATE
#include "common.cuh"
#define ARCANA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define ARCANA_LAUNCH(kernel, grid, block, smem, stream, ...)            \
  do {                                                                   \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);                  \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                      \
  } while (0)
#endif

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>

// mma.sync with bf16 operands, ldmatrix and cp.async need sm_80; older targets get kernels that trap (the
// host refuses them first, see check_arch). ARCANA_ARCH is __CUDA_ARCH__, or 0 in the host pass (common.cuh).
#if ARCANA_ARCH == 0 || ARCANA_ARCH >= 800
#define ARCANA_ATTN_SM80 1
#else
#define ARCANA_ATTN_SM80 0
#endif

namespace arcana_attention {

constexpr float kLog2e = 1.4426950408889634f;

// -----------------------------------------------------------------------------
// 16-bit element types: conversion and packing of two values into one 32-bit register (the lower column in
// the lower half, as ldmatrix and mma lay them out)

template <typename T> struct Elem;

template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
};

// -----------------------------------------------------------------------------
// Tensor-core fragments of mma.sync.aligned.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16 with
// floating point type"). A warp holds each operand spread over its lanes; lane = 4 * g + t (g = lane / 4,
// t = lane % 4), and each 32-bit register holds two 16-bit elements, the lower column in the lower half:
//
//   A, 16 x 16 (rows m, columns k):  register r, half e  ->  m = g + 8 * (r & 1),  k = 2t + e + 8 * (r >> 1)
//   B, 16 x 8  (rows k, columns n):  register r, half e  ->  k = 2t + e + 8 * r,    n = g
//   C, 16 x 8  fp32 accumulators:    float i             ->  m = g + 8 * (i >> 1),  n = 2t + (i & 1)
//
// Every index below derives from these three lines: frag_row/frag_col for the accumulators, the ldmatrix
// helpers for A and B (each 8 x 8 matrix that ldmatrix returns gives lane (g, t) the elements (g, 2t..2t+1)
// of that matrix, or (2t..2t+1, g) with .trans), and c_to_a, which re-reads two accumulator tiles as an A
// operand: C's (m, n) of tiles n0 and n0 + 8 are exactly A's (m, k) registers 0-1 and 2-3.
// attention_selftest runs these helpers on known matrices, so a wrong line here fails that test first.

__device__ __forceinline__ int frag_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__device__ __forceinline__ int frag_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// D += A B on tensor cores, T (bf16 or fp16) operands and fp32 accumulators, in the fragments above.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma operands are bf16 or fp16");
#ifdef ARCANA_EMULATE
  emu::mma_16816<T>(d, a, b);
#elif ARCANA_ATTN_SM80
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lanes 8i..8i+7 give the row addresses of
// matrix i (16-byte aligned), and r[i] receives lane (g, t)'s two elements of it, (g, 2t..2t+1); with TRANS
// (ldmatrix .trans), (2t..2t+1, g).
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef ARCANA_EMULATE
  emu::ldmatrix_x4(r, smem_row, TRANS);
#elif ARCANA_ATTN_SM80
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  }
#endif
}

// A operand: the 16 x 16 block at (m0, k0) of a row-major [m][k] tile with row stride ld (elements).
// Matrix i covers rows m0 + 8 * (i & 1), columns k0 + 8 * (i >> 1): registers 0..3 in A's order.
template <typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int ld, int m0, int k0, int lane) {
  ldsm_x4<false>(a, tile + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8);
}

// A operand from a tile that stores A transposed, [k][m]: A's block (m0, k0) is tile rows k0.., columns m0..;
// .trans hands lane (g, t) the elements (k = 2t..2t+1, m = g) of each stored 8 x 8 matrix, i.e. A's (g, 2t..).
template <typename T>
__device__ __forceinline__ void ldsm_a_trans(uint32_t (&a)[4], const T* tile, int ld, int m0, int k0, int lane) {
  ldsm_x4<true>(a, tile + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}

// B operands of two adjacent n-tiles (columns n0..n0+7 -> b[0], n0+8..n0+15 -> b[1]) at rows k0..k0+15, from a
// tile that stores B transposed, [n][k] (K for S = Q K^T): matrix i covers n0 + 8 * (i >> 1), k0 + 8 * (i & 1).
template <typename T>
__device__ __forceinline__ void ldsm_b_nk(uint32_t (&b)[2][2], const T* tile, int ld, int k0, int n0, int lane) {
  uint32_t r[4];
  ldsm_x4<false>(r, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// The same two n-tiles from a row-major [k][n] tile (V for O = P V): matrix i covers rows k0 + 8 * (i & 1),
// columns n0 + 8 * (i >> 1), loaded with .trans so that lane (g, t) gets B's (k = 2t..2t+1, n = g).
template <typename T>
__device__ __forceinline__ void ldsm_b_kn(uint32_t (&b)[2][2], const T* tile, int ld, int k0, int n0, int lane) {
  uint32_t r[4];
  ldsm_x4<true>(r, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
  b[0][0] = r[0]; b[0][1] = r[1]; b[1][0] = r[2]; b[1][1] = r[3];
}

// Two accumulator tiles (columns n0.. and n0+8..) of the same 16 rows, rounded to T, as one A operand whose k
// runs over those 16 columns (P for P V, dS for dS Q).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Elem<T>::pack(c0[0], c0[1]);
  a[1] = Elem<T>::pack(c0[2], c0[3]);
  a[2] = Elem<T>::pack(c1[0], c1[1]);
  a[3] = Elem<T>::pack(c1[2], c1[3]);
}

// 2^x in one MUFU.EX2 (ex2.approx.ftz.f32: relative error about 2^-22, results below 2^-126 flushed to 0, and
// 2^-inf = 0). The softmax terms are at most 1, and one under 2^-126 changes neither a row sum of at least 1 nor
// a 16-bit P or dS; exp2f would add a range check and two multiplies per element for the denormal results.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef ARCANA_EMULATE
  return emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// -----------------------------------------------------------------------------
// cp.async (sm_80): 16 bytes global -> shared without passing through registers; src_size 0 writes zeros,
// which is how rows past T become zero rows. The source address stays inside the tensor even then.

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef ARCANA_EMULATE
  emu::cp_async(smem, gmem, 16, valid);
#elif ARCANA_ATTN_SM80
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
#ifdef ARCANA_EMULATE
  emu::cp_async(smem, gmem, 4, valid);
#elif ARCANA_ATTN_SM80
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef ARCANA_EMULATE
  emu::cp_async_commit();
#elif ARCANA_ATTN_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until every committed group of this thread has landed (a __syncthreads must follow before other
// threads read what it copied).
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef ARCANA_EMULATE
  emu::cp_async_wait_all();
#elif ARCANA_ATTN_SM80
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Rows [row0, row0 + ROWS) of one head's (T, D) slice (rows row_stride elements apart) into a shared tile
// with row stride LD; rows at or past T are zero-filled. Consecutive threads take consecutive 16-byte chunks.
template <typename T, int ROWS, int D, int LD, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, const T* g, int64_t row_stride, int row0, int seqlen, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % THREADS == 0, "tile chunks must divide evenly among the threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / THREADS; ++it) {
    const int idx = tid + it * THREADS;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < seqlen;
    cp_async_16(tile + r * LD + c * 8, g + (valid ? (row0 + r) * row_stride : 0) + c * 8, valid);
  }
}

// -----------------------------------------------------------------------------
// parameters

template <typename E>
struct FwdParams {
  const E* qkv;                    // (B, T, 3, H, D) with the strides below (elements); stride of D is 1
  int64_t sb, st, s3, sh;
  E* out;                          // (B, T, H, D) contiguous
  float* lse;                      // (B, H, T)
  int B, T, H;
  float scale;                     // 1 / sqrt(D)
};

template <typename E>
struct BwdParams {
  const E* qkv;                    // as FwdParams
  int64_t sb, st, s3, sh;
  const E* out;                    // (B, T, H, D) contiguous
  const E* dout;                   // (B, T, H, D) contiguous
  const float* lse;                // (B, H, T)
  float* delta;                    // (B, H, T) scratch: rowsum(dO * O)
  float* dq_accum;                 // (B, T, H, D) fp32 scratch (variant 1), zeroed by the launcher
  E* dqkv;                         // (B, T, 3, H, D) contiguous
  int B, T, H;
  float scale;
};

// -----------------------------------------------------------------------------
// variant 0: one warp per row, fp32, no shared memory

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Forward, warp per query row: the same online softmax as variant 1, one key at a time.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_fwd_plain_kernel(FwdParams<T> p) {
  constexpr int E = D / 32;  // elements per lane
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);  // over (b, h, t)
  if (row >= static_cast<int64_t>(p.B) * p.H * p.T) return;  // whole warps leave together
  const int64_t bh = row / p.T;  // rows run over (b, h, t)
  const int t = static_cast<int>(row - bh * p.T), h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const T* base = p.qkv + b * p.sb + h * p.sh + lane * E;
  float q[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    q[e] = Elem<T>::to_float(base[t * p.st + e]);
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j <= t; ++j) {
    const T* kr = base + j * p.st + p.s3;
    const T* vr = base + j * p.st + 2 * p.s3;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) s += q[e] * Elem<T>::to_float(kr[e]);
    s = warp_sum(s) * p.scale;
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);  // m = -inf on the first key: alpha = 0
    const float pj = expf(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + pj * Elem<T>::to_float(vr[e]);
    m = m_new;
  }
  T* o = p.out + ((static_cast<int64_t>(b) * p.T + t) * p.H + h) * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) o[e] = Elem<T>::from_float(acc[e] / l);
  if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * p.T + t] = m + logf(l);
}

// delta = rowsum(dO * O) in fp32, one row per D/8 lanes (16-byte loads); shared by both backward variants.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(BwdParams<T> p) {
  constexpr int G = D / 8;  // lanes per row
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gid / G;  // over (b, t, h), the memory order of out and dout
  const int part = static_cast<int>(gid % G);
  const int64_t rows = static_cast<int64_t>(p.B) * p.T * p.H;
  float v = 0.f;
  if (row < rows) {
    const uint4 o4 = *reinterpret_cast<const uint4*>(p.out + row * D + part * 8);
    const uint4 d4 = *reinterpret_cast<const uint4*>(p.dout + row * D + part * 8);
    const T* o = reinterpret_cast<const T*>(&o4);
    const T* d = reinterpret_cast<const T*>(&d4);
#pragma unroll
    for (int e = 0; e < 8; ++e) v += Elem<T>::to_float(o[e]) * Elem<T>::to_float(d[e]);
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (row < rows && part == 0) {
    const int h = static_cast<int>(row % p.H);
    const int64_t bt = row / p.H;
    const int t = static_cast<int>(bt % p.T), b = static_cast<int>(bt / p.T);
    p.delta[(static_cast<int64_t>(b) * p.H + h) * p.T + t] = v;
  }
}

// dQ, warp per query row i: dQ_i = scale * sum_{j <= i} P_ij (dO_i . V_j - delta_i) K_j.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_bwd_plain_dq_kernel(BwdParams<T> p) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= static_cast<int64_t>(p.B) * p.H * p.T) return;
  const int64_t bh = row / p.T;  // rows run over (b, h, i)
  const int i = static_cast<int>(row - bh * p.T), h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const T* base = p.qkv + b * p.sb + h * p.sh + lane * E;
  const int64_t orow = ((static_cast<int64_t>(b) * p.T + i) * p.H + h) * D + lane * E;
  const int64_t srow = (static_cast<int64_t>(b) * p.H + h) * p.T + i;
  float q[E], dout[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    q[e] = Elem<T>::to_float(base[i * p.st + e]);
    dout[e] = Elem<T>::to_float(p.dout[orow + e]);
    acc[e] = 0.f;
  }
  const float lse = p.lse[srow], delta = p.delta[srow];
  for (int j = 0; j <= i; ++j) {
    const T* kr = base + j * p.st + p.s3;
    const T* vr = base + j * p.st + 2 * p.s3;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      s += q[e] * Elem<T>::to_float(kr[e]);
      dp += dout[e] * Elem<T>::to_float(vr[e]);
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    const float ds = expf(s * p.scale - lse) * (dp - delta);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += ds * Elem<T>::to_float(kr[e]);
  }
  T* dq = p.dqkv + ((static_cast<int64_t>(b) * p.T + i) * 3 * p.H + h) * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) dq[e] = Elem<T>::from_float(acc[e] * p.scale);
}

// dK and dV, warp per key row j: dV_j = sum_{i >= j} P_ij dO_i, dK_j = scale * sum_{i >= j} dS_ij Q_i.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_bwd_plain_dkv_kernel(BwdParams<T> p) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= static_cast<int64_t>(p.B) * p.H * p.T) return;
  const int64_t bh = row / p.T;  // rows run over (b, h, j)
  const int j = static_cast<int>(row - bh * p.T), h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const T* base = p.qkv + b * p.sb + h * p.sh + lane * E;
  float k[E], v[E], dk[E], dv[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    k[e] = Elem<T>::to_float(base[j * p.st + p.s3 + e]);
    v[e] = Elem<T>::to_float(base[j * p.st + 2 * p.s3 + e]);
    dk[e] = 0.f;
    dv[e] = 0.f;
  }
  for (int i = j; i < p.T; ++i) {
    const T* qr = base + i * p.st;
    const T* dor = p.dout + ((static_cast<int64_t>(b) * p.T + i) * p.H + h) * D + lane * E;
    const int64_t srow = (static_cast<int64_t>(b) * p.H + h) * p.T + i;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      s += Elem<T>::to_float(qr[e]) * k[e];
      dp += Elem<T>::to_float(dor[e]) * v[e];
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    const float pij = expf(s * p.scale - p.lse[srow]);
    const float ds = pij * (dp - p.delta[srow]);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dv[e] += pij * Elem<T>::to_float(dor[e]);
      dk[e] += ds * Elem<T>::to_float(qr[e]);
    }
  }
  T* g = p.dqkv + ((static_cast<int64_t>(b) * p.T + j) * 3 * p.H + h) * D + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    g[p.H * D + e] = Elem<T>::from_float(dk[e] * p.scale);
    g[2 * p.H * D + e] = Elem<T>::from_float(dv[e]);
  }
}

// -----------------------------------------------------------------------------
// variant 1, forward
//
// A block of 4 warps owns BR = 128 query rows of one (b, h), 32 per warp (two 16-row m-tiles), as in
// FlashAttention-2: every K or V fragment a warp takes from shared memory with ldmatrix feeds 4 MMAs (its 2
// n-tiles times the 2 m-tiles); with 16 rows per warp it fed 2, and shared-memory bandwidth bounded the loop.
// Per key tile and warp: S (32 x BC) = Q K^T on tensor cores, the causal mask (only on a tile that reaches past
// the warp's first row), online softmax in fp32 with base-2 exponentials of scale * log2(e) * S (one FFMA and one
// MUFU.EX2 per element), then O += P V with P re-read from the S accumulators as A fragments. Warps skip the
// 16-key chunks of the diagonal tile that lie wholly in their future, and the tiles after it.
//
// Registers set the key tile: the output accumulators take D fp32 a thread (32 rows x D per warp), the scores
// BC. FlashAttention-2's 128-key tile at D = 64 (128 + 64) spills under ptxas, so BC = 64 at D = 64 and 32 at
// D = 128. K and V tiles stream through two shared-memory stages each (cp.async of tile j + 1 overlaps all the
// math on tile j; a stage is refilled only after the barrier that follows its last read), one barrier per tile:
// per 64 keys, as often as FlashAttention-2's two per 128. Q stays in shared memory, re-read every tile (32 rows
// of Q fragments would take D / 2 more registers). 55 KB at D = 64, 68 KB at D = 128. Rows are padded by 8
// elements (16 bytes), so the 8 rows of every ldmatrix 8 x 8 matrix fall in 8 different bank groups. Blocks are
// launched heaviest (last query tile) first.

template <int D>
struct FwdCfg {
  static constexpr int WARPS = 4, THREADS = WARPS * 32, MT = 2, WR = MT * 16, BR = WARPS * WR;
  static constexpr int BC = D == 64 ? 64 : 32, LD = D + 8;
  static constexpr int SMEM = (BR + 4 * BC) * LD * 2;  // Q, then K and V in two stages each (16-bit elements)
  static_assert(SMEM <= 99 * 1024, "must fit the dynamic shared memory of every sm_8x/sm_90 GPU");
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::THREADS) attention_fwd_kernel(FwdParams<T> p) {
#if ARCANA_ATTN_SM80
  using Cfg = FwdCfg<D>;
  constexpr int BR = Cfg::BR, BC = Cfg::BC, LD = Cfg::LD, THREADS = Cfg::THREADS, MT = Cfg::MT, WR = Cfg::WR;
  ARCANA_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BR][LD]
  T* sK = sQ + BR * LD;                    // [2][BC][LD]
  T* sV = sK + 2 * BC * LD;                // [2][BC][LD]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heaviest tiles first
  const int wq0 = q0 + warp * WR;                     // this warp's first query row; m-tile r starts at wq0 + 16 r
  const int seqlen = p.T;
  const T* gq = p.qkv + b * p.sb + h * p.sh;
  const T* gk = gq + p.s3;
  const T* gv = gq + 2 * p.s3;
  const int n_tiles = (min(seqlen, q0 + BR) + BC - 1) / BC;  // key tiles visible to some row of the block
  const float sl2 = p.scale * kLog2e;

  load_tile<T, BR, D, LD, THREADS>(sQ, gq, p.st, q0, seqlen, tid);
  load_tile<T, BC, D, LD, THREADS>(sK, gk, p.st, 0, seqlen, tid);
  load_tile<T, BC, D, LD, THREADS>(sV, gv, p.st, 0, seqlen, tid);
  cp_async_commit();

  float o[MT][D / 8][4] = {};  // output accumulators: 32 rows x D
  float m[MT][2], l[MT][2];    // per thread, rows g and g + 8 of each m-tile: raw-score max, partial sum
#pragma unroll
  for (int r = 0; r < MT; ++r) m[r][0] = m[r][1] = -INFINITY, l[r][0] = l[r][1] = 0.f;

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait_all();
    __syncthreads();  // tile j visible to all; every warp is done with tile j - 1, whose stage is refilled next
    if (j + 1 < n_tiles) {
      const int st = (j + 1) & 1;
      load_tile<T, BC, D, LD, THREADS>(sK + st * BC * LD, gk, p.st, (j + 1) * BC, seqlen, tid);
      load_tile<T, BC, D, LD, THREADS>(sV + st * BC * LD, gv, p.st, (j + 1) * BC, seqlen, tid);
      cp_async_commit();
    }
    const int k0 = j * BC;
    // keys of this tile that can be visible to this warp: [k0, k0 + kv_valid), a multiple of 16
    const int kv_valid = min(min(BC, wq0 + WR - k0), ((seqlen - k0 + 15) / 16) * 16);
    if (kv_valid <= 0 || wq0 >= seqlen) continue;  // warp-uniform: nothing visible, or rows past T only
    const T* tK = sK + (j & 1) * BC * LD;
    const T* tV = sV + (j & 1) * BC * LD;

    float s[MT][BC / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int r = 0; r < MT; ++r) ldsm_a(qa[r], sQ, LD, warp * WR + 16 * r, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        if (np * 16 < kv_valid) {
          uint32_t bf[2][2];
          ldsm_b_nk(bf, tK, LD, kk * 16, np * 16, lane);
#pragma unroll
          for (int r = 0; r < MT; ++r) {
            mma_16816<T>(s[r][2 * np], qa[r], bf[0]);
            mma_16816<T>(s[r][2 * np + 1], qa[r], bf[1]);
          }
        }
      }
    }

    // Causal mask, only on a tile that reaches past the warp's first row. Keys at or past T need no test of
    // their own: every row that is stored lies before T. Chunks skipped above stay 0 here and are masked too.
    if (k0 + BC - 1 > wq0) {
#pragma unroll
      for (int r = 0; r < MT; ++r) {
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (k0 + nt * 8 + frag_col(lane, i) > wq0 + 16 * r + frag_row(lane, i)) s[r][nt][i] = -INFINITY;
          }
        }
      }
    }
    // online softmax; the 4 lanes of a quad share rows g and g + 8
#pragma unroll
    for (int r = 0; r < MT; ++r) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = m[r][hr];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(s[r][nt][2 * hr], s[r][nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mref = mx == -INFINITY ? 0.f : mx * sl2;  // a row with no visible key yet: no inf - inf
        const float alpha = fast_exp2(m[r][hr] * sl2 - mref);  // 0 while m was -inf
        m[r][hr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(fmaf(s[r][nt][2 * hr + e], sl2, -mref));
            s[r][nt][2 * hr + e] = pv;
            sum += pv;
          }
        }
        l[r][hr] = l[r][hr] * alpha + sum;  // per-lane partial sum; the quad is summed once at the end
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
          o[r][nd][2 * hr] *= alpha;
          o[r][nd][2 * hr + 1] *= alpha;
        }
      }
    }
    // O += P V
#pragma unroll
    for (int kc = 0; kc < BC / 16; ++kc) {
      if (kc * 16 < kv_valid) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int r = 0; r < MT; ++r) c_to_a<T>(pa[r], s[r][2 * kc], s[r][2 * kc + 1]);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t bf[2][2];
          ldsm_b_kn(bf, tV, LD, kc * 16, np * 16, lane);
#pragma unroll
          for (int r = 0; r < MT; ++r) {
            mma_16816<T>(o[r][2 * np], pa[r], bf[0]);
            mma_16816<T>(o[r][2 * np + 1], pa[r], bf[1]);
          }
        }
      }
    }
  }

  // epilogue: O / l through this warp's own rows of sQ (no other warp reads them) for 16-byte stores
  float inv[MT][2];
#pragma unroll
  for (int r = 0; r < MT; ++r) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      l[r][hr] += __shfl_xor_sync(0xffffffffu, l[r][hr], 1);
      l[r][hr] += __shfl_xor_sync(0xffffffffu, l[r][hr], 2);
      inv[r][hr] = l[r][hr] > 0.f ? 1.f / l[r][hr] : 0.f;
    }
  }
  T* sO = sQ + warp * WR * LD;
#pragma unroll
  for (int r = 0; r < MT; ++r) {
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        *reinterpret_cast<uint32_t*>(sO + (16 * r + frag_row(lane, 2 * hr)) * LD + nd * 8 + frag_col(lane, 0)) =
            Elem<T>::pack(o[r][nd][2 * hr] * inv[r][hr], o[r][nd][2 * hr + 1] * inv[r][hr]);
      }
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < WR * kChunks / 32; ++it) {
    const int idx = lane + it * 32;
    const int rr = idx / kChunks, c = idx % kChunks;
    if (wq0 + rr < seqlen) {
      *reinterpret_cast<uint4*>(p.out + ((static_cast<int64_t>(b) * seqlen + wq0 + rr) * p.H + h) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sO + rr * LD + c * 8);
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = wq0 + 16 * r + frag_row(lane, 2 * hr);
        if (row < seqlen) {
          p.lse[(static_cast<int64_t>(b) * p.H + h) * seqlen + row] = m[r][hr] * p.scale + logf(l[r][hr]);
        }
      }
    }
  }
#else
  __trap();
#endif
}

// -----------------------------------------------------------------------------
// variant 1, backward
//
// A block of WARPS warps owns BC keys of one (b, h), 16 per warp, and walks the query tiles of BR rows from the
// diagonal to T. Everything is computed transposed, keys as rows, so that each result lands where the next
// product needs it: S^T = K Q^T -> P^T = exp(scale * S^T - lse) -> dV += P^T dO (P^T re-read as A fragments);
// dP^T = V dO^T -> dS^T = P^T * (dP^T - delta) -> dK += dS^T Q. A warp takes QC queries of the tile at a time,
// so that its score tiles (16 x QC fp32, twice) fit in registers beside dK and dV (16 x D fp32, twice). dS^T
// goes to shared memory, and dQ_tile = dS K (BR x D) is shared among the warps (DQM x DQN pieces, 32 x 32 where
// the tile allows: each fragment feeds 4 MMAs) and added to the fp32 dq_accum with atomics (float2 atomics on
// sm_90); dK is scaled once at the end, and dK and dV leave through shared memory with 16-byte stores.
//
// One barrier per query tile: dS^T has two buffers, and the dQ product of tile i - 1 runs after the barrier
// that opens tile i, which also makes tile i's Q, dO, lse and delta (fetched with cp.async during tile i - 1)
// visible and frees the stage of tile i - 1 for tile i + 1. At D = 64 each warp's K and V fragments (32
// registers) are read from shared memory once and kept for the whole walk; V passes through the second Q/dO
// stage on its way, so it takes no shared memory of its own. At D = 128 they would take 64 registers beside
// 128 of dK and dV, so they are re-read once per query tile.
//
// Tiles: FlashAttention-2's, BR x BC = 128 x 128 at D = 64 (160 KB of shared memory: A100, H100) and 64 x 128
// at D = 128 (173 KB: H100). GPUs with less shared memory per block (sm_86/sm_89 at 99 KB, and the A100 at
// D = 128) run the same kernel on smaller tiles: 64 x 128 at D = 64, 32 x 64 at D = 128. Either way 8 warps
// (4 on the smallest tile) and one block per SM: dK, dV and the score tiles need about 200 registers a thread,
// which leaves no room for a second block of 256 threads.

template <int D, bool BIG>
struct BwdCfg {
  static constexpr int BC = D == 128 && !BIG ? 64 : 128;
  static constexpr int BR = D == 64 ? (BIG ? 128 : 64) : (BIG ? 64 : 32);
  static constexpr int WARPS = BC / 16, THREADS = WARPS * 32;
  static constexpr int QC = 32;                 // queries per register tile of S^T and dP^T (64 would spill)
  static constexpr bool KV_REGS = D == 64;      // K and V fragments kept in registers for the whole walk
  static constexpr int LD = D + 8, LDS = BR + 8;
  static constexpr int DQM = BR * D / WARPS >= 32 * 32 ? 32 : 16, DQN = BR * D / (WARPS * DQM);
  static constexpr int ROW_GROUPS = BR / DQM;
  // bytes: lse and delta (2 stages each, fp32); K; V (unless KV_REGS); Q and dO (2 stages); dS^T (2 buffers)
  static constexpr int SMEM = 4 * BR * 4 + ((KV_REGS ? 1 : 2) * BC * LD + 4 * BR * LD + 2 * BC * LDS) * 2;
  static_assert(BC % BR == 0 && BR % QC == 0 && QC % 16 == 0, "query tiles must align with the key tiles");
  static_assert(2 * BR <= THREADS, "one thread per lse and delta entry");
  static_assert(2 * BR >= BC, "V (KV_REGS) and the dK/dV output staging fit in the Q/dO stages");
  static_assert(DQN % 16 == 0 && ROW_GROUPS * (D / DQN) == WARPS, "dQ tiles must split evenly among the warps");
  static_assert(SMEM <= (BIG ? 227 : 99) * 1024, "the small tiles must fit every sm_8x/sm_90 GPU, the big ones H100");
};

template <typename T, int D, bool BIG>
__global__ void __launch_bounds__(BwdCfg<D, BIG>::THREADS) attention_bwd_kernel(BwdParams<T> p) {
#if ARCANA_ATTN_SM80
  using Cfg = BwdCfg<D, BIG>;
  constexpr int BC = Cfg::BC, BR = Cfg::BR, QC = Cfg::QC, LD = Cfg::LD, LDS = Cfg::LDS, THREADS = Cfg::THREADS;
  constexpr int DQM = Cfg::DQM, DQN = Cfg::DQN;
  constexpr bool KV_REGS = Cfg::KV_REGS;
  ARCANA_DYNAMIC_SMEM(smem_raw);
  float* sL = reinterpret_cast<float*>(smem_raw);         // [2][BR] lse of the query tile
  float* sDl = sL + 2 * BR;                               // [2][BR] delta
  T* sK = reinterpret_cast<T*>(sDl + 2 * BR);             // [BC][LD]
  T* sV = sK + BC * LD;                                   // [BC][LD], only without KV_REGS
  T* sStage = sV + (KV_REGS ? 0 : BC * LD);               // [2][Q, dO][BR][LD]
  T* sdS = sStage + 4 * BR * LD;                          // [2][BC][LDS]: dS^T, keys as rows

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int k0 = blockIdx.y * BC;  // the lowest key tiles have the most work and come first
  const int wk0 = k0 + warp * 16;  // this warp's first key
  const int seqlen = p.T;
  const T* gq = p.qkv + b * p.sb + h * p.sh;
  const T* gk = gq + p.s3;
  const T* gv = gq + 2 * p.s3;
  const int64_t od = static_cast<int64_t>(p.H) * D;  // row stride of out, dout and dq_accum
  const T* gdo = p.dout + static_cast<int64_t>(b) * seqlen * od + h * D;
  const float* glse = p.lse + (static_cast<int64_t>(b) * p.H + h) * seqlen;
  const float* gdl = p.delta + (static_cast<int64_t>(b) * p.H + h) * seqlen;
  float* gdq = p.dq_accum + static_cast<int64_t>(b) * seqlen * od + h * D;
  const float sl2 = p.scale * kLog2e;
  const int i_first = k0 / BR, n_q = (seqlen + BR - 1) / BR;

  auto stage_q = [&](int st) { return sStage + st * 2 * BR * LD; };  // Q of stage st; its dO follows, BR * LD on
  auto load_q_tile = [&](int i, int st) {
    const int q0 = i * BR;
    load_tile<T, BR, D, LD, THREADS>(stage_q(st), gq, p.st, q0, seqlen, tid);
    load_tile<T, BR, D, LD, THREADS>(stage_q(st) + BR * LD, gdo, od, q0, seqlen, tid);
    if (tid < 2 * BR) {
      const int r = tid % BR;
      const bool valid = q0 + r < seqlen;
      const float* src = (tid < BR ? glse : gdl) + (valid ? q0 + r : 0);
      cp_async_4((tid < BR ? sL : sDl) + st * BR + r, src, valid);
    }
  };

  load_tile<T, BC, D, LD, THREADS>(sK, gk, p.st, k0, seqlen, tid);
  load_tile<T, BC, D, LD, THREADS>(KV_REGS ? stage_q(1) : sV, gv, p.st, k0, seqlen, tid);
  load_q_tile(i_first, 0);
  cp_async_commit();

  uint32_t kf[KV_REGS ? D / 16 : 1][4], vf[KV_REGS ? D / 16 : 1][4];  // this warp's 16 keys as A fragments
  if constexpr (KV_REGS) {
    cp_async_wait_all();
    __syncthreads();  // K and V visible (V in stage 1, which the first prefetch below overwrites)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      ldsm_a(kf[kk], sK, LD, warp * 16, kk * 16, lane);
      ldsm_a(vf[kk], stage_q(1), LD, warp * 16, kk * 16, lane);
    }
  }
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};  // this warp's 16 keys x D

  // dQ of query tile i (BR x D) = dS (BR x BC, read from dS^T) K: this warp's DQM rows x DQN columns
  auto dq_tile = [&](int i, const T* tdS) {
    const int q0 = i * BR;
    const int r0 = (warp % Cfg::ROW_GROUPS) * DQM, c0 = (warp / Cfg::ROW_GROUPS) * DQN;
    if (q0 + r0 >= seqlen) return;  // warp-uniform: rows past T only
    // keys of the block that can see a query of these rows and lie before T: 16-key chunks [0, kc_hi)
    const int kc_hi = min(BC / 16, (min(q0 + r0 + DQM, seqlen) - k0 + 15) / 16);
    float dq[DQM / 16][DQN / 8][4] = {};
#pragma unroll
    for (int kc = 0; kc < BC / 16; ++kc) {
      if (kc < kc_hi) {
        uint32_t sa[DQM / 16][4];
#pragma unroll
        for (int r = 0; r < DQM / 16; ++r) ldsm_a_trans(sa[r], tdS, LDS, r0 + 16 * r, kc * 16, lane);
#pragma unroll
        for (int np = 0; np < DQN / 16; ++np) {
          uint32_t bk[2][2];
          ldsm_b_kn(bk, sK, LD, kc * 16, c0 + np * 16, lane);
#pragma unroll
          for (int r = 0; r < DQM / 16; ++r) {
            mma_16816<T>(dq[r][2 * np], sa[r], bk[0]);
            mma_16816<T>(dq[r][2 * np + 1], sa[r], bk[1]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < DQM / 16; ++r) {
#pragma unroll
      for (int n = 0; n < DQN / 8; ++n) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int q = q0 + r0 + 16 * r + frag_row(lane, 2 * hr);
          if (q < seqlen) {
            float* dst = gdq + q * od + c0 + n * 8 + frag_col(lane, 0);
#if ARCANA_ARCH >= 900
            atomicAdd(reinterpret_cast<float2*>(dst), make_float2(dq[r][n][2 * hr], dq[r][n][2 * hr + 1]));
#else
            atomicAdd(dst, dq[r][n][2 * hr]);
            atomicAdd(dst + 1, dq[r][n][2 * hr + 1]);
#endif
          }
        }
      }
    }
  };

  for (int i = i_first; i < n_q; ++i) {
    cp_async_wait_all();
    // tile i visible; every warp is done with tile i - 1 (its stage is refilled next), with the dS^T buffer of
    // tile i - 2 (written again below) and, on the first tile with KV_REGS, with V in stage 1
    __syncthreads();
    const int st = (i - i_first) & 1;
    if (i + 1 < n_q) {
      load_q_tile(i + 1, st ^ 1);
      cp_async_commit();
    }
    if (i > i_first) dq_tile(i - 1, sdS + (st ^ 1) * BC * LDS);

    const int q0 = i * BR;
    const T* tQ = stage_q(st);
    const T* tdO = tQ + BR * LD;
    const float* tL = sL + st * BR;
    const float* tDl = sDl + st * BR;
    T* tdS = sdS + st * BC * LDS;
    // 16-query chunks of this tile that can see a key of this warp: [c_lo, c_hi)
    const int c_lo = max(0, (wk0 - q0) / 16);
    const int c_hi = min(BR / 16, (seqlen - q0 + 15) / 16);
    // Warp-uniform. A warp that sees none of the tile leaves its rows of dS^T unwritten: its keys lie at or past
    // min(q0 + BR, T), and the dQ product reads no key chunk there.
    if (c_lo >= c_hi || wk0 >= seqlen) continue;
    const bool need_mask = q0 < wk0 + 15 || q0 + BR > seqlen;
#pragma unroll 1
    for (int cb = 0; cb < BR / 16; cb += QC / 16) {  // QC queries at a time, from chunk cb
      float sc[QC / 8][4] = {}, dp[QC / 8][4] = {};  // S^T then P^T; dP^T then dS^T (16 keys x QC queries)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4], va[4];
        if constexpr (KV_REGS) {
#pragma unroll
          for (int x = 0; x < 4; ++x) ka[x] = kf[kk][x], va[x] = vf[kk][x];
        } else {
          ldsm_a(ka, sK, LD, warp * 16, kk * 16, lane);
          ldsm_a(va, sV, LD, warp * 16, kk * 16, lane);
        }
#pragma unroll
        for (int np = 0; np < QC / 16; ++np) {
          if (cb + np >= c_lo && cb + np < c_hi) {
            uint32_t bq[2][2], bo[2][2];
            ldsm_b_nk(bq, tQ, LD, kk * 16, (cb + np) * 16, lane);
            mma_16816<T>(sc[2 * np], ka, bq[0]);
            mma_16816<T>(sc[2 * np + 1], ka, bq[1]);
            ldsm_b_nk(bo, tdO, LD, kk * 16, (cb + np) * 16, lane);
            mma_16816<T>(dp[2 * np], va, bo[0]);
            mma_16816<T>(dp[2 * np + 1], va, bo[1]);
          }
        }
      }
      // P^T and dS^T; chunks skipped above hold 0 and are all masked (they lie before the warp's first key or
      // past T), so every entry of these QC columns is written, 0 where masked
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = cb * 16 + n * 8 + frag_col(lane, e);  // query within the tile
          const int key = wk0 + frag_row(lane, e);
          float pv = fast_exp2(fmaf(sc[n][e], sl2, -tL[c] * kLog2e));
          if (need_mask && (key > q0 + c || q0 + c >= seqlen)) pv = 0.f;
          sc[n][e] = pv;
          dp[n][e] = pv * (dp[n][e] - tDl[c]);
        }
      }
      // dV += P^T dO and dK += dS^T Q, k running over these queries
#pragma unroll
      for (int kc = 0; kc < QC / 16; ++kc) {
        if (cb + kc >= c_lo && cb + kc < c_hi) {
          uint32_t pa[4], sa[4];
          c_to_a<T>(pa, sc[2 * kc], sc[2 * kc + 1]);
          c_to_a<T>(sa, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
          for (int np = 0; np < D / 16; ++np) {
            uint32_t bo[2][2], bq[2][2];
            ldsm_b_kn(bo, tdO, LD, (cb + kc) * 16, np * 16, lane);
            mma_16816<T>(dv[2 * np], pa, bo[0]);
            mma_16816<T>(dv[2 * np + 1], pa, bo[1]);
            ldsm_b_kn(bq, tQ, LD, (cb + kc) * 16, np * 16, lane);
            mma_16816<T>(dk[2 * np], sa, bq[0]);
            mma_16816<T>(dk[2 * np + 1], sa, bq[1]);
          }
        }
      }
      // dS^T to shared memory (rounded to T, as it enters dQ = dS K on tensor cores)
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int off = (warp * 16 + frag_row(lane, 2 * hr)) * LDS + cb * 16 + n * 8 + frag_col(lane, 0);
          *reinterpret_cast<uint32_t*>(tdS + off) = Elem<T>::pack(dp[n][2 * hr], dp[n][2 * hr + 1]);
        }
      }
    }
  }
  __syncthreads();  // dS^T of the last tile complete
  dq_tile(n_q - 1, sdS + ((n_q - 1 - i_first) & 1) * BC * LDS);

  // epilogue: dK (scaled) and dV through this warp's rows of the Q/dO stages (read by no one since the last
  // barrier, and no copy is in flight), then 16-byte stores into dqkv
  T* oK = sStage + warp * 16 * LD;
  T* oV = sStage + (BC + warp * 16) * LD;
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int off = frag_row(lane, 2 * hr) * LD + nd * 8 + frag_col(lane, 0);
      *reinterpret_cast<uint32_t*>(oK + off) = Elem<T>::pack(dk[nd][2 * hr] * p.scale, dk[nd][2 * hr + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(oV + off) = Elem<T>::pack(dv[nd][2 * hr], dv[nd][2 * hr + 1]);
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int idx = lane + it * 32;
    const int r = idx / kChunks, c = idx % kChunks;
    const int key = wk0 + r;
    if (key < seqlen) {
      T* dst = p.dqkv + ((static_cast<int64_t>(b) * seqlen + key) * 3 * p.H + p.H + h) * D + c * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(oK + r * LD + c * 8);
      *reinterpret_cast<uint4*>(dst + p.H * D) = *reinterpret_cast<const uint4*>(oV + r * LD + c * 8);
    }
  }
#else
  __trap();
#endif
}

// dQ = scale * dq_accum, fp32 -> T, into slot 0 of dqkv; 8 elements per thread.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(BwdParams<T> p) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = static_cast<int64_t>(p.B) * p.T * p.H;  // (b, t, h)
  if (chunk >= rows * (D / 8)) return;
  const int64_t row = chunk / (D / 8);
  const int c = static_cast<int>(chunk % (D / 8));
  const float4 a = *reinterpret_cast<const float4*>(p.dq_accum + row * D + c * 8);
  const float4 z = *reinterpret_cast<const float4*>(p.dq_accum + row * D + c * 8 + 4);
  uint4 out;
  out.x = Elem<T>::pack(a.x * p.scale, a.y * p.scale);
  out.y = Elem<T>::pack(a.z * p.scale, a.w * p.scale);
  out.z = Elem<T>::pack(z.x * p.scale, z.y * p.scale);
  out.w = Elem<T>::pack(z.z * p.scale, z.w * p.scale);
  const int64_t bt = row / p.H;
  const int h = static_cast<int>(row % p.H);
  *reinterpret_cast<uint4*>(p.dqkv + (bt * 3 * p.H + h) * D + c * 8) = out;
}

// -----------------------------------------------------------------------------
// fragment self-test: one warp runs the helpers above on X, Y, Z (16 x 16 each, stored with a padded stride)
// and writes, in fp32: X Y^T (ldsm_a + ldsm_b_nk), X Z (ldsm_b_kn), X^T Z (ldsm_a_trans), and
// round(X Y^T) Z (accumulators back in as A through c_to_a); each result scattered with frag_row/frag_col.

constexpr int kSelftestLd = 24;  // padded row stride of the self-test tiles

template <typename T>
__global__ void __launch_bounds__(32) attention_selftest_kernel(const T* in, float* out) {
#if ARCANA_ATTN_SM80
  constexpr int LD = kSelftestLd;
  ARCANA_DYNAMIC_SMEM(smem_raw);
  T* tiles = reinterpret_cast<T*>(smem_raw);  // X, Y, Z: [3][16][LD]
  const int lane = threadIdx.x;
  for (int idx = lane; idx < 3 * 256; idx += 32) tiles[(idx / 16) * LD + idx % 16] = in[idx];  // 48 rows of 16
  __syncwarp();
  const T* X = tiles;
  const T* Y = tiles + 16 * LD;
  const T* Z = tiles + 32 * LD;
  float r[4][2][4];  // result, n-tile, accumulator
  for (int q = 0; q < 4; ++q)
    for (int n = 0; n < 2; ++n) r[q][n][0] = r[q][n][1] = r[q][n][2] = r[q][n][3] = 0.f;
  uint32_t a[4], bf[2][2];
  ldsm_a(a, X, LD, 0, 0, lane);
  ldsm_b_nk(bf, Y, LD, 0, 0, lane);
  mma_16816<T>(r[0][0], a, bf[0]);
  mma_16816<T>(r[0][1], a, bf[1]);
  ldsm_b_kn(bf, Z, LD, 0, 0, lane);
  mma_16816<T>(r[1][0], a, bf[0]);
  mma_16816<T>(r[1][1], a, bf[1]);
  uint32_t at[4];
  ldsm_a_trans(at, X, LD, 0, 0, lane);
  mma_16816<T>(r[2][0], at, bf[0]);
  mma_16816<T>(r[2][1], at, bf[1]);
  uint32_t pa[4];
  c_to_a<T>(pa, r[0][0], r[0][1]);
  mma_16816<T>(r[3][0], pa, bf[0]);
  mma_16816<T>(r[3][1], pa, bf[1]);
  for (int q = 0; q < 4; ++q)
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 4; ++i) out[q * 256 + frag_row(lane, i) * 16 + n * 8 + frag_col(lane, i)] = r[q][n][i];
#else
  __trap();
#endif
}

// -----------------------------------------------------------------------------
// launchers: raw pointers and a stream, shared by the torch bindings and the CPU emulation

template <typename T, int D>
void launch_fwd(const FwdParams<T>& p, int variant, cudaStream_t stream) {
  if (variant == 0) {
    const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.T;
    const auto kernel = attention_fwd_plain_kernel<T, D>;
    ARCANA_LAUNCH(kernel, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream, p);
    return;
  }
  using Cfg = FwdCfg<D>;
  const auto kernel = attention_fwd_kernel<T, D>;
  ARCANA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM));
  const dim3 grid(p.B * p.H, (p.T + Cfg::BR - 1) / Cfg::BR);
  ARCANA_LAUNCH(kernel, grid, dim3(Cfg::THREADS), Cfg::SMEM, stream, p);
}

template <typename T, int D, bool BIG>
void launch_bwd_tiles(const BwdParams<T>& p, cudaStream_t stream) {
  using Cfg = BwdCfg<D, BIG>;
  const auto kernel = attention_bwd_kernel<T, D, BIG>;
  ARCANA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM));
  const dim3 grid(p.B * p.H, (p.T + Cfg::BC - 1) / Cfg::BC);
  ARCANA_LAUNCH(kernel, grid, dim3(Cfg::THREADS), Cfg::SMEM, stream, p);
}

// max_smem: the GPU's shared memory per block with opt-in (bytes), which picks the backward's tiles.
template <typename T, int D>
void launch_bwd(const BwdParams<T>& p, int variant, int max_smem, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.T;
  const dim3 chunk_grid(static_cast<unsigned>((rows * (D / 8) + 255) / 256));  // one thread per 8 elements
  const auto delta_kernel = attention_bwd_delta_kernel<T, D>;
  ARCANA_LAUNCH(delta_kernel, chunk_grid, dim3(256), 0, stream, p);
  if (variant == 0) {
    const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
    const auto dq_kernel = attention_bwd_plain_dq_kernel<T, D>;
    const auto dkv_kernel = attention_bwd_plain_dkv_kernel<T, D>;
    ARCANA_LAUNCH(dq_kernel, grid, dim3(128), 0, stream, p);
    ARCANA_LAUNCH(dkv_kernel, grid, dim3(128), 0, stream, p);
    return;
  }
  ARCANA_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(rows) * D * sizeof(float), stream));
  if (max_smem >= BwdCfg<D, true>::SMEM) launch_bwd_tiles<T, D, true>(p, stream);
  else launch_bwd_tiles<T, D, false>(p, stream);
  const auto convert_kernel = attention_bwd_dq_convert_kernel<T, D>;
  ARCANA_LAUNCH(convert_kernel, chunk_grid, dim3(256), 0, stream, p);
}

template <typename T>
void launch_selftest(const T* in, float* out, cudaStream_t stream) {
  const auto kernel = attention_selftest_kernel<T>;
  ARCANA_LAUNCH(kernel, dim3(1), dim3(32), 3 * 16 * kSelftestLd * sizeof(T), stream, in, out);
}

}  // namespace arcana_attention

#ifdef ARCANA_BINDINGS
// -----------------------------------------------------------------------------
// torch bindings: checks, allocation, the dtype/head-size dispatch (all in one place), TORCH_LIBRARY_IMPL

namespace arcana {
namespace {

using namespace arcana_attention;

// f(T{}, std::integral_constant<int, D>{}) for the supported dtypes (bf16, fp16: tensor-core operands, so no
// fp32 instantiation as in ARCANA_DISPATCH) and head sizes; the callers have checked both.
template <typename F>
void dispatch_attention(at::ScalarType dtype, int64_t head_dim, F&& f) {
  auto by_dim = [&](auto elem) {
    if (head_dim == 64) f(elem, std::integral_constant<int, 64>{});
    else f(elem, std::integral_constant<int, 128>{});
  };
  if (dtype == at::kBFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

void check_arch(const char* op) {
  int device = 0, major = 0;
  ARCANA_CUDA_CHECK(cudaGetDevice(&device));
  ARCANA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TORCH_CHECK(major >= 8, op, ": needs an sm_80 or newer GPU (bf16/fp16 tensor-core mma, cp.async), this one is "
              "sm_", major, "x; use --kernels torch on it");
}

void check_attention_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", name,
              " must be bfloat16 or float16 (tensor-core operands), got ", t.scalar_type(),
              "; run under torch.autocast(\"cuda\", dtype=torch.bfloat16) or cast it");
}

struct QkvShape {
  int64_t B, T, H, D;
};

// qkv must be (B, T, 3, H, D) on a GPU, bf16/fp16, D 64 or 128, last dimension contiguous, other strides
// multiples of 8 elements and 16-byte aligned data (the kernels move 16 bytes at a time).
QkvShape check_qkv(const at::Tensor& qkv, const char* op) {
  check_cuda(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must have shape (B, T, 3, H, D), c_attn's output "
              "viewed as .view(B, T, 3, n_head, head_dim), got ", qkv.sizes());
  check_attention_dtype(qkv, op, "qkv");
  const int64_t D = qkv.size(4);
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim (n_embd / n_head) must be 64 or 128, got ", D,
              "; other head sizes take the PyTorch path");
  TORCH_CHECK(qkv.stride(4) == 1, op, ": qkv's last (head_dim) dimension must be contiguous, got strides ",
              qkv.strides(), "; call .contiguous() first");
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(qkv.stride(d) % 8 == 0 || qkv.size(d) == 1, op, ": qkv's strides must be multiples of 8 elements "
                "(16-byte loads), got strides ", qkv.strides(), "; call .contiguous() first");
  }
  TORCH_CHECK(aligned16(qkv.data_ptr()), op, ": qkv's data must be 16-byte aligned; call .contiguous() first");
  // grids are (B * H, tiles of 64 rows or more): B * H within int32, at most 65535 tiles
  TORCH_CHECK(qkv.size(0) * qkv.size(3) <= INT32_MAX && qkv.size(1) <= (1 << 21), op,
              ": B * H must fit in int32 and T must be at most 2097152, got B=", qkv.size(0), ", H=", qkv.size(3),
              ", T=", qkv.size(1));
  return {qkv.size(0), qkv.size(1), qkv.size(3), D};
}

template <typename Params>
void fill_qkv(Params& p, const at::Tensor& qkv, const QkvShape& s) {
  p.sb = qkv.stride(0);
  p.st = qkv.stride(1);
  p.s3 = qkv.stride(2);
  p.sh = qkv.stride(3);
  p.B = static_cast<int>(s.B);
  p.T = static_cast<int>(s.T);
  p.H = static_cast<int>(s.H);
  p.scale = 1.f / std::sqrt(static_cast<float>(s.D));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv) {
  const char* op = "arcana::attention_fwd";
  const QkvShape s = check_qkv(qkv, op);
  const int variant = std::min(kernel_variant(), 1);
  const DeviceGuard guard(qkv.device());
  if (variant == 1) check_arch(op);
  const cudaStream_t stream = current_stream();
  at::Tensor out = new_buffer({s.B, s.T, s.H, s.D}, qkv.options(), stream);
  at::Tensor lse = new_buffer({s.B, s.H, s.T}, qkv.options().dtype(at::kFloat), stream);
  if (s.B * s.T * s.H == 0) return {out, lse};
  dispatch_attention(qkv.scalar_type(), s.D, [&](auto elem, auto dim) {
    using E = decltype(elem);
    constexpr int kD = decltype(dim)::value;
    FwdParams<E> p{};
    fill_qkv(p, qkv, s);
    p.qkv = reinterpret_cast<const E*>(qkv.data_ptr());
    p.out = reinterpret_cast<E*>(out.data_ptr());
    p.lse = lse.data_ptr<float>();
    launch_fwd<E, kD>(p, variant, stream);
  });
  return {out, lse};
}

at::Tensor attention_bwd(const at::Tensor& dout_in, const at::Tensor& qkv, const at::Tensor& out_in,
                         const at::Tensor& lse_in) {
  const char* op = "arcana::attention_bwd";
  const QkvShape s = check_qkv(qkv, op);
  const int variant = std::min(kernel_variant(), 1);
  const std::array<int64_t, 4> rows_dims{s.B, s.T, s.H, s.D};
  const at::IntArrayRef rows_shape(rows_dims);
  const std::pair<const at::Tensor*, const char*> rows_args[] = {{&dout_in, "dout"}, {&out_in, "out"}};
  for (const auto& [t, name] : rows_args) {
    check_cuda(*t, op, name);
    check_same_device(*t, qkv, op, name, "qkv");
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                ", expected qkv's ", qkv.scalar_type());
    TORCH_CHECK(t->sizes() == rows_shape, op, ": ", name, " must have shape (B, T, H, D) = ", rows_shape, ", got ",
                t->sizes());
  }
  check_cuda(lse_in, op, "lse");
  check_same_device(lse_in, qkv, op, "lse", "qkv");
  check_dtype(lse_in, at::kFloat, op, "lse", "the forward saves it in float32");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({s.B, s.H, s.T}), op, ": lse must have shape (B, H, T) = (", s.B,
              ", ", s.H, ", ", s.T, "), got ", lse_in.sizes());
  const DeviceGuard guard(qkv.device());
  if (variant == 1) check_arch(op);
  const cudaStream_t stream = current_stream();
  // The kernels read dout and out as rows of 16 bytes: a contiguous tensor whose storage offset breaks that
  // alignment (a view from some other buffer) is copied, like a strided one, into a fresh aligned buffer.
  auto aligned_rows = [](const at::Tensor& t) {
    return t.is_contiguous() && aligned16(t.data_ptr()) ? t : t.clone(at::MemoryFormat::Contiguous);
  };
  const at::Tensor dout = aligned_rows(dout_in), out = aligned_rows(out_in), lse = lse_in.contiguous();
  at::Tensor dqkv = new_buffer({s.B, s.T, 3, s.H, s.D}, qkv.options(), stream);
  if (s.B * s.T * s.H == 0) return dqkv;
  const at::TensorOptions f32 = qkv.options().dtype(at::kFloat);
  at::Tensor delta = new_buffer({s.B, s.H, s.T}, f32, stream);
  at::Tensor dq_accum = variant == 1 ? new_buffer({s.B, s.T, s.H, s.D}, f32, stream) : at::Tensor();
  int max_smem = 0;
  ARCANA_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, qkv.get_device()));
  dispatch_attention(qkv.scalar_type(), s.D, [&](auto elem, auto dim) {
    using E = decltype(elem);
    constexpr int kD = decltype(dim)::value;
    BwdParams<E> p{};
    fill_qkv(p, qkv, s);
    p.qkv = reinterpret_cast<const E*>(qkv.data_ptr());
    p.out = reinterpret_cast<const E*>(out.data_ptr());
    p.dout = reinterpret_cast<const E*>(dout.data_ptr());
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq_accum = variant == 1 ? dq_accum.data_ptr<float>() : nullptr;
    p.dqkv = reinterpret_cast<E*>(dqkv.data_ptr());
    launch_bwd<E, kD>(p, variant, max_smem, stream);
  });
  return dqkv;
}

at::Tensor attention_selftest(const at::Tensor& x) {
  const char* op = "arcana::attention_selftest";
  check_cuda(x, op, "x");
  check_attention_dtype(x, op, "x");
  TORCH_CHECK(x.sizes() == at::IntArrayRef({3, 16, 16}), op, ": x must have shape (3, 16, 16), got ", x.sizes());
  const DeviceGuard guard(x.device());
  check_arch(op);
  const cudaStream_t stream = current_stream();
  const at::Tensor xc = x.contiguous();
  at::Tensor out = new_buffer({4, 16, 16}, x.options().dtype(at::kFloat), stream);
  dispatch_attention(x.scalar_type(), 64, [&](auto elem, auto) {
    using E = decltype(elem);
    launch_selftest<E>(reinterpret_cast<const E*>(xc.data_ptr()), out.data_ptr<float>(), stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(arcana, ARCANA_KERNEL_KEY, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_selftest", &attention_selftest);
}

}  // namespace arcana
#endif  // ARCANA_BINDINGS
