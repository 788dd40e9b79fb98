"""What the kernel tests (test_kernels.py, test_cross_entropy.py, test_attention.py) share: the rule
for a missing arcana_kernels extension, building the CPU emulators (tests/*_emu.cpp) with g++, the
table of errors printed after a module's tests, and short training runs compared through their logs.
The `arcana`, `poison` and `variant` fixtures are in conftest.py."""

import ctypes
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def require_kernels():
    """The csrc package (the arcana_kernels extension with the Python half of its ops: fake
    implementations, autograd, CudaOps), imported: a skip without the built extension, a failure
    where CI requires it (ARCANA_REQUIRE_KERNELS=1)."""
    try:
        import csrc
    except ImportError as e:
        reason = (
            f"the arcana_kernels extension is not built ({e}); "
            f"build it with `python setup.py build_ext --inplace`"
        )
        if os.environ.get("ARCANA_REQUIRE_KERNELS") == "1":
            pytest.fail(reason + " (ARCANA_REQUIRE_KERNELS=1)")
        pytest.skip(reason)
    return csrc


def short(dtype):
    return str(dtype).replace("torch.", "")


# -----------------------------------------------------------------------------
# the CPU emulators


def cuda_include_dir():
    """The CUDA headers' directory (the emulators need cuda_bf16.h and cuda_fp16.h), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
        if os.path.isfile(os.path.join(inc, "cuda_bf16.h")):
            return inc
    return None


def checked_csrc():
    """The csrc/ folder that the CPU checks of the kernels compile (the emulators, ptxas):
    ARCANA_CSRC where it is set (tests/mutations.py points it at a scratch copy with a planted bug),
    else the repository's."""
    return os.environ.get("ARCANA_CSRC") or os.path.join(ROOT, "csrc")


# A kernel's head: `__global__ void __launch_bounds__(BOUNDS) name(PARAMS) {`.
KERNEL_HEAD = re.compile(r"__global__\s+void\s+__launch_bounds__\(")


def with_launch_bounds_checked(source):
    """source with each kernel's __launch_bounds__ arguments repeated as the first statement of its
    body, `emu::launch_bounds(BOUNDS);` (emu_runtime.h), on the line of its `{`: g++ keeps no such
    attribute, and there the bounds are evaluated as nvcc evaluates them, in the kernel's scope for
    each instantiation."""
    parts, pos = [], 0
    for m in KERNEL_HEAD.finditer(source):
        depth, end = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        body = source.index("{", end) + 1
        parts += [source[pos:body], f" emu::launch_bounds({source[m.end() : end - 1]});"]
        pos = body
    return "".join(parts) + source[pos:]


def emulator_sources(folder, csrc=None):
    """The kernel sources of csrc (default checked_csrc()) copied into folder/csrc, where the
    emulators include them from (`#include "csrc/layernorm.cu"`), every kernel checking its launch
    against its __launch_bounds__ (with_launch_bounds_checked); returns folder, for g++'s -I."""
    csrc = csrc or checked_csrc()
    os.makedirs(os.path.join(folder, "csrc"), exist_ok=True)
    for name in sorted(os.listdir(csrc)):
        if name.endswith((".cu", ".cuh", ".cpp")):
            with open(os.path.join(csrc, name)) as f:
                source = f.read()
            with open(os.path.join(folder, "csrc", name), "w") as f:
                f.write(with_launch_bounds_checked(source))
    return folder


# The architectures the emulators are built for (ARCANA_ARCH, emu_runtime.h): the H100, the usual
# build; the A100, without sm_90's branches; and sm_86, for the branches of neither.
ARCHS = {"sm90": 900, "sm80": 800, "sm86": 860}


def emulator_command(source, output, *flags, arch=900):
    """The g++ command that builds tests/<source> into output with flags for architecture arch
    (ARCANA_ARCH), compiling the kernels of checked_csrc() (copied next to output); a skip without
    g++ or the CUDA headers. Every build checks the alignment of each typed access (UBSan), so a
    16-byte load or store of misaligned data fails as it would on a GPU."""
    cxx, inc = shutil.which("g++"), cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("the CPU emulation needs g++ and the CUDA headers (cuda_bf16.h); set CUDA_HOME")
    return [
        cxx,
        "-std=c++20",
        "-O1",
        "-fsanitize=alignment",
        "-fno-sanitize-recover=alignment",
        f"-DARCANA_ARCH={arch}",
        *flags,
        "-pthread",
        f"-I{emulator_sources(output + '_src')}",
        f"-I{inc}",
        "-w",
        os.path.join(TESTS, source),
        "-o",
        output,
    ]


