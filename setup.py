"""
Build ArcanaGPT's CUDA kernels (csrc/*.cu, csrc/ops.cpp) into csrc/arcana_kernels*.so, which
`import csrc` loads:

    python setup.py build_ext --inplace                           # for the GPUs of this machine
    TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace  # for the architectures named
    ARCANA_REQUIRE_KERNELS=1 python setup.py build_ext --inplace  # CI: must build; sm_80-90, PTX

It builds for the architectures in TORCH_CUDA_ARCH_LIST where that is set, else for the GPUs
present. On a machine without a GPU it builds nothing and says so (compiling for every
architecture takes 10+ minutes on a small machine), and train_gpt.py runs its PyTorch ops.
ARCANA_REQUIRE_KERNELS=1 builds there too, for TORCH_CUDA_ARCH_LIST or else DEFAULT_ARCHS, and
makes a missing toolkit or a torch without CUDA an error. While it compiles it prints a line as
each file finishes.

The toolkit is CUDA_HOME (or CUDA_PATH), else the folder around nvcc, else /usr/local/cuda:
torch.utils.cpp_extension reads CUDA_HOME when it is imported.
"""

import contextlib
import glob
import os
import re
import shutil
import sys
import threading

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100, A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200, and PTX that newer GPUs compile as they load
# it
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# ninja prints this before each command it finished: files done, files in all, time since the start
NINJA_STATUS = "arcana-ninja %f %t %w: "
NINJA_LINE = re.compile(r"arcana-ninja (\d+) (\d+) (\S+): .* -c (.+?) -o ")


def toolkit():
    """The CUDA toolkit's folder, or None."""
    nvcc = shutil.which("nvcc")
    homes = [
        os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
        nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def architectures(torch, required):
    """What to build for, as TORCH_CUDA_ARCH_LIST spells it ("8.0;9.0"), or None: build nothing."""
    named = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if named:
        return named
    present = set()
    for device in range(torch.cuda.device_count()):
        present.add(torch.cuda.get_device_capability(device))
    if present:
        return ";".join(f"{major}.{minor}" for major, minor in sorted(present))
    if required:
        return DEFAULT_ARCHS
    return None


def reason_not_to_build(required):
    """Why nothing is built, or None; sets TORCH_CUDA_ARCH_LIST and CUDA_HOME for the build."""
    try:
        import torch
    except ImportError:
        return "torch is not installed; install it first (pip install -r requirements.txt)"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is built without CUDA"
    home = toolkit()
    if not home:
        return (
            "no CUDA toolkit (include/cuda_runtime.h in CUDA_HOME, beside nvcc, or in "
            "/usr/local/cuda)"
        )
    archs = architectures(torch, required)
    if archs is None:
        return (
            "torch sees no GPU here; TORCH_CUDA_ARCH_LIST=9.0 (say) builds for the architectures "
            "named, ARCANA_REQUIRE_KERNELS=1 for sm_80 to sm_90"
        )
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns it into nvcc's -gencode flags
    os.environ["CUDA_HOME"] = home
    return None


@contextlib.contextmanager
def readable_ninja():
    """While the build runs, ninja's lines (each a status and a whole compiler command) become one
    short line per finished file; everything else, compiler warnings and errors included, passes
    through as it is."""
    os.environ["NINJA_STATUS"] = NINJA_STATUS
    sys.stdout.flush()
    read, write = os.pipe()
    terminal = os.dup(1)
    os.dup2(write, 1)  # ninja writes to this process's stdout, torch's choice
    os.close(write)
    relay = threading.Thread(target=relay_lines, args=(read, terminal))
    relay.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        # the pipe's last write end closes: the relay reads to its end and stops
        os.dup2(terminal, 1)
        relay.join()
        os.close(terminal)


def relay_lines(read, terminal):
    """Copy the lines of the pipe end read to the file descriptor terminal, ninja's shortened."""
    with open(read, errors="replace") as lines, open(terminal, "w", closefd=False) as out:
        for line in lines:
            match = NINJA_LINE.match(line)
            if match:
                done, total, elapsed, source = match.groups()
                source = os.path.relpath(source, ROOT)
                line = f"  compiled {source} ({done} of {total} files, {elapsed} since the start)\n"
            out.write(line)
            out.flush()


def extension():
    """setup() arguments that build the extension, or none (with a notice, or an error where it
    is required)."""
    required = os.environ.get("ARCANA_REQUIRE_KERNELS") == "1"
    reason = reason_not_to_build(required)
    if reason and required:
        sys.exit(
            f"error: cannot build the CUDA kernels: {reason} "
            f"(ARCANA_REQUIRE_KERNELS=1 makes this an error)"
        )
    if reason:
        print(
            f"notice: not building the CUDA kernels: {reason}; train_gpt.py will use its PyTorch "
            f"ops",
            file=sys.stderr,
        )
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class Build(BuildExtension):
        def build_extensions(self):
            sources = self.extensions[0].sources
            archs = os.environ["TORCH_CUDA_ARCH_LIST"]
            print(
                f"compiling {len(sources)} files for TORCH_CUDA_ARCH_LIST={archs}, a line as each "
                f"finishes (attention.cu takes longest, minutes per architecture on few cores)",
                flush=True,
            )
            with readable_ninja():
                super().build_extensions()

    ext = CUDAExtension(
        "csrc.arcana_kernels",
        sources=sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp")),
        depends=glob.glob("csrc/*.cuh"),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return dict(ext_modules=[ext], cmdclass={"build_ext": Build})


os.chdir(ROOT)
setup(name="arcana-kernels", version="0.1.0", packages=[], **extension())
