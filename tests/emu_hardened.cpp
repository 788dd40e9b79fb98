// The hardened runs of tests/test_emulation.py: one kernel family's emulator (-DEMU_NORM_GELU,
// -DEMU_CROSS_ENTROPY or -DEMU_ATTENTION) built into a program with a sanitizer, run on shapes and devices where every
// persistent and grid-stride loop takes several turns, every partial sum has more partials than a warp, cp.async
// stages are refilled several times and inputs start off a 16-byte boundary. Each case runs the fast kernels
// and the plain ones (variant 0, checked against PyTorch by the family's own tests) on the same random inputs:
// outputs fully written and finite, fast within a few roundings of plain. What the sanitizer adds:
// - AddressSanitizer (with UBSan's alignment check): every buffer is its exact size, so any global access out of
//   bounds is reported, and a 16-byte access to a misaligned address fails;
// - ThreadSanitizer: blocks unordered and cp.async copies landing when issued (emu_runtime.h, attention_emu.cpp),
//   so a missing barrier, a stage refilled while read and two blocks writing one address are reported.
// Prints one line per case; exits 1 on a mismatch (a sanitizer report aborts before).

#if defined(EMU_NORM_GELU)
#include "norm_gelu_emu.cpp"
#elif defined(EMU_CROSS_ENTROPY)
#include "cross_entropy_emu.cpp"
#elif defined(EMU_ATTENTION)
#include "attention_emu.cpp"
#endif

#include <random>

namespace {

int g_failures = 0;

template <typename T>
float as_float(T v) {
  return static_cast<float>(v);
}

// A buffer of n elements of T starting `offset` elements past a 16-byte boundary, and nothing more (the
// sanitizer's red zones are right before and after it). Outputs start as NaN.
template <typename T>
struct Buffer {
  Buffer(size_t n, size_t offset = 0) : store(new T[n + offset]), data(store.get() + offset), n(n) {
    for (size_t i = 0; i < n + offset; ++i) store[i] = std::is_integral_v<T> ? T(0) : T(NAN);
  }
  std::unique_ptr<T[]> store;
  T* data;
  size_t n;
};

template <typename T>
Buffer<T> randn(size_t n, float scale, float shift, uint32_t seed, size_t offset = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Buffer<T> b(n, offset);
  for (size_t i = 0; i < n; ++i) b.data[i] = T(scale * normal(rng) + shift);
  return b;
}

// fast against plain: every element finite and max |fast - plain| <= tol * max |plain|.
template <typename T>
void compare(const char* what, const Buffer<T>& fast, const Buffer<T>& plain, double tol) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < fast.n; ++i) {
    const double f = as_float(fast.data[i]), p = as_float(plain.data[i]);
    if (!std::isfinite(f) || !std::isfinite(p)) {
      std::printf("FAIL %s: element %zu is %g (fast) and %g (plain): unwritten or not finite\n", what, i, f, p);
      ++g_failures;
      return;
    }
    err = std::max(err, std::fabs(f - p));
    ref = std::max(ref, std::fabs(p));
  }
  const bool ok = err <= tol * std::max(ref, 1e-30);
  std::printf("%s %s: max |fast - plain| %.3g, max |plain| %.3g\n", ok ? "ok  " : "FAIL", what, err, ref);
  g_failures += !ok;
}

// Within a few roundings of the output type: both kernels round once, after fp32 sums in different orders.
template <typename T>
double tol() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, __nv_bfloat16> ? 1.0 / 64 : 1.0 / 512;
}

}  // namespace

