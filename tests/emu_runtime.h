// The CUDA execution model on the CPU, shared by the kernel emulators in tests/ (attention_emu.cpp,
// norm_gelu_emu.cpp, cross_entropy_emu.cpp). Each emulator includes this header (which defines ARCANA_EMULATE),
// adds what its kernels need beyond it, includes its csrc/ files and exports entry points that the Python tests
// call through ctypes; tests/kernel_testing.py builds them with g++ -std=c++20, and tests/test_emulation.py also
// under ThreadSanitizer and AddressSanitizer.
//
// Every CUDA thread is a fiber (ucontext) with its own stack, all of them on the caller's OS thread: a fiber runs
// until it reaches a barrier, which makes the emulation fast and a deadlock exact. __syncthreads is a barrier
// over the block; a warp collective (__shfl_xor_sync, __syncwarp, and those an emulator adds with
// arrive/depart) is a barrier over the 32 threads of a warp, which exchange their operands through the warp's
// slots. A barrier that some threads never reach fails with a message, and so do lanes of one warp that meet
// in different collectives. The fibers that a barrier releases, and the blocks of a grid, run in an order
// shuffled by the seed (emu_set_seed), as a GPU promises no order either.
//
// Each build emulates one architecture, ARCANA_ARCH (800, 860, 890 or 900; by default 900, the H100): the device
// code's branches for it (csrc/common.cuh) and the limits of its SMs.
//
// What a GPU does and plain C++ would hide:
// - Shared memory starts as garbage: the dynamic shared memory (16-byte aligned, sized exactly, with an 8-byte
//   guard after it whose change is reported) and every static __shared__ variable are filled with all-ones bytes
//   (NaN in fp32, bf16 and fp16) at the start of each block; each block has its own.
// - Blocks of a grid are unordered: under ThreadSanitizer (-fsanitize=thread) every fiber is a thread of its
//   own to the sanitizer, and only barriers, the end of a grid and atomics on the same address (relaxed, as on
//   a GPU: they order nothing else) order accesses, so two blocks writing the same address with plain stores, or
//   one writing what another reads, is a reported race, as is a missing __syncthreads within a block.
// - A launch fails where its block has more threads than the kernel's __launch_bounds__ (launch_bounds below).
// - Approximate intrinsics (__expf, __fdividef, rsqrtf, ex2.approx.ftz through ex2_approx_ftz) return the exact
//   result moved by a pseudo-random amount within their documented error bound, the same for the same input
//   and seed, with their flush-to-zero and special cases.
// An emulator's per-thread state (such as its pending cp.async copies) must live in emu::per_thread<T>(): the
// fibers of one OS thread share its thread_local variables.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

// The architecture that the device code is built for (csrc/common.cuh): set by each emulator build.
#ifndef ARCANA_ARCH
#define ARCANA_ARCH 900
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_java_init(unsigned long heap_begin, unsigned long heap_size);
extern "C" void __tsan_java_alloc(unsigned long ptr, unsigned long size);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// The runtime's own code, which ThreadSanitizer does not instrument: its bookkeeping (barriers, the scheduler,
// each thread's indices) is not kernel memory, and a switch between fibers must not be recorded as a function
// entered in one sanitizer thread and left in another. It calls no instrumented code (plain arrays, no std
// containers), which would record the bookkeeping after all.
#define EMU_RUNTIME __attribute__((no_sanitize("thread")))

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "kernel emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

inline uint32_t g_seed = 1;  // emu_set_seed: the schedule and the errors of the approximate intrinsics

// -----------------------------------------------------------------------------
// the architecture

// What an SM of the emulated architecture holds (CUDA C++ Programming Guide, technical specifications per compute
// capability): resident threads, and shared memory per block (with the opt-in) and per SM.
struct Arch {
  int threads_per_sm, smem_per_block_optin, smem_per_sm;
};
constexpr Arch kArch = ARCANA_ARCH == 900   ? Arch{2048, 227 * 1024, 228 * 1024}
                       : ARCANA_ARCH == 800 ? Arch{2048, 163 * 1024, 164 * 1024}
                       : ARCANA_ARCH == 860 || ARCANA_ARCH == 890 ? Arch{1536, 99 * 1024, 100 * 1024}
                                                                  : Arch{};
