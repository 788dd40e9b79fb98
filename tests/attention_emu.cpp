// CPU emulation of csrc/attention.cu's kernels and launchers, so that they run here, on machines without a GPU
// (tests/test_attention.py builds this file with g++ and calls it through ctypes). The PTX instructions come from
// attention_emu.h, the rest of the CUDA execution model from emu_runtime.h; here, the few CUDA runtime calls of
// the launchers, and entry points that take raw buffers.

#include "attention_emu.h"

namespace emu {

inline cudaError_t check(cudaError_t e) {
  if (e != cudaSuccess) fail("CUDA call failed");
  return e;
}

}  // namespace emu

#define ARCANA_DYNAMIC_SMEM(name) unsigned char* name = emu::tl.smem
#define ARCANA_LAUNCH(kernel, grid, block, smem, stream, ...) emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define ARCANA_CUDA_CHECK(expr) emu::check(expr)
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaMemsetAsync(ptr, value, bytes, stream) (std::memset((ptr), (value), (bytes)), cudaSuccess)

#include "csrc/attention.cu"

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
// -DARCANA_EMU_MAIN). Under ThreadSanitizer each CUDA thread is a thread of its own to the sanitizer and only the
// barriers order memory (emu_runtime.h), so it reports any shared-memory access that two threads make without
// one in between: a missing __syncthreads, or a stage refilled while still read.
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
