"""
Build ArcanaGPT's CUDA kernels (csrc/*.cu, csrc/ops.cpp) into csrc/arcana_kernels*.so, which `import csrc` loads:

    python setup.py build_ext --inplace                             # sm_80, 86, 89, 90 and PTX for newer GPUs
    TORCH_CUDA_ARCH_LIST="9.0" python setup.py build_ext --inplace  # only the architectures named (faster)

Without a CUDA toolkit or a CUDA build of torch it builds nothing and says so, and train_gpt.py runs its PyTorch
ops; ARCANA_REQUIRE_KERNELS=1 (CI) makes that an error. The toolkit is CUDA_HOME (or CUDA_PATH), else the folder
around nvcc, else /usr/local/cuda: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ARCHS = ["80", "86", "89", "90"]  # A100, A10/A40/RTX 30xx, L4/L40/RTX 40xx, H100/H200


def extension():
    """setup() arguments that build the extension, or none (with a notice, or an error where it is required)."""
    nvcc = shutil.which("nvcc")
    homes = [
        os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
        nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    home = next(
        (h for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))),
        None,
    )
    try:
        import torch

        reason = None if torch.version.cuda else f"torch {torch.__version__} is built without CUDA"
    except ImportError:
        reason = "torch is not installed; install it first (pip install -r requirements.txt)"
    if not reason and not home:
        reason = "no CUDA toolkit (include/cuda_runtime.h in CUDA_HOME, beside nvcc, or in /usr/local/cuda)"
    if reason:
        if os.environ.get("ARCANA_REQUIRE_KERNELS") == "1":
            sys.exit(
                f"error: cannot build the CUDA kernels: {reason} (ARCANA_REQUIRE_KERNELS=1 makes this an error)"
            )
        print(
            f"notice: not building the CUDA kernels: {reason}; train_gpt.py will use its PyTorch ops",
            file=sys.stderr,
        )
        return {}
    os.environ["CUDA_HOME"] = home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_flags = ["-O3"]
    if not os.environ.get(
        "TORCH_CUDA_ARCH_LIST"
    ):  # else torch turns the list into -gencode flags itself
        nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        nvcc_flags += [
            f"-gencode=arch=compute_{ARCHS[-1]},code=compute_{ARCHS[-1]}"
        ]  # PTX for newer GPUs
    ext = CUDAExtension(
        "csrc.arcana_kernels",
        sources=sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp")),
        depends=glob.glob("csrc/*.cuh"),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


os.chdir(ROOT)
setup(name="arcana-kernels", version="0.1.0", packages=[], **extension())
