"""
Build ArcanaGPT's CUDA kernels (every csrc/*.cu and csrc/*.cpp) into the arcana_kernels module, beside
train_gpt.py:

    python setup.py build_ext --inplace                          # sm_80, sm_86, sm_89, sm_90 (+ PTX for newer GPUs)
    TORCH_CUDA_ARCH_LIST="9.0" python setup.py build_ext --inplace  # only the architectures named (faster)
    DEBUG=1 python setup.py build_ext --inplace                  # -O0 -g -lineinfo, for cuda-gdb and profilers
    ARCANA_REQUIRE_KERNELS=1 python setup.py build_ext --inplace # fail, instead of skipping, when it cannot build

It needs a CUDA build of torch and nvcc. Without either it builds nothing, says why and exits 0, so CPU and Mac
machines install fine: train_gpt.py then runs its PyTorch ops (--kernels auto picks them). CI sets
ARCANA_REQUIRE_KERNELS=1 so a missing toolkit or a compile error fails the run.

The toolkit is CUDA_HOME (or CUDA_PATH) when set; otherwise the directory around nvcc when it holds
include/cuda_runtime.h, else /usr/local/cuda. It is looked up before torch.utils.cpp_extension is imported,
which otherwise guesses from nvcc's location (a wrapper script in /usr/local/bin makes it guess /usr/local).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NAME = "arcana_kernels"
ARCHS = ["80", "86", "89", "90"]  # A100, A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200
REQUIRE = os.environ.get("ARCANA_REQUIRE_KERNELS", "") == "1"
DEBUG = os.environ.get("DEBUG", "") == "1"


def is_toolkit(path):
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and \
        os.path.isfile(os.path.join(path, "bin", "nvcc"))


def find_cuda_home():
    """The CUDA toolkit directory, or None when there is no nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if is_toolkit(os.environ[var]) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if is_toolkit(c)), None)


def skip(reason):
    """No extension: an error under ARCANA_REQUIRE_KERNELS=1, else a notice."""
    if REQUIRE:
        sys.exit(f"error: cannot build {NAME}: {reason}. (ARCANA_REQUIRE_KERNELS=1 makes this an error; "
                 f"unset it to install without the kernels.)")
    print(f"notice: not building the {NAME} CUDA extension: {reason}. train_gpt.py will use its PyTorch ops "
          f"(--kernels torch, or auto).", file=sys.stderr)
    return dict()


def extension():
    """setup() arguments for the extension, or none where it cannot be built."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        where = next((f"{var}={os.environ[var]} holds no bin/nvcc and include/cuda_runtime.h"
                      for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)),
                     "no nvcc on PATH and no /usr/local/cuda")
        return skip(f"no CUDA toolkit found ({where}); install the CUDA toolkit or point CUDA_HOME at it")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        return skip(f"torch is not importable ({e}); install torch first, and build with "
                    f"`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is built without CUDA")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.cuh")) + glob.glob(os.path.join("csrc", "*.h")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    nvcc = opt + (["-lineinfo"] if DEBUG else [])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # else torch turns the list into -gencode flags itself
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        nvcc += [f"-gencode=arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}"]  # PTX, JIT-compiled on newer GPUs
    print(f"building {NAME} from {', '.join(sources)} with CUDA {torch.version.cuda} in {cuda_home}"
          f"{' (DEBUG)' if DEBUG else ''}, architectures {os.environ.get('TORCH_CUDA_ARCH_LIST') or ', '.join(ARCHS)}",
          file=sys.stderr)
    ext = CUDAExtension(NAME, sources=sources, depends=headers,
                        extra_compile_args={"cxx": opt, "nvcc": nvcc})
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


os.chdir(ROOT)
setup(
    name="arcana-kernels",
    version="0.1.0",
    description="ArcanaGPT's fused CUDA kernels (LayerNorm, GELU, causal attention) as torch.ops.arcana",
    python_requires=">=3.9",
    packages=[],  # the scripts are run from the checkout; this only builds the extension
    py_modules=[],
    **extension(),
)
