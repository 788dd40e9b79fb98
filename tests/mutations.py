"""What the CPU checks of the kernels catch, measured: realistic GPU bugs, by class, planted one at
a time in a scratch copy of csrc/ and run against the emulated tests that cover the file
(ARCANA_CSRC points the emulator builds and the ptxas check at the copy; csrc/ itself is never
touched). A mutant is killed by the first test that fails on it; one that every stage passes
SURVIVED.

    python tests/mutations.py                          # every mutant: about an hour on two cores
    python tests/mutations.py --classes race,causal    # some classes
    python tests/mutations.py --list                   # the mutants, without running them
    python tests/mutations.py --json results.json      # also write the results

The stages, cheapest first (--all-stages runs every stage of every mutant, to see which ones
catch it):
  emulated  the family's ctypes emulator tests (test_kernels.py, test_cross_entropy.py or
            test_attention.py, -k emulated; test_attention.py's ThreadSanitizer run among them)
  hardened  test_emulation.py's AddressSanitizer and ThreadSanitizer builds of the family
  ptxas     test_emulation.py's register and spill check of the file's kernels
  model     test_emulated_model.py: the tiny GPT on the whole library through its bindings (not its
            planted-bug test, which builds a copy of csrc/ of its own)
Not collected by pytest (its name does not start with test_), and not part of CI.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@dataclasses.dataclass
class Mutant:
    cls: str  # the class of bug
    file: str  # in csrc/
    what: str  # the change, in words
    old: str  # text that occurs once in the file
    new: str  # what replaces it

    def line(self, source):
        return source[: source.index(self.old)].count("\n") + 1


CLASSES = {
    "race": "a missing barrier (or wait)",
    "tile": "a wrong tile index",
    "rescale": "a missing online-softmax rescale",
    "atomic": "a non-atomic accumulation",
    "misaligned": "a misaligned vector access",
    "grid": "grid-stride bounds",
    "causal": "the causal diagonal",
    "bounds": "a launch against the kernel's declared resources",
    "arch": "an architecture-specific branch",
    "ptx": "inline PTX, which the emulators replace (out of a CPU's sight)",
}

M = Mutant
MUTANTS = [
    # -- races: each barrier of a kernel whose threads share memory, and a cp.async wait
    M(
        "race",
        "layernorm.cu",
        "ln_fwd_kernel: no barrier after weight and bias are copied to shared memory",
        "reinterpret_cast<const float4*>(b) + i);\n  }\n  __syncthreads();",
        "reinterpret_cast<const float4*>(b) + i);\n  }",
    ),
    M(
        "race",
        "common.cuh",
        "row_sum: no barrier between the warps' partial sums and their total",
        "mine[threadIdx.x >> 5] = v;\n  __syncthreads();\n  float s = 0.f;",
        "mine[threadIdx.x >> 5] = v;\n  float s = 0.f;",
    ),
    M(
        "race",
        "layernorm.cu",
        "ln_bwd_kernel: no barrier between the row groups' turns at the dweight/dbias combine",
        "      }\n    }\n    __syncthreads();\n  }\n  for (int c = threadIdx.y",
        "      }\n    }\n  }\n  for (int c = threadIdx.y",
    ),
    M(
        "race",
        "gelu.cu",
        "gelu_bias_kernel: no barrier before the dbias tile is summed",
        "tile[threadIdx.y][threadIdx.x * V + k] = acc[k];\n    __syncthreads();",
        "tile[threadIdx.y][threadIdx.x * V + k] = acc[k];",
    ),
    M(
        "race",
        "common.cuh",
        "sum_partials_kernel: no barrier before the column tile is summed",
        "tile[threadIdx.y][threadIdx.x] = s;\n  __syncthreads();",
        "tile[threadIdx.y][threadIdx.x] = s;",
    ),
    M(
        "race",
        "cross_entropy.cu",
        "ce_fast_kernel: no barrier between the warps' (max, sum) and their combine",
        "if (lane == 0) warp_parts[warp] = acc;\n  __syncthreads();",
        "if (lane == 0) warp_parts[warp] = acc;",
    ),
    M(
        "race",
        "cross_entropy.cu",
        "ce_fast_kernel: no barrier before the row total is read",
        "if (lane == 0) row_total = part;\n  }\n  __syncthreads();",
        "if (lane == 0) row_total = part;\n  }",
    ),
    M(
        "race",
        "attention.cu",
        "attention_fwd_kernel: no barrier at the top of the key-tile loop",
        "cp_async_wait_all();\n    __syncthreads();  // tile j visible",
        "cp_async_wait_all();  // tile j visible",
    ),
    M(
        "race",
        "attention.cu",
        "attention_bwd_kernel: no barrier at the top of the query-tile loop",
        "    __syncthreads();\n    const int st = (i - i_first) & 1;",
        "    const int st = (i - i_first) & 1;",
    ),
    M(
        "race",
        "attention.cu",
        "attention_bwd_kernel: no barrier before the last tile's dQ",
        "  __syncthreads();  // dS^T of the last tile complete\n",
        "",
    ),
    M(
        "race",
        "attention.cu",
        "attention_fwd_kernel: no __syncwarp between the output's staging and its 16-byte stores",
        "  __syncwarp();\n  constexpr int kChunks = D / 8;\n#pragma unroll\n"
        "  for (int it = 0; it < WR * kChunks",
        "  constexpr int kChunks = D / 8;\n#pragma unroll\n  for (int it = 0; it < WR * kChunks",
    ),
    M(
        "race",
        "attention.cu",
        "attention_fwd_kernel: no cp.async wait before the key tile is read",
        "    cp_async_wait_all();\n    __syncthreads();  // tile j visible",
        "    __syncthreads();  // tile j visible",
    ),
    # -- tile indices
    M(
        "tile",
        "attention.cu",
        "attention_fwd_kernel: K read from the other double-buffer stage",
        "const T* tK = sK + (j & 1) * BC * LD;",
        "const T* tK = sK + ((j + 1) & 1) * BC * LD;",
    ),
    M(
        "tile",
        "attention.cu",
        "attention_fwd_kernel: both m-tiles of a warp take the first one's Q",
        "ldsm_a(qa[r], sQ, LD, warp * WR + 16 * r, kk * 16, lane);",
        "ldsm_a(qa[r], sQ, LD, warp * WR, kk * 16, lane);",
    ),
    M(
        "tile",
        "attention.cu",
        "attention_bwd_kernel: dO^T's query chunk without the chunk base cb",
        "ldsm_b_nk(bo, tdO, LD, kk * 16, (cb + np) * 16, lane);",
        "ldsm_b_nk(bo, tdO, LD, kk * 16, np * 16, lane);",
    ),
    M(
        "tile",
        "attention.cu",
        "attention_bwd_kernel: dQ added without the warp's column offset c0",
        "float* dst = gdq + q * od + c0 + n * 8 + frag_col(lane, 0);",
        "float* dst = gdq + q * od + n * 8 + frag_col(lane, 0);",
    ),
    M(
        "tile",
        "layernorm.cu",
        "ln_bwd_kernel: per-block partial rows C apart instead of 2 C "
        "(dweight of one is dbias of the last)",
        "float* part_w = part + (int64_t)blockIdx.x * 2 * C;",
        "float* part_w = part + (int64_t)blockIdx.x * C;",
    ),
    M(
        "tile",
        "gelu.cu",
        "gelu_bias_kernel: the column tile's first column counted in vectors, not columns",
        "const int c0 = blockIdx.x * 32 * V;  // first column of this tile",
        "const int c0 = blockIdx.x * 32;  // first column of this tile",
    ),
    M(
        "tile",
        "common.cuh",
        "sum_partials_kernel: the partial tile stored transposed",
        "tile[threadIdx.y][threadIdx.x] = s;",
        "tile[threadIdx.x][threadIdx.y] = s;",
    ),
    M(
        "tile",
        "cross_entropy.cu",
        "ce_fast_kernel: the target's place in a vector taken from the loop index, "
        "not the vector's",
        "const int k = target - jj * N;",
        "const int k = target - j * N;",
    ),
    # -- online softmax
    M(
        "rescale",
        "attention.cu",
        "attention_fwd_kernel: O not rescaled when the row max grows",
        "          o[r][nd][2 * hr] *= alpha;\n          o[r][nd][2 * hr + 1] *= alpha;\n",
        "",
    ),
    M(
        "rescale",
        "attention.cu",
        "attention_fwd_kernel: the row sum l not rescaled when the row max grows",
        "l[r][hr] = l[r][hr] * alpha + sum;",
        "l[r][hr] = l[r][hr] + sum;",
    ),
    M(
        "rescale",
        "attention.cu",
        "attention_fwd_kernel: the running max never updated",
        "        m[r][hr] = mx;\n",
        "",
    ),
    M(
        "rescale",
        "attention.cu",
        "attention_fwd_plain_kernel: acc not rescaled when the max grows",
        "acc[e] = acc[e] * alpha + pj * Elem<T>::to_float(vr[e]);",
        "acc[e] = acc[e] + pj * Elem<T>::to_float(vr[e]);",
    ),
    M(
        "rescale",
        "cross_entropy.cu",
        "accumulate: the running sum not rescaled when a vector raises the max",
        "    acc.s *= fast_exp2(acc.m - vm);\n",
        "",
    ),
    M(
        "rescale",
        "cross_entropy.cu",
        "combine: the first pair's sum not rescaled to the common max",
        "return {m, a.s * fast_exp2(a.m - m) + b.s * fast_exp2(b.m - m)};",
        "return {m, a.s + b.s * fast_exp2(b.m - m)};",
    ),
    # -- non-atomic accumulation: dQ, the one sum that blocks share
    M(
        "atomic",
        "attention.cu",
        "attention_bwd_kernel, before sm_90: dQ added with plain loads and stores",
        "            atomicAdd(dst, dq[r][n][2 * hr]);\n"
        "            atomicAdd(dst + 1, dq[r][n][2 * hr + 1]);",
        "            dst[0] += dq[r][n][2 * hr];\n            dst[1] += dq[r][n][2 * hr + 1];",
    ),
    M(
        "atomic",
        "attention.cu",
        "attention_bwd_kernel, before sm_90: dQ's odd columns added with plain loads and stores",
        "            atomicAdd(dst + 1, dq[r][n][2 * hr + 1]);",
        "            dst[1] += dq[r][n][2 * hr + 1];",
    ),
    M(
        "atomic",
        "attention.cu",
        "attention_bwd_kernel, sm_90: dQ added with plain loads and stores "
        "instead of float2 atomics",
        "atomicAdd(reinterpret_cast<float2*>(dst), "
        "make_float2(dq[r][n][2 * hr], dq[r][n][2 * hr + 1]));",
        "dst[0] += dq[r][n][2 * hr];\n            dst[1] += dq[r][n][2 * hr + 1];",
    ),
    # -- misaligned vector access: each alignment condition of a fast path
    M(
        "misaligned",
        "layernorm.cu",
        "ln_forward_launch: the fast path without out's alignment check",
        "aligned16(f.x) && aligned16(f.out) &&",
        "aligned16(f.x) &&",
    ),
    M(
        "misaligned",
        "layernorm.cu",
        "ln_backward_launch: the fast path without dy's alignment check",
        "(a.dy == nullptr || aligned16(a.dy)) && ",
        "",
    ),
    M(
        "misaligned",
        "gelu.cu",
        "gelu_launch: the fast path without dout's alignment check",
        "aligned16(g.out) && (!bwd || aligned16(g.dout)) &&",
        "aligned16(g.out) &&",
    ),
    M(
        "misaligned",
        "gelu.cu",
        "gelu_launch: the fast path without the bias's alignment check",
        "(!has_bias || (aligned16(g.bias) && g.c % V == 0))",
        "(!has_bias || g.c % V == 0)",
    ),
    M(
        "misaligned",
        "cross_entropy.cu",
        "cross_entropy_fwd_bwd: 128-bit rows without the logits' alignment check",
        "V % vec == 0 && aligned16(logits.data_ptr()) && ",
        "V % vec == 0 && ",
    ),
    M(
        "misaligned",
        "attention.cu",
        "attention_bwd: a misaligned contiguous dout or out passed on uncopied",
        "return t.is_contiguous() && aligned16(t.data_ptr()) ? t",
        "return t.is_contiguous() ? t",
    ),
    # -- grid-stride bounds
    M(
        "grid",
        "gelu.cu",
        "gelu_flat_kernel: vectors counted rounding up, so the last one runs past n",
        "const int64_t nvec = n / V;",
        "const int64_t nvec = (n + V - 1) / V;",
    ),
    M(
        "grid",
        "layernorm.cu",
        "ln_fwd_kernel: rows past N not left out of the last row group",
        "const bool active = owner && row < N;\n"
        "    const int64_t off = row * C + (int64_t)j * V;\n    float v[V];",
        "const bool active = owner;\n"
        "    const int64_t off = row * C + (int64_t)j * V;\n    float v[V];",
    ),
    M(
        "grid",
        "gelu.cu",
        "gelu_bias_kernel: the row stride without the rows of a group",
        "row += (int64_t)gridDim.y * kBiasRows) {",
        "row += (int64_t)gridDim.y) {",
    ),
    M(
        "grid",
        "common.cuh",
        "sum_partials_kernel: one turn over the partials (at most a warp's rows of them)",
        "for (int p = threadIdx.y; p < P; p += ROWS)",
        "for (int p = threadIdx.y; p < (P < ROWS ? P : ROWS); p += ROWS)",
    ),
    M(
        "grid",
        "cross_entropy.cu",
        "ce_fast_kernel: sweep 1's paired loop runs to the end of the row, the second load past it",
        "for (; j + stride < nvec; j += 2 * stride) {\n"
        "    const Raw r0 = x[j];\n    const Raw r1 = x[j + stride];\n"
        "    if constexpr (SMEM) {",
        "for (; j < nvec; j += 2 * stride) {\n"
        "    const Raw r0 = x[j];\n    const Raw r1 = x[j + stride];\n"
        "    if constexpr (SMEM) {",
    ),
    M(
        "grid",
        "attention.cu",
        "attention_bwd_delta_kernel: threads past the last row load too",
        "  if (row < rows) {\n    const uint4 o4",
        "  {\n    const uint4 o4",
    ),
    # -- the causal diagonal
    M(
        "causal",
        "attention.cu",
        "attention_fwd_kernel: the mask hides the diagonal too (>=)",
        "if (k0 + nt * 8 + frag_col(lane, i) > wq0 + 16 * r + frag_row(lane, i)) "
        "s[r][nt][i] = -INFINITY;",
        "if (k0 + nt * 8 + frag_col(lane, i) >= wq0 + 16 * r + frag_row(lane, i)) "
        "s[r][nt][i] = -INFINITY;",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_fwd_kernel: the mask only on tiles that start past the warp's first row",
        "if (k0 + BC - 1 > wq0) {",
        "if (k0 > wq0) {",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_fwd_kernel: the visible keys end before the warp's own rows",
        "const int kv_valid = min(min(BC, wq0 + WR - k0),",
        "const int kv_valid = min(min(BC, wq0 - k0),",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_bwd_kernel: the mask hides the diagonal too (>=)",
        "if (need_mask && (key > q0 + c || q0 + c >= seqlen)) pv = 0.f;",
        "if (need_mask && (key >= q0 + c || q0 + c >= seqlen)) pv = 0.f;",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_bwd_kernel: no mask on the tile whose first chunk is the warp's diagonal",
        "const bool need_mask = q0 < wk0 + 15 || q0 + BR > seqlen;",
        "const bool need_mask = q0 < wk0 || q0 + BR > seqlen;",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_bwd_kernel: the query chunks start one past the diagonal",
        "const int c_lo = max(0, (wk0 - q0) / 16);",
        "const int c_lo = max(0, (wk0 - q0) / 16 + 1);",
    ),
    M(
        "causal",
        "attention.cu",
        "attention_fwd_plain_kernel: keys before the query only, not the query's own",
        "for (int j = 0; j <= t; ++j) {",
        "for (int j = 0; j < t; ++j) {",
    ),
    # -- launches against declared resources
    M(
        "bounds",
        "gelu.cu",
        "gelu_bias_kernel: __launch_bounds__(128) under its 256-thread launch",
        "__launch_bounds__(32 * kBiasRows) gelu_bias_kernel",
        "__launch_bounds__(128) gelu_bias_kernel",
    ),
    M(
        "bounds",
        "layernorm.cu",
        "ln_bwd_kernel: __launch_bounds__(512) under blocks of up to 1024 threads",
        "__launch_bounds__(1024) ln_bwd_kernel",
        "__launch_bounds__(512) ln_bwd_kernel",
    ),
    M(
        "bounds",
        "cross_entropy.cu",
        "ce_fast_kernel: __launch_bounds__ of half the threads and twice the blocks",
        "__launch_bounds__(kMaxThreads, kFastMinBlocks)",
        "__launch_bounds__(kMaxThreads / 2, 2 * kFastMinBlocks)",
    ),
    M(
        "bounds",
        "attention.cu",
        "attention_bwd_kernel: __launch_bounds__(128) under the big tiles' 256 threads",
        "__launch_bounds__(BwdCfg<D, BIG>::THREADS) attention_bwd_kernel",
        "__launch_bounds__(128) attention_bwd_kernel",
    ),
    M(
        "bounds",
        "attention.cu",
        "attention_bwd_delta_kernel launched with 512 threads, its bounds 256",
        "ARCANA_LAUNCH(delta_kernel, chunk_grid, dim3(256), 0, stream, p);",
        "ARCANA_LAUNCH(delta_kernel, chunk_grid, dim3(512), 0, stream, p);",
    ),
    M(
        "bounds",
        "common.cuh",
        "launch_sum_partials: blocks of 32 x 64 threads",
        "constexpr int kRows = 32;",
        "constexpr int kRows = 64;",
    ),
    M(
        "bounds",
        "attention.cu",
        "launch_bwd_tiles: the backward's shared memory without its opt-in",
        "  ARCANA_CUDA_CHECK(cudaFuncSetAttribute(kernel, "
        "cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM));\n"
        "  const dim3 grid(p.B * p.H, (p.T + Cfg::BC - 1) / Cfg::BC);",
        "  const dim3 grid(p.B * p.H, (p.T + Cfg::BC - 1) / Cfg::BC);",
    ),
    # -- architecture branches
    M(
        "arch",
        "attention.cu",
        "attention_bwd_kernel, sm_90: the float2 atomic's two columns swapped",
        "make_float2(dq[r][n][2 * hr], dq[r][n][2 * hr + 1])",
        "make_float2(dq[r][n][2 * hr + 1], dq[r][n][2 * hr])",
    ),
    M(
        "arch",
        "attention.cu",
        "attention_bwd_kernel, sm_90: the float2 atomic adds the even column only",
        "make_float2(dq[r][n][2 * hr], dq[r][n][2 * hr + 1])",
        "make_float2(dq[r][n][2 * hr], 0.f)",
    ),
    M(
        "arch",
        "attention.cu",
        "the sm_80 kernels compiled only from sm_90 on (sm_80 gets the trapping ones)",
        "#if ARCANA_ARCH == 0 || ARCANA_ARCH >= 800",
        "#if ARCANA_ARCH == 0 || ARCANA_ARCH >= 900",
    ),
    M(
        "arch",
        "cross_entropy.cu",
        "ce_fast_kernel asks 2 resident blocks of 1024 threads on every GPU (1536-thread SMs too)",
        "constexpr int kFastMinBlocks = 1;",
        "constexpr int kFastMinBlocks = kBlocksPerSm;",
    ),
    # -- inline PTX: the emulators run their own model of each instruction instead
    M(
        "ptx",
        "attention.cu",
        "ldsm_x4: the first two matrices of ldmatrix .x4 swapped in the asm's outputs",
        '"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n"',
        '"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%1, %0, %2, %3}, [%4];\\n"',
    ),
    M(
        "ptx",
        "attention.cu",
        "cp_async_16: rows past T copied instead of zero-filled (src-size always 16)",
        '"r"(valid ? 16 : 0)',
        '"r"(16)',
    ),
]

FAMILY = {
    "layernorm.cu": "norm_gelu",
    "gelu.cu": "norm_gelu",
    "common.cuh": "norm_gelu",
    "cross_entropy.cu": "cross_entropy",
    "attention.cu": "attention",
}
EMULATED = {
    "norm_gelu": "tests/test_kernels.py",
    "cross_entropy": "tests/test_cross_entropy.py",
    "attention": "tests/test_attention.py",
}
PTXAS = {
    "norm_gelu": "layernorm or gelu",
    "cross_entropy": "cross_entropy",
    "attention": "attention",
}


def stages(family):
    """(name, pytest arguments) of the stages that run
    a mutant of a file of family, cheapest first."""
    return [
        ("emulated", [EMULATED[family], "-k", "emulated"]),
        ("hardened", ["tests/test_emulation.py", "-k", f"hardened and {family.upper()}"]),
        ("ptxas", ["tests/test_emulation.py", "-k", f"fit and ({PTXAS[family]})"]),
        ("model", ["tests/test_emulated_model.py", "-k", "emulated_model and not planted"]),
    ]


# -----------------------------------------------------------------------------
# running


def planted(mutant, folder):
    """A copy of csrc/ in folder with mutant applied: its csrc/ path and the mutant's line."""
    csrc = os.path.join(folder, "csrc")
    shutil.copytree(
        os.path.join(ROOT, "csrc"), csrc, ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    path = os.path.join(csrc, mutant.file)
    with open(path) as f:
        source = f.read()
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.file}: {mutant.what}: its text occurs {count} times, not once")
    with open(path, "w") as f:
        f.write(source.replace(mutant.old, mutant.new))
    return csrc, mutant.line(source)