#if defined(EMU_NORM_GELU)
namespace {

template <typename T>
constexpr int code() {
  return std::is_same_v<T, float> ? 0 : std::is_same_v<T, __nv_bfloat16> ? 1 : 2;
}

// LayerNorm forward and backward, variant 1 against 0: x (TX) + y (TY, if ADD), normalized into out (TO).
template <typename TX, typename TY, typename TO, bool ADD>
void layer_norm(const char* name, int64_t n, int c, size_t offset, uint32_t seed) {
  const size_t m = static_cast<size_t>(n) * c;
  const Buffer<TX> x = randn<TX>(m, 2.f, 1.f, seed, offset);
  const Buffer<TY> y = randn<TY>(m, 1.f, 0.f, seed + 1, offset);
  const Buffer<float> w = randn<float>(c, 0.1f, 1.f, seed + 2), b = randn<float>(c, 0.1f, 0.f, seed + 3);
  const Buffer<TO> dout = randn<TO>(m, 1.f, 0.f, seed + 4, offset);
  const Buffer<TX> dr = randn<TX>(m, 1.f, 0.f, seed + 5, offset);
  struct Result {
    Buffer<TX> r, dx;
    Buffer<TO> out;
    Buffer<TY> dy;
    Buffer<float> mean, rstd, dw, db;
  };
  auto run = [&](int variant) {
    Result res{Buffer<TX>(m, offset), Buffer<TX>(m, offset), Buffer<TO>(m, offset), Buffer<TY>(m, offset),
               Buffer<float>(n), Buffer<float>(n), Buffer<float>(c), Buffer<float>(c)};
    if (emu_layer_norm_fwd(code<TX>(), ADD ? code<TY>() : -1, code<TO>(), variant, x.data, ADD ? y.data : nullptr,
                           ADD ? res.r.data : nullptr, res.out.data, w.data, b.data, res.mean.data, res.rstd.data,
                           n, c, 1e-5f) != 0) {
      emu::fail("emu_layer_norm_fwd refused the dtypes");
    }
    const TX* src = ADD ? res.r.data : x.data;
    if (emu_layer_norm_bwd(code<TX>(), code<TO>(), ADD ? code<TY>() : -1, variant, dout.data, src, w.data,
                           res.mean.data, res.rstd.data, ADD ? dr.data : nullptr, res.dx.data,
                           ADD ? res.dy.data : nullptr, res.dw.data, res.db.data, n, c) != 0) {
      emu::fail("emu_layer_norm_bwd refused the dtypes");
    }
    return res;
  };
  const Result fast = run(1), plain = run(0);
  const std::string s = name;
  if (ADD) compare((s + " r").c_str(), fast.r, plain.r, tol<TX>());
  compare((s + " out").c_str(), fast.out, plain.out, tol<TO>());
  compare((s + " mean").c_str(), fast.mean, plain.mean, 1e-5);
  compare((s + " rstd").c_str(), fast.rstd, plain.rstd, 1e-5);
  compare((s + " dx").c_str(), fast.dx, plain.dx, tol<TX>());
  if (ADD) compare((s + " dy").c_str(), fast.dy, plain.dy, tol<TY>());
  compare((s + " dweight").c_str(), fast.dw, plain.dw, 1e-4);
  compare((s + " dbias").c_str(), fast.db, plain.db, 1e-4);
}

// GELU forward and backward (with bias: dbias too), variant 1 against 0; c = 0: no bias.
template <typename T>
void gelu(const char* name, int64_t n, int64_t c, size_t offset, uint32_t seed) {
  const Buffer<T> x = randn<T>(n, 3.f, 0.f, seed, offset), dout = randn<T>(n, 1.f, 0.f, seed + 1, offset);
  const Buffer<float> bias = randn<float>(c, 0.5f, 0.f, seed + 2);
  auto run = [&](int variant, bool backward, Buffer<float>& dbias) {
    Buffer<T> out(n, offset);
    if (emu_gelu(code<T>(), variant, backward ? dout.data : nullptr, x.data, c ? bias.data : nullptr, out.data,
                 backward && c ? dbias.data : nullptr, n, c) != 0) {
      emu::fail("emu_gelu refused the dtype");
    }
    return out;
  };
  Buffer<float> dbias_fast(c), dbias_plain(c), unused(0);
  const std::string s = name;
  compare((s + " out").c_str(), run(1, false, unused), run(0, false, unused), tol<T>());
  compare((s + " dx").c_str(), run(1, true, dbias_fast), run(0, true, dbias_plain), tol<T>());
  if (c) compare((s + " dbias").c_str(), dbias_fast, dbias_plain, 1e-4);
}

void run_all() {
  // 8 SMs x 5 blocks: 40 blocks in the backward's wave, so 40 partial rows for sum_partials_kernel (32 rows of
  // threads), and every block visits 2 or 3 row groups of 16 rows
  emu_set_shape(8, 2048, 5);
  layer_norm<float, __nv_bfloat16, __nv_bfloat16, true>("layer_norm 1285x64 f32+bf16->bf16", 1285, 64, 0, 1);
  // rows of 200 vectors over 7 warps, 3 SMs x 2 blocks: 10 rows per block
  emu_set_shape(3, 2048, 2);
  layer_norm<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, false>("layer_norm 61x1600 bf16", 61, 1600, 0, 2);
  // x, out, dout and dx 4 bytes past a 16-byte boundary: the plain kernels, whatever the variant
  layer_norm<float, float, float, true>("layer_norm 33x256 f32 misaligned", 33, 256, 1, 3);
  // 40 SMs x 1 block: GELU's bias kernel has 40 row groups (40 dbias partials), each 2 or 3 turns of 8 rows
  emu_set_shape(40, 256, 1);
  gelu<__nv_bfloat16>("gelu+bias 700x200 bf16", 700 * 200, 200, 0, 4);
  // 4 SMs: the flat kernel's 4 blocks and the plain kernel's 128 take several turns over 40007 elements
  emu_set_shape(4, 256, 1);
  gelu<__nv_bfloat16>("gelu 40007 bf16", 40007, 0, 0, 5);
  gelu<float>("gelu+bias 20x1000 f32 misaligned", 20 * 1000, 1000, 1, 6);
  gelu<__half>("gelu 4001 f16 misaligned", 4001, 0, 3, 7);
}

}  // namespace

