// CPU emulation of the CUDA features csrc/attention.cu uses, so that its kernels and launchers run here, on
// machines without a GPU (tests/test_attention.py builds this file with g++ and calls it through ctypes).
//
// Every CUDA thread of a block is an OS thread. __syncthreads is a barrier over the block; the warp-wide
// instructions (shuffles, ldmatrix, mma) are barriers over the 32 threads of a warp that exchange each lane's
// operands, and each lane then computes its own result from the PTX ISA's definition of the instruction:
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i; lane l receives, in register i,
//                 row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (with .trans: rows 2 (l % 4) and
//                 2 (l % 4) + 1 of column l / 4), the lower column (row) in the lower 16 bits;
//   mma m16n8k16: the fragment layouts of "Matrix fragments for mma.m16n8k16", written out below from the
//                 element's side (which lane and register hold A[m][k], B[k][n]).
// These are written independently of the kernel's helpers (which compute ldmatrix addresses), so a slip in
// the kernel's index arithmetic shows up as a wrong answer here. If this file and the kernel shared a wrong
// reading of the PTX ISA, attention_selftest on a GPU catches it.
//
// Also checked: cp.async copies land only at cp.async.wait (a missing wait reads stale shared memory) and every
// shared-memory access of ldmatrix/cp.async is in bounds and aligned. The rest of the CUDA execution model
// (threads, barriers, warp collectives, shared memory that starts as NaN bytes, ex2.approx.ftz with its error
// and flush to zero) comes from emu_runtime.h.

#include "emu_runtime.h"

#include <type_traits>

namespace emu {

enum : int { kLdsm = kFirstEmulatorCollective, kLdsmTrans, kMmaBf16, kMmaF16 };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

// This thread's cp.async copies.
struct CpAsyncState {
  std::vector<Copy> pending;              // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited for
};
thread_local CpAsyncState cp;
#define cp (::emu::per_thread<::emu::CpAsyncState>())  // each CUDA thread's own: the fibers share a thread_local

// Global buffers the kernels may read with cp.async (registered by the entry points).
struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};
std::vector<Range> g_ranges;

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < tl.smem || c + bytes > tl.smem + tl.smem_bytes) fail(what);
  if (reinterpret_cast<uintptr_t>(p) % align) fail("misaligned shared-memory access");
}

template <typename T>
inline float bits_to_float(uint16_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return static_cast<float>(v);
}

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  arrive(std::is_same<T, __nv_bfloat16>::value ? kMmaBf16 : kMmaF16, mine, 6);
  const Warp& w = *tl.warp;
  // A[m][k]: lane 4 (m % 8) + (k % 8) / 2, register (m / 8) + 2 (k / 8), half k % 2
  // B[k][n]: lane 4 n + (k % 8) / 2, register k / 8, half k % 2
  auto A = [&](int m, int k) {
    const uint32_t r = static_cast<uint32_t>(w.slot[4 * (m % 8) + (k % 8) / 2][(m / 8) + 2 * (k / 8)]);
    return bits_to_float<T>(static_cast<uint16_t>(k % 2 ? r >> 16 : r & 0xffff));
  };
  auto B = [&](int k, int n) {
    const uint32_t r = static_cast<uint32_t>(w.slot[4 * n + (k % 8) / 2][4 + k / 8]);
    return bits_to_float<T>(static_cast<uint16_t>(k % 2 ? r >> 16 : r & 0xffff));
  };
  const int lane = tl.lane;
  float out[4];
  for (int i = 0; i < 4; ++i) {  // C[m][n]: m = lane / 4 + 8 (i / 2), n = 2 (lane % 4) + i % 2
    const int m = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(m, k) * B(k, n);
    out[i] = acc;
  }
  depart();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  check_smem(row, 16, 16, "ldmatrix row address outside shared memory");
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  arrive(trans ? kLdsmTrans : kLdsm, &mine, 1);
  const Warp& w = *tl.warp;
  const int lane = tl.lane;
  auto elem = [&](int matrix, int rr, int cc) {  // element (rr, cc) of 8 x 8 matrix `matrix`
    const auto* p = reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(w.slot[8 * matrix + rr][0]));
    return static_cast<uint32_t>(p[cc]);
  };
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    if (!trans) out[i] = elem(i, lane / 4, 2 * (lane % 4)) | elem(i, lane / 4, 2 * (lane % 4) + 1) << 16;
    else out[i] = elem(i, 2 * (lane % 4), lane / 4) | elem(i, 2 * (lane % 4) + 1, lane / 4) << 16;
  }
  depart();
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

