"""What a GPU would see that the kernel tests' emulated runs cannot, checked on the CPU:

- tests/emu_hardened.cpp, one build per kernel family and sanitizer: device shapes and inputs large
  enough that every persistent and grid-stride loop takes several turns and every partial sum has
  more partials than a warp, inputs off a 16-byte boundary, fast kernels against plain ones.
  AddressSanitizer reports any global access out of its buffer, UBSan a misaligned 16-byte access;
  ThreadSanitizer runs blocks unordered with cp.async copies landing when issued, so a missing
  barrier, a stage refilled while read, or two blocks writing one address without an atomic is a
  reported race. Built for sm_90 (ARCANA_ARCH), the H100's branches.
- Launch bounds: every kernel of csrc/ has its __launch_bounds__ checked by the emulators, which
  refuse a block larger than them, as a GPU's launch fails, and bounds whose resident blocks an SM
  of the architecture cannot hold (planted in a scratch copy of csrc/).
- ptxas's resource use of every kernel at sm_80 and sm_90, as the extension is built: no spills, and
  the registers of the block size and resident blocks each kernel's __launch_bounds__ asks for fit
  an SM.
"""

import os
import re
import shutil
import subprocess

import pytest
from kernel_testing import (
    checked_csrc,
    cuda_include_dir,
    emulator_command,
    with_launch_bounds_checked,
)

SANITIZERS = {"asan": ["-fsanitize=address"], "tsan": ["-g", "-fsanitize=thread"]}


@pytest.mark.parametrize("sanitizer", SANITIZERS)
@pytest.mark.parametrize("family", ["NORM_GELU", "CROSS_ENTROPY", "ATTENTION"])
def test_hardened_emulation(tmp_path, family, sanitizer):
    exe = str(tmp_path / f"emu_{family}_{sanitizer}")
    cmd = emulator_command("emu_hardened.cpp", exe, f"-DEMU_{family}", *SANITIZERS[sanitizer])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and ("libtsan" in res.stderr or "libasan" in res.stderr):
        pytest.skip(f"no {sanitizer} runtime for g++: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, (
        f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    )
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=0"}
    run = subprocess.run([exe], capture_output=True, text=True, timeout=900, env=env)
    report = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0, report
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, report
    assert "0 mismatches" in run.stdout, report


# -----------------------------------------------------------------------------
# launch bounds: what a GPU refuses at launch, refused by the emulators

# A launch of more threads per block than the kernel's __launch_bounds__, and bounds asking more
# blocks of threads than an SM of the architecture holds, each planted in a scratch copy of csrc/:
# (emulator family, architecture, file, text, planted text, the emulator's refusal)
OVER_BOUNDS = {
    "block": (
        "NORM_GELU",
        900,
        "gelu.cu",
        "__launch_bounds__(32 * kBiasRows) gelu_bias_kernel",
        "__launch_bounds__(128) gelu_bias_kernel",
        "a block of 256 threads, more than the kernel's __launch_bounds__ (128)",
    ),
    "blocks_per_sm": (
        "CROSS_ENTROPY",
        860,
        "cross_entropy.cu",
        "constexpr int kFastMinBlocks = 1;",
        "constexpr int kFastMinBlocks = kBlocksPerSm;",
        "__launch_bounds__(1024, 2) asks 2048 resident threads per SM, an sm_86 SM holds 1536",
    ),
}


def test_every_kernel_checks_its_launch_bounds():
    """Each __global__ function of csrc/ is written
    `__global__ void __launch_bounds__(...) name(...) {`, the form whose bounds the emulators' copy
    of the sources checks (kernel_testing.with_launch_bounds_checked)."""
    for name in sorted(os.listdir(checked_csrc())):
        if name.endswith((".cu", ".cuh")):
            with open(os.path.join(checked_csrc(), name)) as f:
                source = f.read()
            checked = with_launch_bounds_checked(source).count("emu::launch_bounds(")
            assert checked == source.count("__global__"), (
                f"{name}: {source.count('__global__')} kernels, "
                f"{checked} with their launch bounds checked; "
                "write each as `__global__ void __launch_bounds__(THREADS) name(...) {`"
            )