static_assert(kArch.threads_per_sm > 0, "ARCANA_ARCH must be 800, 860, 890 or 900");

constexpr size_t kPage = 4096;

using Ranges = std::vector<std::pair<unsigned char*, unsigned char*>>;  // [first, last) byte ranges
constexpr size_t kStackBytes = 256 * 1024;

// A thread's stack, with a guard page below it: an overflow faults instead of corrupting the next stack.
inline unsigned char* new_stack() {
  void* s = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s == MAP_FAILED) fail("no memory for a thread's stack");
  mprotect(s, kPage, PROT_NONE);
  return static_cast<unsigned char*>(s) + kPage;
}

// -----------------------------------------------------------------------------
// what ThreadSanitizer is told (nothing in other builds)

namespace race {
#if defined(__SANITIZE_THREAD__)
inline void release(void* sync) { __tsan_release(sync); }
inline void acquire(void* sync) { __tsan_acquire(sync); }
inline void* this_fiber() { return __tsan_get_current_fiber(); }
EMU_RUNTIME inline void switch_to(void* f) {
  __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync);
}
// The static shared variables (vars, within pages) that the next block starts afresh: their earlier accesses are
// no race. Only the sanitizer's Java interface resets memory (AnnotateNewMemory does nothing); its heap is made
// the pages of these variables (its reports search the heap below an address), and it takes 8-byte granules.
inline void forget(const Ranges& vars, const Ranges& pages) {
  if (pages.empty()) return;
  static const bool init =
      (__tsan_java_init(reinterpret_cast<uintptr_t>(pages.front().first), pages.back().second - pages.front().first),
       true);
  (void)init;
  for (const auto& [lo, hi] : vars) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(lo) & ~uintptr_t(7);
    const uintptr_t b = (reinterpret_cast<uintptr_t>(hi) + 7) & ~uintptr_t(7);
    __tsan_java_alloc(a, b - a);
  }
}
// A sanitizer thread with its own stack for each CUDA thread of a grid, up to kThreads; beyond, blocks reuse them
// in turn, and a block is then ordered after the earlier blocks whose threads it reuses. They are created once
// (each costs milliseconds) and reused by later grids, which are ordered after the earlier ones anyway.
constexpr size_t kThreads = 2048;
inline void* new_fiber() { return __tsan_create_fiber(0); }
#else
inline void release(void*) {}
inline void acquire(void*) {}
inline void* this_fiber() { return nullptr; }
inline void switch_to(void*) {}
inline void forget(const Ranges&, const Ranges&) {}
// Stacks only, one per thread of a block.
constexpr size_t kThreads = 1024;
inline void* new_fiber() { return nullptr; }
#endif
struct Thread {
  void* tsan;  // the sanitizer's fiber (none without ThreadSanitizer)
  unsigned char* stack;
};
inline Thread thread(size_t i) {
  static std::vector<Thread> pool;
  while (pool.size() <= i) pool.push_back({new_fiber(), new_stack()});
  return pool[i];
}
}  // namespace race

// -----------------------------------------------------------------------------
// fibers and barriers

class Barrier;

// The warp collectives of this header; an emulator numbers its own from kFirstEmulatorCollective.
enum Collective : int { kShfl = 1, kSyncwarp, kFirstEmulatorCollective };

struct Warp;

struct ThreadState {
  Barrier* block_bar;
  Warp* warp;
  int lane;
  unsigned char* smem;  // the block's dynamic shared memory, smem_bytes long
  size_t smem_bytes;
};
inline thread_local ThreadState tl;

