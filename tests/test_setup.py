"""setup.py's rule for what to build, run as a user runs it, with the GPUs present made up: for the
GPUs present; with none, nothing unless TORCH_CUDA_ARCH_LIST or ARCANA_REQUIRE_KERNELS=1 asks; and
its progress lines while a build compiles (two tiny files, not the kernels)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.version.cuda, reason="needs a CUDA build of torch")

# setup.py with torch seeing the GPUs of FAKE_GPUS ("9.0 8.0": two, of those capabilities) and
# setup() replaced by a line saying what it would build
SETUP_WITH_FAKE_GPUS = """
import os, runpy, sys, setuptools, torch
gpus = [tuple(map(int, c.split("."))) for c in os.environ["FAKE_GPUS"].split()]
torch.cuda.device_count = lambda: len(gpus)
torch.cuda.get_device_capability = lambda device: gpus[device]
def setup(**kwargs):
    built = os.environ["TORCH_CUDA_ARCH_LIST"] if kwargs.get("ext_modules") else "nothing"
    print("builds", built)
setuptools.setup = setup
sys.argv = ["setup.py", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
"""


def fake_toolkit(tmp_path):
    """A CUDA_HOME that setup.py takes for a toolkit (nothing is compiled with it here)."""
    os.makedirs(tmp_path / "cuda" / "include", exist_ok=True)
    (tmp_path / "cuda" / "include" / "cuda_runtime.h").write_text("")
    return str(tmp_path / "cuda")


def setup_with(tmp_path, gpus, **env):
    """(exit code, stdout, stderr) of setup.py with those GPUs and environment variables."""
    environ = dict(os.environ, CUDA_HOME=fake_toolkit(tmp_path), FAKE_GPUS=gpus, **env)
    for name in ("TORCH_CUDA_ARCH_LIST", "ARCANA_REQUIRE_KERNELS"):
        if name not in env:
            environ.pop(name, None)
    cmd = [sys.executable, "-c", SETUP_WITH_FAKE_GPUS]
    res = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout, res.stderr


def test_without_a_gpu_nothing_is_built_and_the_notice_says_how_to_force_it(tmp_path):
    code, out, err = setup_with(tmp_path, "")
    assert code == 0 and "builds nothing" in out, out + err
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1, err
    assert "not building the CUDA kernels: torch sees no GPU here" in notices[0]
    assert "TORCH_CUDA_ARCH_LIST" in notices[0] and "ARCANA_REQUIRE_KERNELS=1" in notices[0]


def test_without_a_gpu_a_build_is_asked_for_by_either_variable(tmp_path):
    code, out, err = setup_with(tmp_path, "", ARCANA_REQUIRE_KERNELS="1")  # CI: every default
    assert code == 0 and "builds 8.0;8.6;8.9;9.0+PTX" in out, out + err
    code, out, err = setup_with(tmp_path, "", TORCH_CUDA_ARCH_LIST="9.0")
    assert code == 0 and "builds 9.0" in out, out + err
    code, out, err = setup_with(
        tmp_path, "", TORCH_CUDA_ARCH_LIST="8.6", ARCANA_REQUIRE_KERNELS="1"
    )
    assert code == 0 and "builds 8.6" in out, out + err


def test_with_gpus_it_builds_for_theirs(tmp_path):
    code, out, err = setup_with(tmp_path, "9.0 8.0 9.0")
    assert code == 0 and "builds 8.0;9.0" in out, out + err
    code, out, err = setup_with(tmp_path, "9.0", TORCH_CUDA_ARCH_LIST="8.0")  # the variable wins
    assert code == 0 and "builds 8.0" in out, out + err


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_a_build_prints_a_short_line_per_compiled_file(tmp_path):
    """setup.py on two tiny sources of its own: one line as each compiles, no compiler commands."""
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    os.makedirs(tmp_path / "csrc")
    (tmp_path / "csrc" / "one.cu").write_text("__global__ void twice(float *x) { x[0] *= 2; }\n")
    (tmp_path / "csrc" / "two.cpp").write_text("int two() { return 2; }\n")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="8.0")
    env.pop("ARCANA_REQUIRE_KERNELS", None)
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "compiling 2 files for TORCH_CUDA_ARCH_LIST=8.0" in lines[1], res.stdout
    compiled = sorted(line.split(" (")[0].strip() for line in lines if "compiled csrc/" in line)
    assert compiled == ["compiled csrc/one.cu", "compiled csrc/two.cpp"], res.stdout
    assert any("(2 of 2 files, " in line for line in lines), res.stdout
    assert not any("nvcc" in line for line in lines), res.stdout  # no compiler command lines
    assert [n for n in os.listdir(tmp_path / "csrc") if n.endswith(".so")], res.stdout
