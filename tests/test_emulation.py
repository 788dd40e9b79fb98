"""What a GPU would see that the kernel tests' emulated runs cannot, checked on the CPU:

- tests/emu_hardened.cpp, one build per kernel family and sanitizer: device shapes and inputs large enough that every
  persistent and grid-stride loop takes several turns and every partial sum has more partials than a warp, inputs
  off a 16-byte boundary, fast kernels against plain ones. AddressSanitizer reports any global access out of its
  buffer, UBSan a misaligned 16-byte access; ThreadSanitizer runs blocks unordered with cp.async copies landing
  when issued, so a missing barrier, a stage refilled while read, or two blocks writing one address without an
  atomic is a reported race. Built for sm_90 (ARCANA_ARCH), the H100's branches.
- ptxas's resource use of every kernel at sm_80 and sm_90, as the extension is built: no spills, and the
  registers of the block size and resident blocks each kernel's __launch_bounds__ asks for fit an SM.
"""

import os
import re
import shutil
import subprocess

import pytest
from kernel_testing import checked_csrc, cuda_include_dir, emulator_command

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
# resources, from ptxas

REGISTERS_PER_SM = 65536  # every architecture from sm_80 to sm_90
ALLOCATION_UNIT = 256  # registers are given to a warp in units of 256 (8 per thread)


def kernel_launch_bounds(ptx):
    """{mangled kernel name: (max threads per block, min resident blocks per SM)} from a PTX file's .entry
    directives (__launch_bounds__ becomes .maxntid and .minnctapersm)."""
    bounds = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)(.*?)\{", ptx, re.S):
        directives = m.group(3)
        ntid = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", directives)
        blocks = re.search(r"\.minnctapersm\s+(\d+)", directives)
        threads = int(ntid.group(1)) * int(ntid.group(2)) * int(ntid.group(3)) if ntid else None
        bounds[m.group(1)] = (threads, int(blocks.group(1)) if blocks else 1)
    return bounds


def ptxas_usage(log):
    """{mangled kernel name: (registers, spill store bytes, spill load bytes)} from `ptxas -v` output."""
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
    """nvcc's flags for csrc/*.cu as torch's BuildExtension passes them; a skip without nvcc or torch's headers."""
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