// A fiber's saved registers. On x86-64 a switch is a dozen instructions (emu_switch_stack below); elsewhere
// swapcontext, which also saves the signal mask with a system call.
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* sp);
asm(R"(
  .text
  .p2align 4
  .hidden emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");
struct Context {
  void* sp = nullptr;
};
// A stack whose first switch "returns" into entry as if it had been called (rsp % 16 == 8 at its first
// instruction), with the caller's floating-point control words.
inline void start_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  void** p = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  *--p = nullptr;  // entry's return address: it never returns
  *--p = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--p = nullptr;  // rbp, rbx, r12-r15
  uint32_t ctl[2] = {0, 0};
  asm("stmxcsr %0" : "=m"(ctl[0]));
  asm("fnstcw %0" : "=m"(ctl[1]));
  std::memcpy(--p, ctl, 8);
  c.sp = p;
}
EMU_RUNTIME inline void switch_context(Context& from, const Context& to) {
  emu_switch_stack(&from.sp, to.sp);
}
#else
struct Context {
  ucontext_t uc;
};
inline void start_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
EMU_RUNTIME inline void switch_context(Context& from, const Context& to) {
  swapcontext(&from.uc, &to.uc);
}
#endif

// A value of an emulator's per-thread state (per_thread below).
struct Local {
  const void* type;  // a tag of the type
  void* value;
  void (*destroy)(void*);
};

struct Fiber {
  Context ctx;
  race::Thread thread;
  void* asan_fake_stack = nullptr;
  uint3 tid;
  ThreadState state;
  Local locals[4];
  int n_locals;
  bool done;
};

constexpr int kMaxThreads = 1024;

struct Scheduler {
  Context main;
  void* main_tsan = nullptr;
  const void* main_stack = nullptr;  // the caller's stack, for AddressSanitizer's fiber switches
  size_t main_stack_bytes = 0;
  Fiber* current = nullptr;
  Fiber* ready[kMaxThreads];  // the threads that can run, a ring from ready[head]
  int head = 0, n_ready = 0;
  uint64_t rng;               // the order in which released threads run
  std::function<void()> body;  // the kernel of the grid being run
  char grid_start;             // the caller releases it before each block; the block's threads acquire it
  char grid_done;              // every thread of a grid releases it at exit; the caller acquires it
};
inline Scheduler sched;

EMU_RUNTIME inline uint64_t next_random() {
  sched.rng ^= sched.rng << 13;
  sched.rng ^= sched.rng >> 7;
  sched.rng ^= sched.rng << 17;
  return sched.rng;
}

// Makes threads runnable in a random order (the order of a warp's or a block's threads is the GPU's business).
EMU_RUNTIME inline void make_ready(Fiber** fibers, int n) {
  for (int i = n - 1; i > 0; --i) {
    const int j = static_cast<int>(next_random() % (i + 1));
    Fiber* t = fibers[i];
    fibers[i] = fibers[j];
    fibers[j] = t;
  }
  for (int i = 0; i < n; ++i) sched.ready[(sched.head + sched.n_ready++) % kMaxThreads] = fibers[i];
}

// An emulator's per-thread state (its thread_local, as the fibers of one OS thread share those): the running
// CUDA thread's own T, created on first use and destroyed when the thread ends; outside kernels, one more.
template <typename T>
EMU_RUNTIME T& per_thread() {
  static const char type = 0;
  static T host;
  Fiber* f = sched.current;
  if (f == nullptr) return host;
  for (int i = 0; i < f->n_locals; ++i) {
    if (f->locals[i].type == &type) return *static_cast<T*>(f->locals[i].value);
  }
  if (f->n_locals == 4) fail("more than 4 per_thread types");
  f->locals[f->n_locals++] = Local{&type, new T(), [](void* v) { delete static_cast<T*>(v); }};
  return *static_cast<T*>(f->locals[f->n_locals - 1].value);
}