def build_emulator(tmp_path_factory, source, arch=900):
    """tests/<source> built with g++ for architecture arch into a shared library, loaded with ctypes
    (its argtypes are the caller's)."""
    lib_path = str(tmp_path_factory.mktemp("emu") / (os.path.splitext(source)[0] + ".so"))
    cmd = emulator_command(source, lib_path, "-shared", "-fPIC", arch=arch)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, (
        f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    )
    return ctypes.CDLL(lib_path)


# -----------------------------------------------------------------------------
# tables of errors, printed after a module's tests


def format_table(header, rows, left=1):
    """Rows of cells under header, each column as wide as its widest cell: the first `left` columns
    (names) left-aligned, the others (numbers) right-aligned."""
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        for row in cells
    ]


def print_after_tests(config, lines):
    """Write lines to the terminal from a fixture's
    teardown (also under -q, and with output captured)."""
    if not lines:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n" + "\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


class WorstErrors:
    """The worst error of each kind of result (a key such as op, output, dtype, variant) over a
    module's tests, relative to its tolerance, for the table printed after them."""

    def __init__(self, *key_names):
        self.key_names = key_names
        # key -> (error / tolerance, shape, error, PyTorch's own error or None, tolerance)
        self.worst = {}

    def record(self, key, shape, err, torch_err, tol):
        """Keep this result if it is the worst of its key so far; True when err is within tol."""
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        if key not in self.worst or ratio > self.worst[key][0]:
            self.worst[key] = (ratio, "x".join(map(str, shape)), err, torch_err, tol)
        return ratio <= 1

    def lines(self):
        """The table, one row per key (none when nothing was recorded)."""
        if not self.worst:
            return []
        rows = [
            [
                *key,
                shape,
                f"{err:.3e}",
                "-" if torch_err is None else f"{torch_err:.3e}",
                f"{tol:.3e}",
                "pass" if ratio <= 1 else "FAIL",
            ]
            for key, (ratio, shape, err, torch_err, tol) in sorted(self.worst.items())
        ]
        header = [*self.key_names, "worst shape", "max err", "torch err", "tolerance", "result"]
        return format_table(header, rows, left=len(self.key_names) + 1)


# -----------------------------------------------------------------------------
# training runs


def write_shards(folder, seed, vocab, period, n_train, n_val):
    """A learnable token stream in train_gpt.py's shard format: a fixed random sequence of `period`
    tokens below `vocab`, repeated, 5% of them replaced; n_train tokens in one train shard, n_val in
    the val shard."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, size=period)
    for name, n in (("x_train_000001.npy", n_train), ("x_val_000000.npy", n_val)):
        tokens = np.resize(pattern, n)
        noise = rng.random(n) < 0.05
        tokens[noise] = rng.integers(0, vocab, size=noise.sum())
        np.save(os.path.join(folder, name), tokens.astype(np.uint16))


def read_train_losses(log_dir):
    """The train loss of every step in log_dir/log.txt, in step order."""
    losses = {}
    with open(os.path.join(log_dir, "log.txt")) as f:
        for line in f:
            if line.strip():
                step, stream, value = line.split()
                if stream == "train":
                    losses[int(step)] = float(value)
    return [losses[s] for s in sorted(losses)]


def train_losses(args, log_dir, kernels, timeout):
    """python train_gpt.py with args, --kernels kernels and --log_dir log_dir, in a fresh process:
    the train loss of every step. The run must succeed and record the kernels it used."""
    cmd = [sys.executable, "train_gpt.py", *args, "--kernels", kernels, "--log_dir", log_dir]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    with open(os.path.join(log_dir, "run.json")) as f:
        assert json.load(f)["kernels"] == kernels
    return read_train_losses(log_dir)
