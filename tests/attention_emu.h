// The PTX instructions of csrc/attention.cu (ldmatrix, mma.sync m16n8k16, cp.async) emulated per warp on the CPU,
// for the emulators that run its kernels: attention_emu.cpp (the kernels and launchers alone) and emu_ops.cpp
// (the whole library behind its torch bindings).
//
// The warp-wide instructions are barriers over the 32 threads of a warp that exchange each lane's operands, and
// each lane then computes its own result from the PTX ISA's definition of the instruction:
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i; lane l receives, in register i,
//                 row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (with .trans: rows 2 (l % 4) and
//                 2 (l % 4) + 1 of column l / 4), the lower column (row) in the lower 16 bits;
//   mma m16n8k16: the fragment layouts of "Matrix fragments for mma.m16n8k16", written out below from the
//                 element's side (which lane and register hold A[m][k], B[k][n]).
// These are written independently of the kernel's helpers (which compute ldmatrix addresses), so a slip in
// the kernel's index arithmetic shows up as a wrong answer here. If this file and the kernel shared a wrong
// reading of the PTX ISA, attention_selftest on a GPU catches it.
//
// Also checked: cp.async copies land only at cp.async.wait (a missing wait reads stale shared memory), read only
// inside the input tensors (g_ranges, set by the caller of each launch), and every shared-memory access of
// ldmatrix/cp.async is in bounds and aligned. The rest of the CUDA execution model (threads as fibers, barriers,
// warp collectives, shared memory that starts as NaN bytes, ex2.approx.ftz with its error and flush to zero)
// comes from emu_runtime.h.
#pragma once

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
// Each CUDA thread's own (the fibers share a thread_local).
inline CpAsyncState& cp_state() { return per_thread<CpAsyncState>(); }

// Global buffers the kernels may read with cp.async (set by the caller of each launch).
struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};
inline std::vector<Range> g_ranges;

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
  cp_state().pending.push_back({smem, gmem, bytes, valid});
#if defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer the copy also lands now, the earliest the hardware may land it, so that a stage refilled
  // while other threads still read it is a reported race (it lands again at the wait, which changes nothing).
  if (valid) std::memcpy(smem, gmem, bytes);
  else std::memset(smem, 0, bytes);
#endif
}

inline void cp_async_commit() {
  cp_state().groups.push_back(std::move(cp_state().pending));
  cp_state().pending.clear();
}

inline void cp_async_wait_all() {
  for (auto& g : cp_state().groups) {
    for (const Copy& c : g) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
  }
  cp_state().groups.clear();
}

// A kernel launch; a thread that ends with cp.async copies it never waited for fails.
template <typename K, typename... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  run_grid(grid, block, smem_bytes, [&] {
    cp_state() = CpAsyncState{};
    kernel(args...);
    bool unwaited = !cp_state().pending.empty();
    for (const auto& g : cp_state().groups) unwaited |= !g.empty();
    if (unwaited) fail("cp.async copies never waited for");
  });
}

}  // namespace emu

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