// Called by a fiber: back to the scheduler, and on from there when it is resumed.
EMU_RUNTIME inline void switch_out(Fiber* f, bool exiting) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake_stack, sched.main_stack, sched.main_stack_bytes);
#endif
  race::switch_to(sched.main_tsan);
  switch_context(f->ctx, sched.main);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &sched.main_stack, &sched.main_stack_bytes);
#endif
  (void)exiting;
}

// A reusable barrier for `count` threads; threads that exit leave it (as exited threads leave __syncthreads).
// Under ThreadSanitizer a barrier that orders memory (__syncthreads, __syncwarp) is released by each waiting
// thread and acquired by each once it opens; the other warp collectives order nothing, as on a GPU.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  EMU_RUNTIME void wait(bool orders_memory) {
    char* sync = &sync_[gen_ & 1];
    if (orders_memory) race::release(sync);
    waiters_[waiting_++] = sched.current;
    if (waiting_ == count_) release();
    switch_out(sched.current, false);
    if (orders_memory) race::acquire(sync);
  }
  EMU_RUNTIME void leave() {
    --count_;
    if (waiting_ > 0 && waiting_ == count_) release();
  }
  bool has_waiters() const { return waiting_ > 0; }

 private:
  EMU_RUNTIME void release() {
    make_ready(waiters_, waiting_);
    waiting_ = 0;
    ++gen_;
  }
  int count_, waiting_ = 0;
  uint64_t gen_ = 0;
  Fiber* waiters_[kMaxThreads];
  char sync_[2];  // the sync objects of alternate generations (a thread can be one generation ahead)
};

struct Warp {
  Barrier bar{32};
  int kind[32];          // the collective each lane is in
  uint64_t slot[32][8];  // each lane's operands
};

// Publish this lane's n operands, wait for the warp, check that every lane is in the same collective. The
// lanes' operands stay readable in tl.warp->slot until depart() (the emulators' reads race with nothing, as the
// runtime's writes are not recorded).
EMU_RUNTIME inline void arrive(int kind, const uint64_t* vals, int n) {
  Warp& w = *tl.warp;
  w.kind[tl.lane] = kind;
  for (int i = 0; i < n; ++i) w.slot[tl.lane][i] = vals[i];
  w.bar.wait(false);
  for (int l = 0; l < 32; ++l) {
    if (w.kind[l] != kind) fail("lanes of one warp are in different collectives");
  }
}
EMU_RUNTIME inline void depart() { tl.warp->bar.wait(false); }

EMU_RUNTIME inline void fiber_main() {
  Fiber* f = sched.current;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &sched.main_stack, &sched.main_stack_bytes);
#endif
  race::acquire(&sched.grid_start);
  sched.body();
  for (int i = 0; i < f->n_locals; ++i) f->locals[i].destroy(f->locals[i].value);  // by the thread that used them
  race::release(&sched.grid_done);
  tl.warp->bar.leave();
  tl.block_bar->leave();
  f->done = true;
  switch_out(f, true);
  fail("a finished thread was resumed");
}

// Runs fiber f until it blocks or ends.
EMU_RUNTIME inline void resume(Fiber* f) {
  threadIdx = f->tid;
  tl = f->state;
  sched.current = f;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->thread.stack, kStackBytes);
