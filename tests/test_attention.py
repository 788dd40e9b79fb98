"""Causal attention kernels (csrc/attention.cu, torch.ops.arcana.attention_*).

Three parts:
- CPU: schemas, fake implementations and autograd registration (traced on meta tensors), the clear
  error for CPU tensors, and CudaOps.attention's fallbacks. Needs the built extension: skipped
  without it, failed without it when ARCANA_REQUIRE_KERNELS=1 (CI).
- CPU emulation: tests/attention_emu.cpp compiles the kernels and launchers of csrc/attention.cu for
  the CPU, with ldmatrix, mma, cp.async and shuffles emulated per warp, and runs them on small
  shapes, each built for the architecture of the GPU whose tiles it runs (sm_90's float2 atomics for
  dQ, sm_80's and sm_86's scalar ones); no extension needed, only g++ and the CUDA headers. This
  checks the kernels' index arithmetic; the GPU part checks the rest.
- GPU (marker cuda): the fragment self-test first, then both variants (the plain and the fast
  kernels, chosen with torch.ops.arcana._set_variant by the `variant` fixture) against an fp32
  reference for the output, lse and the three gradients, the kernels autograd launches under the
  switch, the errors, peak memory against SDPA, opcheck, torch.compile and a tiny training run. A
  table of the errors is printed at the end.

Accuracy rule (as FlashAttention's tests): against fp32 math attention on the upcast inputs, each
output and gradient must be within 2x the error of PyTorch's own SDPA in the same low precision,
plus a small floor.
"""

import ctypes
import math
import os
import random
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_testing import (
    ARCHS,
    build_emulator,
    emulator_command,
    format_table,
    print_after_tests,
    read_train_losses,
    require_kernels,
)

import train_gpt
from train_gpt import TorchOps

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fresh_seed():
    """A new seed per test (fresh random inputs on every run), reported in failure messages."""
    return random.SystemRandom().randrange(2**31)


def make_inputs(B, T, H, D, dtype, seed, device="cpu", layout="packed"):
    """qkv (B, T, 3, H, D) as the kernels meet it, and dout (B, T, H, D).
    packed: a view of c_attn's (B, T, 3C) output; stacked: a view of a (3, B, H, T, D) tensor
    (other strides); padded: rows of 3C + 64 elements of which the last 3C are used (a stride that
    is not 3C)."""
    g = torch.Generator().manual_seed(seed)
    shape = {
        "packed": (B, T, 3 * H * D),
        "stacked": (3, B, H, T, D),
        "padded": (B, T, 3 * H * D + 64),
    }[layout]
    base = torch.randn(shape, generator=g).to(
        device=device, dtype=dtype
    )  # the views come after .to(), which
    if layout == "packed":  # would make a padded one contiguous
        qkv = base.view(B, T, 3, H, D)
    elif layout == "stacked":
        qkv = base.permute(1, 3, 0, 2, 4)
    else:
        qkv = base[:, :, 64:].unflatten(-1, (3, H, D))
    dout = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)
    return qkv, dout