#elif defined(EMU_CROSS_ENTROPY)
namespace {

template <typename T>
void cross_entropy(const char* name, int64_t n, int V, size_t offset, uint32_t seed) {
  const Buffer<T> logits = randn<T>(static_cast<size_t>(n) * V, 2.f, 0.f, seed, offset);
  Buffer<int64_t> targets(n);
  for (int64_t r = 0; r < n; ++r) targets.data[r] = r == 1 ? -1 : (r * 7919 + seed) % V;
  const int dtype = std::is_same_v<T, float> ? 0 : std::is_same_v<T, __nv_bfloat16> ? 1 : 2;
  // the binding's rule for 128-bit vectors
  const bool vec = V % (16 / sizeof(T)) == 0 && offset * sizeof(T) % 16 == 0;
  auto run = [&](int variant, bool row_fits, Buffer<float>& losses) {
    Buffer<T> dlogits(static_cast<size_t>(n) * V, offset);
    if (emu_cross_entropy(dtype, variant, vec, row_fits, logits.data, targets.data, losses.data, dlogits.data, n,
                          V, 0.25f) != 0) {
      emu::fail("emu_cross_entropy refused the dtype");
    }
    return dlogits;
  };
  Buffer<float> plain_losses(n);
  const Buffer<T> plain = run(0, true, plain_losses);
  const std::pair<int, bool> paths[] = {{1, true}, {1, false}, {2, true}};
  for (const auto& [variant, fits] : paths) {
    Buffer<float> losses(n);
    const Buffer<T> fast = run(variant, fits, losses);
    const std::string s = std::string(name) + " v" + std::to_string(variant) + (fits ? "" : " (row re-read)");
    compare((s + " losses").c_str(), losses, plain_losses, 1e-5);
    compare((s + " dlogits").c_str(), fast, plain, tol<T>());
  }
}

void run_all() {
  cross_entropy<__nv_bfloat16>("cross_entropy 3x50304 bf16", 3, 50304, 0, 1);
  cross_entropy<float>("cross_entropy 4x1003 f32 misaligned", 4, 1003, 1, 2);
}

}  // namespace

#elif defined(EMU_ATTENTION)
namespace {

// qkv (B, T, 3, H, D) packed, starting 16 bytes past its allocation (the kernels need 16-byte aligned rows).
template <typename E>
void attention(const char* name, int B, int T, int H, int D, int max_smem, uint32_t seed) {
  const size_t n = static_cast<size_t>(B) * T * 3 * H * D, rows = static_cast<size_t>(B) * T * H;
  const Buffer<E> qkv = randn<E>(n, 1.f, 0.f, seed, 8), dout = randn<E>(rows * D, 1.f, 0.f, seed + 1);
  const int dtype = std::is_same_v<E, __nv_bfloat16> ? 0 : 1;
  const int64_t st = 3 * H * D;
  struct Result {
    Buffer<E> out;
    Buffer<float> lse;
    Buffer<E> dqkv;
  };
  auto run = [&](int variant) {
    Result r{Buffer<E>(rows * D), Buffer<float>(rows), Buffer<E>(n)};
    emu_attention_fwd(dtype, variant, qkv.data, n * sizeof(E), T * st, st, H * D, D, B, T, H, D, r.out.data,
                      r.lse.data);
    emu_attention_bwd(dtype, variant, qkv.data, n * sizeof(E), T * st, st, H * D, D, B, T, H, D, r.out.data,
                      dout.data, r.lse.data, r.dqkv.data, max_smem);
    return r;
  };
  const Result fast = run(1), plain = run(0);
  const std::string s = name;
  compare((s + " out").c_str(), fast.out, plain.out, tol<E>());
  compare((s + " lse").c_str(), fast.lse, plain.lse, 1e-5);
  compare((s + " dqkv").c_str(), fast.dqkv, plain.dqkv, 4 * tol<E>());  // P and dS rounded to 16 bits
}

void run_all() {
  // 5 key tiles per query tile in the forward, 4 to 10 query tiles per key tile in the backward, 3 key tiles of
  // each (b, h) adding into the same dQ rows; the backward's tiles for an H100 and for an sm_86
  attention<__nv_bfloat16>("attention B1 T300 H2 D64 bf16 H100", 1, 300, 2, 64, 227 * 1024, 1);
  attention<__half>("attention B1 T150 H1 D128 f16 sm86", 1, 150, 1, 128, 99 * 1024, 2);
}

}  // namespace
#endif

int main(int argc, char** argv) {
  if (argc > 1) emu_set_seed(static_cast<unsigned>(std::atoi(argv[1])));
  run_all();
  std::printf("%d mismatches\n", g_failures);
  return g_failures ? 1 : 0;
}