#endif
  race::switch_to(f->thread.tsan);
  switch_context(sched.main, f->ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// -----------------------------------------------------------------------------
// shared memory

// The static __shared__ variables of this binary: the function-local statics of namespaces arcana and
// arcana_attention, found once in its symbol table. The kernels have no other, nor has the host code of csrc/,
// which tests/emu_ops.cpp compiles too.
inline Ranges find_static_shared() {
  struct Self {
    uintptr_t probe;
    std::string path;
    uintptr_t base = 0;
    bool found = false;
  } self{reinterpret_cast<uintptr_t>(&find_static_shared)};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        Self& s = *static_cast<Self*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && s.probe >= lo && s.probe < lo + ph.p_memsz) {
            s.path = info->dlpi_name && *info->dlpi_name ? info->dlpi_name : "/proc/self/exe";
            s.base = info->dlpi_addr;
            s.found = true;
            return 1;
          }
        }
        return 0;
      },
      &self);
  std::ifstream file(self.path, std::ios::binary);
  const std::string elf((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (!self.found || elf.size() < sizeof(Elf64_Ehdr)) fail("cannot read this binary's symbol table");
  const auto& eh = *reinterpret_cast<const Elf64_Ehdr*>(elf.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh.e_shoff);
  Ranges vars;
  for (int i = 0; i < eh.e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(elf.data() + sh[i].sh_offset);
    const char* names = elf.data() + sh[sh[i].sh_link].sh_offset;
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const char* name = names + sym[k].st_name;
      if (ELF64_ST_TYPE(sym[k].st_info) == STT_OBJECT && sym[k].st_size > 0 &&
          (std::strncmp(name, "_ZZN6arcana", 11) == 0 || std::strncmp(name, "_ZZN16arcana_attention", 22) == 0)) {
        auto* p = reinterpret_cast<unsigned char*>(self.base + sym[k].st_value);
        vars.emplace_back(p, p + sym[k].st_size);
      }
    }
  }
  return vars;
}

// The same as whole pages, merged.
inline Ranges pages_of(Ranges vars) {
  std::sort(vars.begin(), vars.end());
  Ranges pages;
  for (const auto& [lo, hi] : vars) {
    auto* plo = reinterpret_cast<unsigned char*>(reinterpret_cast<uintptr_t>(lo) & ~(kPage - 1));
    auto* phi = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(hi) + kPage - 1) & ~(kPage - 1));
    if (!pages.empty() && plo <= pages.back().second) pages.back().second = std::max(pages.back().second, phi);
    else pages.emplace_back(plo, phi);
  }
  return pages;
}

constexpr size_t kGuardBytes = 8;
constexpr unsigned char kGuard = 0xA5;

// A block's shared memory starts as all-ones bytes (NaN in every float type), the garbage of a real launch: its
// static __shared__ variables, and smem_bytes of dynamic shared memory, 16-byte aligned, followed by a guard.
inline void fresh_shared_memory(unsigned char* smem, size_t smem_bytes) {
  static const Ranges vars = find_static_shared(), pages = pages_of(vars);
  race::forget(vars, pages);
  for (const auto& [lo, hi] : vars) std::memset(lo, 0xFF, hi - lo);
  std::memset(smem, 0xFF, smem_bytes);
  std::memset(smem + smem_bytes, kGuard, kGuardBytes);
}

// -----------------------------------------------------------------------------
// grids

// One block's barriers, warps and dynamic shared memory (under ThreadSanitizer all kept until the grid ends: a
// later block reusing their addresses would inherit their sync objects and accesses, which orders blocks).
struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), warps(threads / 32), smem_store(smem_bytes + 16 + kGuardBytes) {
    smem = smem_store.data() + (16 - reinterpret_cast<uintptr_t>(smem_store.data()) % 16) % 16;
  }
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem_store;
  unsigned char* smem;
};

// The block's indices, as the scheduler sets them (see EMU_RUNTIME).
EMU_RUNTIME inline void enter_block(dim3 b, dim3 block, dim3 grid) {
  blockIdx = make_uint3(b.x, b.y, b.z);
  blockDim = block;
  gridDim = grid;
}