inline void cp_async(void* smem, const void* gmem, int bytes, bool valid) {
  check_smem(smem, bytes, bytes, "cp.async destination outside shared memory");
  if (reinterpret_cast<uintptr_t>(gmem) % bytes) fail("misaligned cp.async source");
  bool inside = false;
  for (const Range& r : g_ranges) {
    const auto* c = static_cast<const unsigned char*>(gmem);
    inside |= c >= r.lo && c + bytes <= r.hi;
  }
  if (!inside) fail("cp.async source outside every input tensor");
  cp.pending.push_back({smem, gmem, bytes, valid});
#if defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer the copy also lands now, the earliest the hardware may land it, so that a stage refilled
  // while other threads still read it is a reported race (it lands again at the wait, which changes nothing).
  if (valid) std::memcpy(smem, gmem, bytes);
  else std::memset(smem, 0, bytes);
#endif
}

inline void cp_async_commit() {
  cp.groups.push_back(std::move(cp.pending));
  cp.pending.clear();
}

inline void cp_async_wait_all() {
  for (auto& g : cp.groups) {
    for (const Copy& c : g) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
  }
  cp.groups.clear();
}

// A kernel launch; a thread that ends with cp.async copies it never waited for fails.
template <typename K, typename... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  run_grid(grid, block, smem_bytes, [&] {
    cp = CpAsyncState{};
    kernel(args...);
    bool unwaited = !cp.pending.empty();
    for (const auto& g : cp.groups) unwaited |= !g.empty();
    if (unwaited) fail("cp.async copies never waited for");
  });
}

inline cudaError_t check(cudaError_t e) {
  if (e != cudaSuccess) fail("CUDA call failed");
  return e;
}

}  // namespace emu

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#define ARCANA_DYNAMIC_SMEM(name) unsigned char* name = emu::tl.smem
#define ARCANA_LAUNCH(kernel, grid, block, smem, stream, ...) emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define ARCANA_CUDA_CHECK(expr) emu::check(expr)
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaMemsetAsync(ptr, value, bytes, stream) (std::memset((ptr), (value), (bytes)), cudaSuccess)

#include "../csrc/attention.cu"

// -----------------------------------------------------------------------------
// entry points for ctypes: dtype 0 = bfloat16, 1 = float16; the caller owns every buffer