@pytest.mark.parametrize("case", OVER_BOUNDS)
def test_launches_beyond_the_launch_bounds_are_refused(tmp_path, monkeypatch, case):
    """A GPU refuses to launch a block larger than its kernel's __launch_bounds__; so does the
    emulator (GELU's bias kernel declared for 128 threads and launched with 256). And where the
    bounds' minimum of resident blocks exceeds an SM of the architecture, ptxas drops it and the
    register cap it sets; the emulator refuses those bounds (the fast cross-entropy kernel asking 2
    blocks of 1024 threads on an sm_86 SM of 1536)."""
    family, arch, name, text, planted, refusal = OVER_BOUNDS[case]
    csrc = tmp_path / "csrc"
    shutil.copytree(checked_csrc(), csrc, ignore=shutil.ignore_patterns("*.so", "*.py*"))
    source = (csrc / name).read_text()
    assert source.count(text) == 1, f"{name} changed: update OVER_BOUNDS"
    (csrc / name).write_text(source.replace(text, planted))
    monkeypatch.setenv("ARCANA_CSRC", str(csrc))
    exe = str(tmp_path / "emu")
    cmd = emulator_command("emu_hardened.cpp", exe, f"-DEMU_{family}", arch=arch)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, (
        f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    )
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and refusal in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]


# -----------------------------------------------------------------------------
# resources, from ptxas

REGISTERS_PER_SM = 65536  # every architecture from sm_80 to sm_90
ALLOCATION_UNIT = 256  # registers are given to a warp in units of 256 (8 per thread)


def kernel_launch_bounds(ptx):
    """{mangled kernel name: (max threads per block, min resident blocks per SM)} from a PTX file's
    .entry directives (__launch_bounds__ becomes .maxntid and .minnctapersm)."""
    bounds = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)(.*?)\{", ptx, re.S):
        directives = m.group(3)
        ntid = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", directives)
        blocks = re.search(r"\.minnctapersm\s+(\d+)", directives)
        threads = int(ntid.group(1)) * int(ntid.group(2)) * int(ntid.group(3)) if ntid else None
        bounds[m.group(1)] = (threads, int(blocks.group(1)) if blocks else 1)
    return bounds


def ptxas_usage(log):
    """{mangled kernel name: (registers, spill store bytes, spill load bytes)}
    from `ptxas -v` output."""
    usage, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name, spills = m.group(1), (0, 0)
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and name:
            spills = int(m.group(1)), int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            usage[name] = (int(m.group(1)), *spills)
            name = None
    return usage


@pytest.fixture(scope="module")
def nvcc_flags():
    """nvcc's flags for csrc/*.cu as torch's BuildExtension passes them;
    a skip without nvcc or torch's headers."""
    nvcc, inc = shutil.which("nvcc"), cuda_include_dir()
    if nvcc is None or inc is None:
        pytest.skip("the resource check needs nvcc and the CUDA headers; set CUDA_HOME")
    from torch.utils.cpp_extension import include_paths

    return [
        nvcc,
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        *[f"-I{p}" for p in include_paths()],
        f"-I{inc}",
    ]


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", ["layernorm.cu", "gelu.cu", "cross_entropy.cu", "attention.cu"])
def test_kernels_fit_the_sm_without_spills(tmp_path, nvcc_flags, source, arch):
    ptx = str(tmp_path / "k.ptx")
    res = subprocess.run(
        [
            *nvcc_flags,
            f"-arch=compute_{arch}",
            "-ptx",
            os.path.join(checked_csrc(), source),
            "-o",
            ptx,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    ptxas = os.path.join(os.path.dirname(shutil.which(nvcc_flags[0])), "ptxas")
    res = subprocess.run(
        [
            ptxas if os.path.isfile(ptxas) else "ptxas",
            "-v",
            f"-arch=sm_{arch}",
            "-O3",
            ptx,
            "-o",
            str(tmp_path / "k.cubin"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    with open(ptx) as f:
        bounds = kernel_launch_bounds(f.read())
    usage = ptxas_usage(res.stdout + res.stderr)
    assert usage and set(usage) == set(bounds), (
        f"ptxas reported {sorted(usage)}, the PTX holds {sorted(bounds)}"
    )
    problems = []
    for name, (regs, stores, loads) in sorted(usage.items()):
        threads, blocks = bounds[name]
        if threads is None:
            problems.append(
                f"{name}: no __launch_bounds__, so nothing ties its registers to its launch"
            )
            continue
        warps = -(-threads // 32)
        needed = warps * -(-regs * 32 // ALLOCATION_UNIT) * ALLOCATION_UNIT * blocks
        if stores or loads:
            problems.append(
                f"{name}: spills {stores} bytes stored, {loads} loaded ({regs} registers)"
            )
        if needed > REGISTERS_PER_SM:
            problems.append(
                f"{name}: {blocks} block(s) of {threads} threads at {regs} registers need {needed} "
                f"registers, an SM has {REGISTERS_PER_SM}"
            )
    assert not problems, f"sm_{arch}, {source}:\n" + "\n".join(problems)