// Runs body() on every thread of every block of the grid, with smem_bytes of dynamic shared memory per block.
template <typename Body>
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const Body& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n == 0 || n % 32 || block.x % 32 || n > kMaxThreads) {
    fail("block shape: blockDim.x and the block must be multiples of 32, at most 1024 threads");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  if (sched.current != nullptr) fail("a launch from inside a kernel");
  sched.main_tsan = race::this_fiber();
  sched.body = [&body] { body(); };
  sched.rng = 0x9E3779B97F4A7C15ull ^ g_seed;
  std::vector<dim3> order;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) order.push_back(dim3(bx, by, bz));
    }
  }
  for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
  const size_t turns = std::max<size_t>(1, std::min(order.size(), race::kThreads / n));
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<Fiber> fibers(n);
  std::vector<Fiber*> start(n);
  for (size_t pos = 0; pos < order.size(); ++pos) {
#if !defined(__SANITIZE_THREAD__)
    blocks.clear();
#endif
    blocks.push_back(std::make_unique<Block>(n, smem_bytes));
    Block& blk = *blocks.back();
    fresh_shared_memory(blk.smem, smem_bytes);
    race::release(&sched.grid_start);  // the inputs and the fresh shared memory, but no earlier block
    enter_block(order[pos], block, grid);
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers[t];
      f.thread = race::thread(pos % turns * n + t);
      start_context(f.ctx, f.thread.stack, kStackBytes, fiber_main);
      f.tid = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      f.state = ThreadState{&blk.bar, &blk.warps[t / 32], t % 32, blk.smem, smem_bytes};
      f.n_locals = 0;
      f.done = false;
      start[t] = &f;
    }
    make_ready(start.data(), n);
    while (sched.n_ready > 0) {
      Fiber* f = sched.ready[sched.head];
      sched.head = (sched.head + 1) % kMaxThreads;
      --sched.n_ready;
      resume(f);
    }
    sched.current = nullptr;
    for (Fiber& f : fibers) {
      if (!f.done) {
        threadIdx = f.tid;
        fail(f.state.block_bar->has_waiters()
                 ? "deadlock: threads wait at a __syncthreads that others of the block never reach"
                 : "deadlock: lanes wait at a warp collective that others of the warp never reach");
      }
    }
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (blk.smem[smem_bytes + i] != kGuard) fail("a write past the end of the dynamic shared memory");
    }
  }
  race::acquire(&sched.grid_done);
}

// The running kernel's __launch_bounds__, checked as each of its threads starts: the emulators compile csrc/
// through a copy in which every kernel's body begins with emu::launch_bounds(ITS BOUNDS)
// (kernel_testing.emulator_sources), since g++ keeps no such attribute. A GPU refuses to launch a block of more
// threads than max_threads. And where min_blocks blocks of max_threads threads exceed an SM of the architecture,
// ptxas drops min_blocks with a warning, and the register cap it was asked for with it.
inline void launch_bounds(int max_threads, int min_blocks = 1) {
  const int threads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  char what[256];
  if (threads > max_threads) {
    std::snprintf(what, sizeof what,
                  "a block of %d threads, more than the kernel's __launch_bounds__ (%d): a GPU refuses the launch",
                  threads, max_threads);
    fail(what);
  }
  if (max_threads * min_blocks > kArch.threads_per_sm) {
    std::snprintf(what, sizeof what,
                  "__launch_bounds__(%d, %d) asks %d resident threads per SM, an sm_%d SM holds %d: ptxas drops "
                  "the minimum of blocks, and with it the register cap",
                  max_threads, min_blocks, max_threads * min_blocks, ARCANA_ARCH / 10, kArch.threads_per_sm);
    fail(what);
  }
}

// -----------------------------------------------------------------------------
// approximate intrinsics: the exact result moved by a pseudo-random error within the documented bound

inline uint32_t mix(uint32_t a, uint32_t b) {
  uint64_t h = (static_cast<uint64_t>(a) << 32 | b) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  return static_cast<uint32_t>(h >> 32);
}

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// exact (a finite float) moved by an integer number of ulps in [-max_ulps, max_ulps], chosen by key.
inline float move_ulps(float exact, uint32_t max_ulps, uint32_t key) {
  if (!std::isfinite(exact) || exact == 0.f || max_ulps == 0) return exact;
  const int64_t k = static_cast<int64_t>(mix(g_seed, key) % (2 * max_ulps + 1)) - max_ulps;
  const uint32_t u = bits_of(exact);
  const int64_t mag = std::clamp<int64_t>((u & 0x7fffffff) + k, 0, 0x7f7fffff);  // stays finite, sign kept
  const uint32_t out = (u & 0x80000000u) | static_cast<uint32_t>(mag);
  float r;
  std::memcpy(&r, &out, 4);
  return r;
}