def reference(qkv, dout):
    """fp32 math attention on the upcast inputs: out (B, T, H, D), lse (B, H, T),
    dqkv (B, T, 3, H, D). Full fp32 matmuls even where a training run in this process set TF32
    ("high")."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _reference(qkv, dout)
    finally:
        torch.set_float32_matmul_precision(precision)


def _reference(qkv, dout):
    x = qkv.detach().float().requires_grad_()
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
    T, D = q.shape[-2:]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    lse = s.logsumexp(-1)
    out = ((s - lse[..., None]).exp() @ v).transpose(1, 2)
    out.backward(dout.float())
    return out.detach(), lse.detach(), x.grad


def torch_low_precision(qkv, dout):
    """PyTorch's own SDPA in the inputs' dtype (whichever backend it picks): out, dqkv."""
    x = qkv.detach().clone().requires_grad_()
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    out.backward(dout)
    return out.detach(), x.grad


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


ROWS = []  # (case, quantity, our error, PyTorch's error, bound, pass, seconds) for the final table


def check_against_reference(case, qkv, dout, out, lse, dqkv, seconds=float("nan")):
    """Assert the 2x rule for out and dQ, dK, dV,
    and lse within 1e-3 (fp32 on both sides); record the rows."""
    ref_out, ref_lse, ref_dqkv = reference(qkv, dout)
    low_out, low_dqkv = torch_low_precision(qkv, dout)
    pairs = [("out", out, low_out, ref_out)] + [
        (name, dqkv[:, :, i], low_dqkv[:, :, i], ref_dqkv[:, :, i])
        for i, name in enumerate(("dq", "dk", "dv"))
    ]
    failures = []
    for name, ours, theirs, ref in pairs:
        floor = 1e-3 * max(1.0, ref.abs().max().item())
        err, err_torch = max_err(ours, ref), max_err(theirs, ref)
        bound = 2 * err_torch + floor
        ok = err <= bound  # NaN fails
        ROWS.append((case, name, err, err_torch, bound, ok, seconds))
        if not ok:
            failures.append(
                f"{name}: error {err:.3g} > 2 x PyTorch's {err_torch:.3g} + {floor:.3g}"
            )
    err_lse = max_err(lse, ref_lse)
    ROWS.append((case, "lse", err_lse, float("nan"), 1e-3, err_lse <= 1e-3, seconds))
    if not err_lse <= 1e-3:
        failures.append(f"lse: error {err_lse:.3g} > 1e-3")
    assert not failures, f"{case}: " + "; ".join(failures)


@pytest.fixture(scope="module", autouse=True)
def error_table(request):
    """Print the table of errors after the module's tests (also under -q)."""
    ROWS.clear()
    yield
    rows = [
        [
            case,
            name,
            f"{err:.3g}",
            f"{err_torch:.3g}",
            f"{bound:.3g}",
            "yes" if ok else "NO",
            f"{seconds:.2f}",
        ]
        for case, name, err, err_torch, bound, ok, seconds in ROWS
    ]
    if rows:
        header = ["case", "qty", "error", "torch err", "bound", "ok", "s"]
        print_after_tests(request.config, format_table(header, rows, left=2))


# -----------------------------------------------------------------------------
# CPU: registration

SCHEMAS = {
    "attention_fwd": "arcana::attention_fwd(Tensor qkv) -> (Tensor out, Tensor lse)",
    "attention_bwd": "arcana::attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse)"
    " -> Tensor",
    "attention_selftest": "arcana::attention_selftest(Tensor x) -> Tensor",
}


def test_ops_registered_with_schemas():
    require_kernels()
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.arcana, name).default._schema) == schema


def test_fake_implementations_give_shapes_and_dtypes():
    require_kernels()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for dtype in DTYPES.values():
            qkv = torch.empty(3, 10, 3 * 4 * 64, dtype=dtype, device="meta").view(3, 10, 3, 4, 64)
            out, lse = torch.ops.arcana.attention_fwd(qkv)
            assert out.shape == (3, 10, 4, 64) and out.dtype == dtype and out.is_contiguous()
            assert lse.shape == (3, 4, 10) and lse.dtype == torch.float32
            strided = torch.empty(3, 3, 4, 10, 128, dtype=dtype, device="meta").permute(
                1, 3, 0, 2, 4
            )
            dqkv = torch.ops.arcana.attention_bwd(
                out.new_empty(3, 10, 4, 128), strided, out.new_empty(3, 10, 4, 128), lse
            )
            assert dqkv.shape == (3, 10, 3, 4, 128) and dqkv.dtype == dtype and dqkv.is_contiguous()


def test_autograd_runs_the_backward_op_and_lse_has_no_gradient():
    require_kernels()
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd_bwd(qkv, dout):
        out, lse = torch.ops.arcana.attention_fwd(qkv)
        assert not lse.requires_grad and out.requires_grad
        return torch.autograd.grad(out, qkv, dout)

    qkv = torch.empty(2, 7, 3, 4, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    gm = make_fx(fwd_bwd, tracing_mode="fake")(
        qkv, torch.empty(2, 7, 4, 64, dtype=torch.bfloat16, device="meta")
    )
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "arcana" in str(n.target)]
    assert [str(n.target) for n in calls] == [
        "arcana.attention_fwd.default",
        "arcana.attention_bwd.default",
    ]