NODE = re.compile(r"^(tests/\S+::\S+)", re.M)
CAUSE = re.compile(
    r"kernel emulator: .*|\w+Sanitizer: [\w-]+.*|runtime error: .*|FAILED \S+ - .*|ERROR \S+ - .*|"
    r"sm_\d+, \S+:\n.*"
)


def run_stage(args, csrc, timeout):
    """pytest args with ARCANA_CSRC=csrc: None when every test passed, else (test, cause)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-v", "-rfE", "-p", "no:cacheprovider", *args]
    env = {**os.environ, "ARCANA_CSRC": csrc}
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "(timed out)", f"no result within {timeout} s: a hang"
    out = res.stdout + res.stderr
    if res.returncode == 0:
        return None
    if res.returncode == 5:
        raise SystemExit(f"no tests selected by {' '.join(args)}")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    nodes = NODE.findall(out)
    if failed:
        test = failed[0]
    elif nodes:
        test = nodes[-1]
    else:
        test = "(pytest crashed)"
    causes = CAUSE.findall(out)
    cause = causes[0] if causes else f"exit code {res.returncode}"
    # the raised message, not the assert source that pytest prints for any failure of the test
    if re.search(r"Error: building the emulat(or|ed library) failed", out):
        cause = "DOES NOT COMPILE: " + cause
    return test.split("::", 1)[-1] if "::" in test else test, " ".join(cause.split())[:160]


def run_mutant(mutant, all_stages, timeout):
    """The mutant's result: {"line", "killed_by": [(stage, test, cause)], "seconds"}."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mutant_") as folder:
        csrc, line = planted(mutant, folder)
        killed = []
        for name, args in stages(FAMILY[mutant.file]):
            verdict = run_stage(args, csrc, timeout)
            print(f"    {name}: {'passed' if verdict is None else verdict[0]}", flush=True)
            if verdict is not None:
                killed.append((name, *verdict))
                if not all_stages:
                    break
    return {"line": line, "killed_by": killed, "seconds": round(time.time() - t0)}