// __expf: at most 2 + floor(|1.173 x|) ulps from e^x (CUDA Programming Guide, intrinsic functions); exact at 0,
// as it is ex2.approx of x log2(e) (below).
inline float expf_approx(float x) {
  const float exact = static_cast<float>(std::exp(static_cast<double>(x)));
  if (x == 0.f) return exact;
  return move_ulps(exact, 2 + static_cast<uint32_t>(std::floor(std::fabs(1.173 * x))), bits_of(x) ^ 0x1000193u);
}

// __fdividef: at most 2 ulps for 2^-126 <= |y| <= 2^126; 0 for finite x and NaN for infinite x beyond 2^126.
inline float fdividef_approx(float x, float y) {
  if (std::fabs(y) > 0x1p126f && std::fabs(y) < INFINITY) return std::isinf(x) ? NAN : 0.f * x;
  const float exact = static_cast<float>(static_cast<double>(x) / y);
  return move_ulps(exact, 2, mix(bits_of(x), bits_of(y)));
}

// rsqrtf: at most 2 ulps.
inline float rsqrtf_approx(float x) {
  const float exact = static_cast<float>(1.0 / std::sqrt(static_cast<double>(x)));
  return move_ulps(exact, 2, bits_of(x) ^ 0x2545F491u);
}

// ex2.approx.ftz.f32: relative error at most 2^-22 (PTX ISA); subnormal inputs count as 0, results below 2^-126
// are flushed to +0. Exact at integers: the hardware places the integer part in the exponent and approximates
// only 2 to the fraction (the kernels' exp2 of a difference of equal maxima is 1, not 1 + error).
inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const double exact = std::exp2(static_cast<double>(x));
  if (exact < 0x1p-126) return 0.f;
  if (!std::isfinite(exact) || x == std::nearbyint(x)) return static_cast<float>(exact);
  const double u = static_cast<double>(mix(g_seed, bits_of(x) ^ 0x68E31DA4u)) / 4294967295.0 * 2 - 1;
  const float r = static_cast<float>(exact * (1 + u * 0x1p-22));
  return r < 0x1p-126f ? 0.f : r;
}

}  // namespace emu

extern "C" void emu_set_seed(unsigned seed) { emu::g_seed = seed; }

// -----------------------------------------------------------------------------
// CUDA built-ins

inline void __syncthreads() { emu::tl.block_bar->wait(true); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask");
  emu::arrive(emu::kSyncwarp, nullptr, 0);
  emu::tl.warp->bar.wait(true);  // orders the lanes' memory accesses, as __syncwarp does
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int = 32) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, 4);
  emu::arrive(emu::kShfl, &bits, 1);
  float out;
  std::memcpy(&out, &emu::tl.warp->slot[emu::tl.lane ^ lane_mask][0], 4);
  emu::depart();
  return out;
}

// Relaxed, as a GPU's atomics: they order no other access (a block's atomics do not publish its plain stores).
inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}

#if ARCANA_ARCH >= 900
// sm_90's vector atomic (CUDA declares it for sm_90 only): each of the two floats is added atomically (not the
// pair as one access), at an address that must be 8-byte aligned.
inline float2 atomicAdd(float2* p, float2 v) {
  if (reinterpret_cast<uintptr_t>(p) % 8) emu::fail("a float2 atomicAdd at an address that is not 8-byte aligned");
  float* f = reinterpret_cast<float*>(p);
  return make_float2(atomicAdd(f, v.x), atomicAdd(f + 1, v.y));
}
#endif

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

#define rsqrtf emu::rsqrtf_approx
#define __expf emu::expf_approx
#define __fdividef emu::fdividef_approx

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define __trap() std::abort()

#define ARCANA_EMULATE 1