def test_cpu_tensors_get_the_clear_error():
    require_kernels()
    qkv = torch.zeros(1, 4, 3, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(
        RuntimeError, match="attention_fwd: qkv must be a CUDA tensor.*--kernels torch"
    ):
        torch.ops.arcana.attention_fwd(qkv)
    out, lse = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match="attention_bwd: dout must be a CUDA tensor"):
        torch.ops.arcana.attention_bwd(out, qkv, out, lse)
    with pytest.raises(RuntimeError, match="attention_selftest: x must be a CUDA tensor"):
        torch.ops.arcana.attention_selftest(torch.zeros(3, 16, 16, dtype=torch.bfloat16))


def test_cuda_ops_attention_falls_back_for_float32_and_other_head_sizes():
    """float32 runs and head sizes without a kernel take the PyTorch path (so this runs on CPU)."""
    cuda_ops = require_kernels().CudaOps(TorchOps())
    torch.manual_seed(0)
    for qkv, n_head in [
        (torch.randn(2, 9, 3 * 128), 2),  # float32, head size 64
        (torch.randn(2, 9, 3 * 128).bfloat16(), 4),
    ]:  # head size 32
        assert torch.equal(cuda_ops.attention(qkv, n_head), TorchOps().attention(qkv, n_head))


# -----------------------------------------------------------------------------
# CPU emulation of the kernels


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """emulators(arch): tests/attention_emu.cpp built with g++ for architecture arch (ARCHS) into a
    shared library, loaded with ctypes; each architecture built once."""
    libs = {}

    def get(arch):
        if arch not in libs:
            lib = build_emulator(tmp_path_factory, "attention_emu.cpp", arch=ARCHS[arch])
            P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
            lib.emu_attention_selftest.argtypes = [I, P, P]
            lib.emu_attention_fwd.argtypes = [I, I, P, L, L, L, L, L, I, I, I, I, P, P]
            lib.emu_attention_bwd.argtypes = [I, I, P, L, L, L, L, L, I, I, I, I, P, P, P, P, I]
            libs[arch] = lib
        return libs[arch]

    return get


def emu_dtype(dtype):
    return {torch.bfloat16: 0, torch.float16: 1}[dtype]


def emu_qkv_args(qkv):
    """Data pointer, bytes from it to the end of its storage, and the four outer strides."""
    nbytes = qkv.untyped_storage().nbytes() - qkv.storage_offset() * qkv.element_size()
    return [qkv.data_ptr(), nbytes] + list(qkv.stride()[:4])


# Shared memory per block (bytes) that the backward's
# launcher is told the GPU has: it picks the tiles.
H100_SMEM, A100_SMEM, SM86_SMEM = 227 * 1024, 163 * 1024, 99 * 1024
# The architecture each GPU's cases are built for:
# dQ's float2 atomics on sm_90, scalar ones before it.
ARCH = {"H100": "sm90", "A100": "sm80", "sm86": "sm86"}


def emu_attention(lib, qkv, dout, variant, max_smem=H100_SMEM):
    """Forward and backward through the emulated launchers; outputs start as NaN."""
    B, T, _, H, D = qkv.shape
    out = torch.full((B, T, H, D), float("nan"), dtype=qkv.dtype)
    lse = torch.full((B, H, T), float("nan"))
    dqkv = torch.full((B, T, 3, H, D), float("nan"), dtype=qkv.dtype)
    lib.emu_attention_fwd(
        emu_dtype(qkv.dtype),
        variant,
        *emu_qkv_args(qkv),
        B,
        T,
        H,
        D,
        out.data_ptr(),
        lse.data_ptr(),
    )
    dout = dout.contiguous()
    lib.emu_attention_bwd(
        emu_dtype(qkv.dtype),
        variant,
        *emu_qkv_args(qkv),
        B,
        T,
        H,
        D,
        out.data_ptr(),
        dout.data_ptr(),
        lse.data_ptr(),
        dqkv.data_ptr(),
        max_smem,
    )
    return out, lse, dqkv