namespace {

template <typename F>
void dispatch(int dtype, int head_dim, F&& f) {
  auto by_dim = [&](auto elem) {
    if (head_dim == 64) f(elem, std::integral_constant<int, 64>{});
    else f(elem, std::integral_constant<int, 128>{});
  };
  if (dtype == 0) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

void register_range(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  emu::g_ranges.push_back({c, c + bytes});
}

}  // namespace

extern "C" {

// qkv_bytes: the extent of qkv's storage from its data pointer (for the cp.async bounds check).
int emu_attention_fwd(int dtype, int variant, const void* qkv, int64_t qkv_bytes, int64_t sb, int64_t st,
                      int64_t s3, int64_t sh, int B, int T, int H, int D, void* out, float* lse) {
  emu::g_ranges.clear();
  register_range(qkv, qkv_bytes);
  dispatch(dtype, D, [&](auto elem, auto dim) {
    using E = decltype(elem);
    constexpr int kD = decltype(dim)::value;
    arcana_attention::FwdParams<E> p{};
    p.qkv = static_cast<const E*>(qkv);
    p.sb = sb; p.st = st; p.s3 = s3; p.sh = sh;
    p.out = static_cast<E*>(out);
    p.lse = lse;
    p.B = B; p.T = T; p.H = H;
    p.scale = 1.f / std::sqrt(static_cast<float>(kD));
    arcana_attention::launch_fwd<E, kD>(p, variant, nullptr);
  });
  return 0;
}

// max_smem: the shared memory per block the launcher is told the GPU has (bytes), which picks the tiles.
int emu_attention_bwd(int dtype, int variant, const void* qkv, int64_t qkv_bytes, int64_t sb, int64_t st,
                      int64_t s3, int64_t sh, int B, int T, int H, int D, const void* out, const void* dout,
                      const float* lse, void* dqkv, int max_smem) {
  const size_t rows = static_cast<size_t>(B) * T * H;
  std::vector<float> delta(rows, NAN), dq_accum(rows * D, NAN);  // poisoned, like the real scratch buffers
  emu::g_ranges.clear();
  register_range(qkv, qkv_bytes);
  register_range(dout, rows * D * 2);
  register_range(lse, rows * 4);
  register_range(delta.data(), rows * 4);
  dispatch(dtype, D, [&](auto elem, auto dim) {
    using E = decltype(elem);
    constexpr int kD = decltype(dim)::value;
    arcana_attention::BwdParams<E> p{};
    p.qkv = static_cast<const E*>(qkv);
    p.sb = sb; p.st = st; p.s3 = s3; p.sh = sh;
    p.out = static_cast<const E*>(out);
    p.dout = static_cast<const E*>(dout);
    p.lse = lse;
    p.delta = delta.data();
    p.dq_accum = dq_accum.data();
    p.dqkv = static_cast<E*>(dqkv);
    p.B = B; p.T = T; p.H = H;
    p.scale = 1.f / std::sqrt(static_cast<float>(kD));
    arcana_attention::launch_bwd<E, kD>(p, variant, max_smem, nullptr);
  });
  return 0;
}

int emu_attention_selftest(int dtype, const void* in, float* out) {
  dispatch(dtype, 64, [&](auto elem, auto) {
    using E = decltype(elem);
    arcana_attention::launch_selftest<E>(static_cast<const E*>(in), out, nullptr);
  });
  return 0;
}

}  // extern "C"

#ifdef ARCANA_EMU_MAIN
// A standalone run for race detection (tests/test_attention.py builds it with g++ -fsanitize=thread
// -DARCANA_EMU_MAIN). The barriers above are mutexes and condition variables, so ThreadSanitizer sees
// __syncthreads and the warp collectives as the orderings they are, and reports any shared-memory access that
// two threads make without one in between: a missing __syncthreads, or a stage refilled while still read.
#include <random>

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  struct Shape {
    int B, T, H, D, max_smem;
  };
  // Long enough that each double-buffered stage is refilled many times while the other one is read (T = 1025:
  // the forward's last query block walks 17 K/V tiles, the backward's first key tile 9 Q/dO tiles; likewise the
  // other shapes on their tiles), the big and the small tiles of the backward, B and H > 1 so that many blocks
  // add into the same dQ rows; ragged ends everywhere.
  constexpr int kH100 = 227 * 1024, kSm86 = 99 * 1024;
  for (const Shape s : {Shape{1, 1025, 1, 64, kH100}, Shape{2, 520, 3, 64, kSm86}, Shape{1, 520, 1, 128, kH100},
                        Shape{1, 260, 2, 128, kSm86}}) {
    const size_t n = static_cast<size_t>(s.B) * s.T * 3 * s.H * s.D, rows = static_cast<size_t>(s.B) * s.T * s.H;
    std::vector<__nv_bfloat16> qkv(n), out(rows * s.D), dout(rows * s.D), dqkv(n);
    for (auto& x : qkv) x = __float2bfloat16(normal(rng));
    for (auto& x : dout) x = __float2bfloat16(normal(rng));
    std::vector<float> lse(rows);
    const int64_t st = 3 * s.H * s.D;
    emu_attention_fwd(0, 1, qkv.data(), n * 2, s.T * st, st, s.H * s.D, s.D, s.B, s.T, s.H, s.D, out.data(),
                      lse.data());
    emu_attention_bwd(0, 1, qkv.data(), n * 2, s.T * st, st, s.H * s.D, s.D, s.B, s.T, s.H, s.D, out.data(),
                      dout.data(), lse.data(), dqkv.data(), s.max_smem);
  }
  std::printf("done\n");
  return 0;
}
#endif