def table(rows):
    """Rows of cells as aligned text, the first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def report(results):
    """The per-mutant table and the kill rate by class."""
    rows = [["class", "mutant", "change", "result"]]
    by_class = {}
    for m, r in results:
        killed = [k for k in r["killed_by"] if not k[2].startswith("DOES NOT COMPILE")]
        if r["killed_by"] and not killed:
            verdict = "INVALID: " + r["killed_by"][0][2]
        elif killed:
            verdict = "; ".join(f"{stage}: {test} ({cause})" for stage, test, cause in killed)
        else:
            verdict = "SURVIVED"
        rows.append([m.cls, f"{m.file}:{r['line']}", m.what, verdict])
        if not verdict.startswith("INVALID"):
            n, k, stages_ = by_class.get(m.cls, (0, 0, {}))
            if killed:
                stages_[killed[0][0]] = stages_.get(killed[0][0], 0) + 1
            by_class[m.cls] = (n + 1, k + bool(killed), stages_)
    summary = [["class", "mutants", "killed", "survived", "killed first by"]]
    for cls, (n, k, stages_) in by_class.items():
        first = ", ".join(f"{s} {c}" for s, c in stages_.items()) or "-"
        summary.append([cls, str(n), str(k), str(n - k), first])
    total = sum(v[0] for v in by_class.values()), sum(v[1] for v in by_class.values())
    summary.append(["all", str(total[0]), str(total[1]), str(total[0] - total[1]), ""])
    return table(rows) + "\n\n" + table(summary)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", help=f"comma-separated, of: {', '.join(CLASSES)}")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--all-stages", action="store_true", help="run every stage on every mutant")
    parser.add_argument(
        "--timeout", type=int, default=3600, help="seconds per stage (default 3600)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    classes = args.classes.split(",") if args.classes else list(CLASSES)
    unknown = set(classes) - set(CLASSES)
    if unknown:
        parser.error(f"unknown classes {sorted(unknown)}; choose from {', '.join(CLASSES)}")
    mutants = [m for m in MUTANTS if m.cls in classes]
    if args.list:
        for m in mutants:
            print(f"{m.cls:10}  {m.file:16}  {m.what}")
        return
    results = []
    for i, m in enumerate(mutants, 1):
        print(f"[{i}/{len(mutants)}] {m.cls}: {m.file}: {m.what}", flush=True)
        results.append((m, run_mutant(m, args.all_stages, args.timeout)))
    print("\n" + report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(m), **r} for m, r in results], f, indent=1)


if __name__ == "__main__":
    main()