def selftest_inputs(dtype, seed):
    """X, Y, Z: small integers (exact in bf16/fp16 and in every product),
    X the identity half of the time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (3, 16, 16), generator=g).float()
    if seed % 2:
        x[0] = torch.eye(16)
    return x.to(dtype)


def selftest_expected(x):
    X, Y, Z = x.float()
    return torch.stack([X @ Y.T, X @ Z, X.T @ Z, (X @ Y.T).to(x.dtype).float() @ Z])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_emulated_fragment_selftest(emulators, dtype):
    for seed in (fresh_seed(), 1):
        x = selftest_inputs(dtype, seed)
        out = torch.full((4, 16, 16), float("nan"))
        emulators("sm90").emu_attention_selftest(emu_dtype(dtype), x.data_ptr(), out.data_ptr())
        assert torch.equal(out, selftest_expected(x)), f"seed {seed}"


# Variant 1 at awkward sizes: T = 1, below a tile, across tiles, far past them (T = 1025: 17 key
# tiles in the forward's last query block, 9 query tiles behind the backward's first key tile, so
# every double-buffered stage is refilled many times while the other is read); both head sizes and
# dtypes; B, H > 1; the packed, stacked and padded layouts; the backward's tiles for an H100, an
# A100 and an sm_86 (each head size has a big and a small tile, picked by the shared memory per
# block), each on an emulator built for that GPU's architecture. Variant 0 on tiny T (it takes a
# warp barrier per key here).
EMU_CASES = [
    (1, 1, 1, 64, "bf16", 1, "packed", "H100"),
    (2, 7, 3, 64, "fp16", 1, "stacked", "sm86"),
    (1, 63, 2, 128, "bf16", 1, "padded", "H100"),
    (3, 97, 2, 64, "bf16", 1, "packed", "A100"),
    (1, 129, 1, 128, "fp16", 1, "stacked", "A100"),
    (1, 200, 1, 64, "bf16", 1, "padded", "sm86"),
    (2, 200, 1, 128, "bf16", 1, "packed", "H100"),
    (1, 1, 1, 128, "fp16", 1, "packed", "sm86"),
    (1, 1025, 1, 64, "bf16", 1, "packed", "H100"),
    (1, 520, 1, 128, "fp16", 1, "packed", "sm86"),
    (2, 1025, 2, 128, "bf16", 1, "stacked", "H100"),
    (1, 1025, 3, 64, "fp16", 1, "padded", "sm86"),
    (1, 1025, 2, 128, "fp16", 1, "packed", "A100"),
    (1, 7, 2, 64, "bf16", 0, "packed", "H100"),
    (1, 9, 1, 128, "fp16", 0, "stacked", "H100"),
]
SMEM = {"H100": H100_SMEM, "A100": A100_SMEM, "sm86": SM86_SMEM}


@pytest.mark.parametrize(
    "B,T,H,D,dtype,variant,layout,gpu",
    EMU_CASES,
    ids=["B{}-T{}-H{}-D{}-{}-v{}-{}-{}".format(*c) for c in EMU_CASES],
)
def test_emulated_kernels_match_reference(emulators, B, T, H, D, dtype, variant, layout, gpu):
    seed = fresh_seed()
    qkv, dout = make_inputs(B, T, H, D, DTYPES[dtype], seed, layout=layout)
    assert qkv.is_contiguous() == (layout == "packed")
    t0 = time.perf_counter()
    out, lse, dqkv = emu_attention(emulators(ARCH[gpu]), qkv, dout, variant, SMEM[gpu])
    check_against_reference(
        f"emu B{B} T{T} H{H} D{D} {dtype} v{variant} {layout} {gpu} s{seed}",
        qkv,
        dout,
        out,
        lse,
        dqkv,
        time.perf_counter() - t0,
    )


def test_emulated_kernels_have_no_shared_memory_races(tmp_path):
    """The fast kernels under ThreadSanitizer: every shared-memory write and read of two different
    threads must be ordered by a barrier (a __syncthreads left out shows up here as a data race),
    and blocks add into dQ with atomics only. Built for sm_80, whose dQ atomics are scalar
    (test_emulation.py's hardened run has sm_90's float2 ones)."""
    exe = str(tmp_path / "attention_emu_tsan")
    cmd = emulator_command(
        "attention_emu.cpp", exe, "-g", "-fsanitize=thread", "-DARCANA_EMU_MAIN", arch=ARCHS["sm80"]
    )
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "tsan" in res.stderr:
        pytest.skip(f"no ThreadSanitizer runtime for g++: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, (
        f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    )
    run = subprocess.run(
        [exe],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"},
    )
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]


# -----------------------------------------------------------------------------
# GPU


def cuda_attention(qkv, dout):
    out, lse = torch.ops.arcana.attention_fwd(qkv)
    dqkv = torch.ops.arcana.attention_bwd(dout, qkv, out, lse)
    return out, lse, dqkv


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fragment_selftest(poison, dtype):
    """First of the GPU tests: the mma/ldmatrix register layouts every kernel index derives from."""
    for seed in (fresh_seed(), 1):
        x = selftest_inputs(dtype, seed).cuda()
        out = torch.ops.arcana.attention_selftest(x).cpu()
        expected = selftest_expected(x.cpu())
        names = [
            "X Y^T (ldsm_a, ldsm_b_nk)",
            "X Z (ldsm_b_kn)",
            "X^T Z (ldsm_a_trans)",
            "(X Y^T) Z (c_to_a)",
        ]
        for i, name in enumerate(names):
            assert torch.equal(out[i], expected[i]), (
                f"{name} wrong (seed {seed}):\n{out[i]}\nexpected\n{expected[i]}"
            )


GPU_CASES = [
    (B, T, H, D, "bf16", v)
    for T, (B, H) in [
        (1, (3, 2)),
        (7, (2, 3)),
        (64, (2, 3)),
        (97, (3, 2)),
        (128, (2, 2)),
        (1000, (1, 3)),
        (1024, (2, 2)),
        (2048, (1, 2)),
    ]
    for D in (64, 128)
    for v in (1, 0)
]
GPU_CASES += [(2, T, 3, D, "fp16", 1) for T in (97, 1024) for D in (64, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "B,T,H,D,dtype,variant",
    GPU_CASES,
    indirect=["variant"],
    ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}-{c[4]}-v{c[5]}" for c in GPU_CASES],
)
def test_matches_reference(poison, B, T, H, D, dtype, variant):
    seed = fresh_seed()
    qkv, dout = make_inputs(B, T, H, D, DTYPES[dtype], seed, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, lse, dqkv = cuda_attention(qkv, dout)
    torch.cuda.synchronize()
    check_against_reference(
        f"B{B} T{T} H{H} D{D} {dtype} v{variant} s{seed}",
        qkv,
        dout,
        out,
        lse,
        dqkv,
        time.perf_counter() - t0,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["stacked", "padded"])
@pytest.mark.parametrize("variant", [1, 0], indirect=True)
def test_strided_layouts(poison, layout, variant):
    seed = fresh_seed()
    qkv, dout = make_inputs(2, 300, 3, 64, torch.bfloat16, seed, device="cuda", layout=layout)
    assert not qkv.is_contiguous()
    out, lse, dqkv = cuda_attention(qkv, dout)
    check_against_reference(
        f"B2 T300 H3 D64 bf16 v{variant} {layout} s{seed}", qkv, dout, out, lse, dqkv
    )


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 0], indirect=True)
def test_misaligned_dout_and_out(poison, variant):
    """dout and out whose data is not 16-byte aligned (contiguous views one element into a buffer)
    give the gradient of aligned copies: the op copies them rather than hand the kernels misaligned
    16-byte loads."""
    qkv, dout = make_inputs(2, 97, 3, 64, torch.bfloat16, fresh_seed(), device="cuda")
    out, lse = torch.ops.arcana.attention_fwd(qkv)

    def misaligned(t):
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16
        return view

    expected = torch.ops.arcana.attention_bwd(dout, qkv, out, lse)
    got = torch.ops.arcana.attention_bwd(misaligned(dout), qkv, misaligned(out), lse)
    assert torch.equal(got[:, :, 1:], expected[:, :, 1:]), "dK, dV differ"
    torch.testing.assert_close(
        got[:, :, 0], expected[:, :, 0]
    )  # dQ: fp32 atomics, last-bit differences


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_bitwise_reproducible_except_dq(arcana, D):
    """out, lse, dK and dV are the same bits on every run (each block owns its query rows or its
    keys); only dQ, summed across blocks with fp32 atomics, may differ in the last bits."""
    qkv, dout = make_inputs(2, 1000, 3, D, torch.bfloat16, fresh_seed(), device="cuda")
    runs = [cuda_attention(qkv, dout) for _ in range(3)]
    for out, lse, dqkv in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1]), (
            "forward not reproducible"
        )
        assert torch.equal(dqkv[:, :, 1:], runs[0][2][:, :, 1:]), "dK, dV not reproducible"
        torch.testing.assert_close(dqkv[:, :, 0], runs[0][2][:, :, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1, 2], indirect=True)
def test_autograd_runs_the_kernels_the_switch_picks(variant):
    """The switch is global, so the backward that autograd runs after attention_fwd launches the
    same kind of kernels as the forward: under _set_variant(0) both directions run the plain
    kernels, under 1 and 2 (which changes only the cross-entropy kernel) both run the fast ones. The
    kernels are read off a profile."""
    qkv, dout = make_inputs(2, 97, 2, 64, torch.bfloat16, fresh_seed(), device="cuda")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        out, _ = torch.ops.arcana.attention_fwd(qkv.requires_grad_())
        out.backward(dout)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    plain = [
        "attention_fwd_plain_kernel",
        "attention_bwd_plain_dq_kernel",
        "attention_bwd_plain_dkv_kernel",
    ]
    fast = ["attention_fwd_kernel", "attention_bwd_kernel", "attention_bwd_dq_convert_kernel"]
    ran = sorted(k for k in plain + fast if k in names)
    assert ran == sorted(plain if variant == 0 else fast), (
        f"variant {variant}: the profile shows "
        f"{ran or 'no attention kernel (no CUDA activity recorded?)'}"
    )


@pytest.mark.cuda
def test_clear_errors_for_unsupported_inputs():
    require_kernels()
    fwd = torch.ops.arcana.attention_fwd
    good = torch.zeros(1, 4, 3, 2, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="must be bfloat16 or float16.*autocast"):
        fwd(good.float())
    with pytest.raises(RuntimeError, match="head_dim .* must be 64 or 128, got 32"):
        fwd(torch.zeros(1, 4, 3, 2, 32, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(RuntimeError, match=r"shape \(B, T, 3, H, D\)"):
        fwd(torch.zeros(1, 4, 2, 2, 64, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(RuntimeError, match="last .* dimension must be contiguous"):
        fwd(torch.zeros(1, 4, 3, 64, 2, dtype=torch.bfloat16, device="cuda").transpose(3, 4))
    with pytest.raises(RuntimeError, match="multiples of 8"):
        fwd(
            torch.zeros(1, 4, 3 * 2 * 64 + 4, dtype=torch.bfloat16, device="cuda")[
                :, :, 4:
            ].unflatten(-1, (3, 2, 64))
        )
    out, lse = fwd(good)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.arcana.attention_bwd(out, good, out, lse[:, :1])
    with pytest.raises(RuntimeError, match="dout has dtype"):
        torch.ops.arcana.attention_bwd(out.half(), good, out, lse)


def peak_bytes(fn):
    """Bytes allocated at the peak of fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.cuda
