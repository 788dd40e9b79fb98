"""The arcana ops on the CPU, through the emulated kernels: tests/emu_ops.cpp (the csrc/ source,
kernels and torch bindings, built for the CPU with g++) imported as csrc.arcana_kernels in place of
the real extension, so that `import csrc` gives torch.ops.arcana.*, autograd, CudaOps and the
start-of-run check on CPU tensors.

A process holds one arcana library (each declares the ops' schemas), and pytest's has the real one:
the emulated one runs in a fresh process, `python tests/emulated_ops.py LIBRARY MODULE FUNCTION
[ARG...]`, which loads it, imports csrc, then calls MODULE.FUNCTION(*ARGS) (run_emulated does that
from a test). Builds are cached by the content of every file they compile.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import traceback

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
EMULATOR_FILES = ("emu_ops.cpp", "emu_runtime.h", "attention_emu.h", "kernel_testing.py")


def build_command(sources, output, arch):
    """g++ for tests/emu_ops.cpp with sources/csrc as its csrc/ into output, for architecture arch
    (ARCANA_ARCH), or None without g++ or the CUDA headers. Alignment-checked (UBSan), as every
    emulator build: a 16-byte load of misaligned data fails as on a GPU."""
    import torch
    from kernel_testing import cuda_include_dir
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx, cuda = shutil.which("g++"), cuda_include_dir()
    if cxx is None or cuda is None:
        return None
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = library_paths()[0]
    return [
        cxx,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",  # its CUDA runtime functions stay its own (emu_ops.cpp)
        "-fsanitize=alignment",
        "-fno-sanitize-recover=alignment",
        "-pthread",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-DARCANA_ARCH={arch}",
        f"-I{sources}",
        f"-I{cuda}",
        f"-I{sysconfig.get_paths()['include']}",
        *[f"-I{p}" for p in include_paths()],
        os.path.join(TESTS, "emu_ops.cpp"),
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        "-o",
        output,
    ]


def build(cache_dir, csrc=None, arch=900):
    """The emulated library of the kernel sources in csrc (default kernel_testing.checked_csrc())
    for architecture arch (ARCANA_ARCH: the emulated GPU is an H100, an A100 or an sm_86 one), built
    into cache_dir unless a build of the same sources is there (wherever their folder): its path, or
    None without g++ or the CUDA headers. Fails with g++'s errors."""
    from kernel_testing import checked_csrc, emulator_sources

    csrc = csrc or checked_csrc()
    if build_command("SOURCES", "OUTPUT", arch) is None:
        return None
    digest = hashlib.sha256(" ".join(build_command("SOURCES", "OUTPUT", arch)).encode())
    names = sorted(f for f in os.listdir(csrc) if f.endswith((".cu", ".cuh", ".cpp")))
    files = [(f, os.path.join(csrc, f)) for f in names]
    for name, path in files + [(f, os.path.join(TESTS, f)) for f in EMULATOR_FILES]:
        with open(path, "rb") as f:
            digest.update(name.encode() + f.read())
    output = os.path.join(cache_dir, f"arcana_kernels_emulated_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(output):
        partial = f"{output}.{os.getpid()}.tmp"
        sources = emulator_sources(f"{partial}_src", csrc)
        cmd = build_command(sources, partial, arch)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            shutil.rmtree(sources)
        assert res.returncode == 0, (
            f"building the emulated library failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
        )
        os.replace(partial, output)
    return output


def load(library):
    """Import library (a build of emu_ops.cpp) as csrc.arcana_kernels, then csrc itself, which finds
    it there: the arcana ops on CPU tensors. Once per process, before anything imports csrc."""
    assert "csrc" not in sys.modules, "csrc is imported already, with the real extension"
    spec = importlib.util.spec_from_file_location("csrc.arcana_kernels", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["csrc.arcana_kernels"] = module
    import csrc

    return csrc


def run_emulated(library, module, function, *args, timeout=600):
    """module.function(*args) (strings) in a fresh process with the emulated library loaded: its
    output, or a test failure with it where the function raises (or the emulator aborts: a kernel
    fault)."""
    cmd = [sys.executable, os.path.join(TESTS, "emulated_ops.py"), library, module, function, *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{module}.{function} on the emulated kernels failed (exit code {res.returncode}):\n"
        f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    )
    return res.stdout


def main(library, module, function, *args):
    load(library)
    try:
        getattr(importlib.import_module(module), function)(*args)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