def test_peak_memory_not_above_sdpa():
    """Training (forward + backward through the model's interface) against PyTorch's default SDPA
    backend on the same (B, T, 3C) c_attn output; inference likewise, allowing for the fp32 lse
    (B H T 4 bytes, 1/32 of the output at D = 64) that our forward always returns and PyTorch's
    no-grad paths may skip. And nothing grows with T^2: doubling T at most doubles our peak."""
    cuda_ops = require_kernels().CudaOps(TorchOps())
    H, D = 12, 64

    def inputs(B, T):
        return (
            torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16),
            torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16),
        )

    def train(ops, qkv, grad):
        def run():
            x = qkv.detach().requires_grad_()
            ops.attention(x, H).backward(grad)

        return run

    def infer(ops, qkv, grad):
        def run():
            with torch.no_grad():
                ops.attention(qkv, H)

        return run

    B, T = 8, 1024
    qkv, grad = inputs(B, T)
    lse_bytes = B * H * T * 4
    for mode, allowance in ((train, 0), (infer, lse_bytes)):
        for _ in range(2):  # the second round is measured, after any one-time workspace allocations
            ours, sdpa = (
                peak_bytes(mode(cuda_ops, qkv, grad)),
                peak_bytes(mode(TorchOps(), qkv, grad)),
            )
        assert ours <= sdpa + allowance, (
            f"{mode.__name__}: peak {ours / 2**20:.1f} MiB > SDPA's "
            f"{sdpa / 2**20:.1f} MiB (+ {allowance / 2**20:.2f} MiB)"
        )
    peaks = [peak_bytes(train(cuda_ops, *inputs(2, t))) for t in (1024, 2048)]
    assert peaks[1] <= 2.05 * peaks[0], (
        f"peak {peaks[0] / 2**20:.1f} MiB at T=1024, {peaks[1] / 2**20:.1f} at 2048"
    )


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 0], indirect=True)
def test_opcheck(variant):
    qkv, dout = make_inputs(2, 97, 2, 64, torch.bfloat16, fresh_seed(), device="cuda")
    torch.library.opcheck(torch.ops.arcana.attention_fwd.default, (qkv.requires_grad_(),))
    out, lse = torch.ops.arcana.attention_fwd(qkv.detach())
    torch.library.opcheck(torch.ops.arcana.attention_bwd.default, (dout, qkv.detach(), out, lse))


@pytest.mark.cuda
def test_torch_compile_fullgraph():
    """A c_attn -> attention -> c_proj block compiled with
    fullgraph=True matches eager, forward and backward."""
    ops = require_kernels().CudaOps(TorchOps())
    torch.manual_seed(fresh_seed())
    C, H = 256, 4
    c_attn, c_proj = torch.nn.Linear(C, 3 * C).cuda(), torch.nn.Linear(C, C).cuda()

    def block(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return c_proj(ops.attention(c_attn(x), H)).float().square().mean()

    x = torch.randn(2, 300, C, device="cuda")
    loss_eager = block(x)
    grads_eager = torch.autograd.grad(loss_eager, list(c_attn.parameters()))
    compiled = torch.compile(block, fullgraph=True)
    loss_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(loss_compiled, list(c_attn.parameters()))
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-2, atol=1e-4)
    for ge, gc in zip(grads_eager, grads_compiled):
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=1e-3)


def make_shards(folder, n_train=2, tokens=40000, seed=0):
    """uint16 token shards of a repeating random pattern (learnable, like text)."""
    os.makedirs(folder, exist_ok=True)
    pattern = np.random.default_rng(seed).integers(0, 50257, 1500)
    np.save(
        os.path.join(folder, "x_val_000000.npy"), np.resize(pattern, tokens // 4).astype(np.uint16)
    )
    for i in range(1, n_train + 1):
        np.save(
            os.path.join(folder, f"x_train_{i:06d}.npy"),
            np.resize(np.roll(pattern, 97 * i), tokens).astype(np.uint16),
        )
    return str(folder)


@pytest.mark.cuda
def test_training_with_cuda_kernels_tracks_torch(tmp_path):
    """python train_gpt.py --model tiny --kernels cuda vs --kernels torch (head size 64, so the
    attention kernel runs): the train losses agree within bf16 noise at every step."""
    require_kernels()
    data = make_shards(tmp_path / "data")
    common = [
        "--model",
        "tiny",
        "--n_head",
        "2",
        "--data_dir",
        data,
        "--device",
        "cuda",
        "--max_steps",
        "30",
        "--batch_size",
        "8",
        "--block_size",
        "256",
        "--total_batch_size",
        "4096",
        "--warmup_steps",
        "5",
        "--max_lr",
        "1e-3",
        "--val_every",
        "0",
        "--hellaswag_every",
        "0",
        "--sample_every",
        "0",
        "--checkpoint_every",
        "0",
    ]
    losses = {}
    for kernels in ("torch", "cuda"):
        log_dir = str(tmp_path / kernels)
        assert train_gpt.main(common + ["--kernels", kernels, "--log_dir", log_dir]) == 0
        losses[kernels] = read_train_losses(log_dir)
    torch_losses, cuda_losses = np.array(losses["torch"]), np.array(losses["cuda"])
    assert len(torch_losses) == len(cuda_losses) == 30
    assert torch_losses[-1] < torch_losses[0] - 0.5, (
        "the tiny model should learn the repeating pattern"
    )
    rel = np.abs(cuda_losses - torch_losses) / torch_losses
    assert rel.max() < 0.02, (
        f"losses diverge: torch {torch_losses.round(4)} cuda {cuda_losses.round(4)}"
    )
