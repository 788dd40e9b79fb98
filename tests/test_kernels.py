"""The LayerNorm and GELU ops of the arcana_kernels extension (csrc/layernorm.cu, csrc/gelu.cu,
schemas in csrc/ops.cpp) and their Python half in csrc/__init__.py (fake implementations, autograd,
CudaOps).

Without a GPU (CI): the module imports (a failure when ARCANA_REQUIRE_KERNELS=1, else a skip), every
op has its schema, the fake implementations give the right shapes, dtypes and strides on meta and
fake tensors, autograd reaches every backward op (with the autocast dtypes, and no cast of an
activation on the way), torch.compile(fullgraph=True) traces through the ops, CPU tensors get the
clear error, the test-only kernel switch (_set_variant) refuses unknown values, and --kernels cuda
is refused on CPU. The kernels and their launchers also run under a CPU emulation of the CUDA
features they use (tests/norm_gelu_emu.cpp, built with g++; no extension needed), both variants on
small awkward shapes and every dtype pairing, with fenced NaN-filled outputs, against float64 and
bitwise against the float32-output runs; with each pointer misaligned in turn (the launchers must
take the plain kernels); and with their launch shapes read back on an emulated device of several
SMs: this checks their index arithmetic, layouts, grids, synchronization and reductions before any
GPU run.

On a GPU (marker cuda): every op and its backward, plain and fast kernels
(torch.ops.arcana._set_variant(0) and (1), set by the `variant` fixture), against PyTorch on fresh
random inputs at C = 768, 1000, 1024, 1600 (GELU also 3072) and 1, 7, 4097, 65536 rows, with every
output buffer poisoned with NaN first (torch.ops.arcana._set_poison) so an unwritten element fails.
Tolerances: fp32 inputs, max-norm relative error under 1e-5 against the op in float64; bf16/fp16
inputs, at most twice PyTorch's own bf16/fp16 error against the op in fp32 on the same inputs (or
under the fp32 tolerance, where PyTorch computes in fp32 too); LayerNorm out in bf16/fp16 of
float32 x against F.layer_norm in fp32 then cast. Then opcheck, input checks, determinism, CudaOps
against TorchOps under autocast (no cast kernels either way), a torch.compile(fullgraph=True) GPT,
and 50 training steps with --kernels cuda against --kernels torch. The worst error of each op,
output and dtype is printed as a table at the end.
"""

import ctypes
import math
import os
import random
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import (
    ROOT,
    WorstErrors,
    build_emulator,
    print_after_tests,
    require_kernels,
    short,
    train_losses,
    write_shards,
)
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt

SCHEMAS = {
    "layer_norm_fwd": "arcana::layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps,"
    " ScalarType? out_dtype=None) -> (Tensor out, Tensor mean, Tensor rstd)",
    "add_layer_norm_fwd": "arcana::add_layer_norm_fwd(Tensor x, Tensor y, Tensor weight,"
    " Tensor bias, float eps, ScalarType? out_dtype=None)"
    " -> (Tensor r, Tensor out, Tensor mean, Tensor rstd)",
    "layer_norm_bwd": "arcana::layer_norm_bwd(Tensor dout, Tensor x, Tensor weight, Tensor mean,"
    " Tensor rstd, Tensor? dr=None, ScalarType? dy_dtype=None)"
    " -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dy)",
    "gelu_fwd": "arcana::gelu_fwd(Tensor x, Tensor? bias=None) -> Tensor",
    "gelu_bwd": "arcana::gelu_bwd(Tensor dout, Tensor x, Tensor? bias=None)"
    " -> (Tensor dx, Tensor dbias)",
    "_set_poison": "arcana::_set_poison(bool enabled) -> ()",
    "_set_variant": "arcana::_set_variant(int variant) -> ()",
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def ln_params(C, device, dtype=torch.float32, requires_grad=False):
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_(requires_grad)
    bias = (0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_(requires_grad)
    return weight, bias


# -----------------------------------------------------------------------------
# without a GPU


def test_import_and_schemas(arcana):
    for name, schema in SCHEMAS.items():
        assert hasattr(arcana, name), f"torch.ops.arcana.{name} is missing"
        assert str(getattr(arcana, name).default._schema) == schema


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_shapes_on_meta(arcana, dtype):
    B, T, C = 2, 5, 16
    x = torch.empty(B, T, C, device="meta", dtype=dtype)
    w = torch.empty(C, device="meta")
    out, mean, rstd = arcana.layer_norm_fwd(x, w, w, EPS)
    assert (out.shape, out.dtype, out.is_contiguous()) == (x.shape, dtype, True)
    for stat in (mean, rstd):
        assert (stat.shape, stat.dtype) == ((B, T), torch.float32)
    low = torch.bfloat16 if dtype == torch.float32 else dtype  # the autocast model's 16-bit dtype
    y = torch.empty(B, T, C, device="meta", dtype=low)
    r, out, mean, rstd = arcana.add_layer_norm_fwd(x, y, w, w, EPS)
    assert (r.shape, r.dtype, out.shape, out.dtype) == (x.shape, dtype, x.shape, dtype)
    assert (mean.shape, rstd.dtype) == ((B, T), torch.float32)
    r, out, _, _ = arcana.add_layer_norm_fwd(x, y, w, w, EPS, low)
    assert (r.dtype, out.shape, out.dtype, arcana.layer_norm_fwd(x, w, w, EPS, low)[0].dtype) == (
        dtype,
        x.shape,
        low,
        low,
    )
    dx, dw, db, dy = arcana.layer_norm_bwd(x, x, w, mean, rstd, x)
    assert (dx.shape, dx.dtype, dw.shape, dw.dtype, db.shape) == (
        x.shape,
        dtype,
        (C,),
        torch.float32,
        (C,),
    )
    assert (dy.shape, dy.dtype) == ((0,), dtype)
    dx, _, _, dy = arcana.layer_norm_bwd(out, x, w, mean, rstd, x, low)
    assert (dx.dtype, dy.shape, dy.dtype, dy.is_contiguous()) == (dtype, x.shape, low, True)
    u = torch.empty(B, T, 4 * C, device="meta", dtype=dtype)
    fb = torch.empty(4 * C, device="meta")
    assert (arcana.gelu_fwd(u, fb).shape, arcana.gelu_fwd(u).dtype) == (u.shape, dtype)
    du, dfb = arcana.gelu_bwd(u, u, fb)
    assert (du.shape, du.dtype, dfb.shape, dfb.dtype) == (u.shape, dtype, (4 * C,), torch.float32)
    du, dfb = arcana.gelu_bwd(u, u)
    assert (du.shape, dfb.shape, dfb.dtype) == (u.shape, (0,), torch.float32)


def test_fake_shapes_in_fake_tensor_mode(arcana):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 7, 24, dtype=torch.bfloat16)
        w = torch.empty(24)
        out, mean, rstd = arcana.layer_norm_fwd(x, w, w, EPS)
        dx, dw, db, _ = arcana.layer_norm_bwd(out, x, w, mean, rstd)
        dg, dgb = arcana.gelu_bwd(x, x, w.to(torch.bfloat16))
    assert (out.shape, mean.shape, dx.dtype, dw.shape) == (
        (3, 7, 24),
        (3, 7),
        torch.bfloat16,
        (24,),
    )
    assert (dg.shape, dgb.dtype) == ((3, 7, 24), torch.bfloat16)


class OpLog(TorchDispatchMode):
    """The aten and arcana ops dispatched while it is active:
    names, and (name, shape of the first argument)."""

    def __init__(self):
        super().__init__()
        self.names, self.calls = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        self.calls.append(
            (self.names[-1], tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None)
        )
        return func(*args, **(kwargs or {}))


def test_autograd_reaches_every_backward_op_on_meta(arcana):
    """Gradients of every input, with the model's dtypes under autocast: residual stream float32,
    branch output and MLP activation bfloat16, LayerNorm outputs bfloat16 (the next matmul's),
    parameters float32. Each gradient comes back in its input's dtype, with no cast of a (B, T, C)
    tensor on the way: the backward takes the LayerNorm outputs' gradients in bfloat16 and writes
    y's in bfloat16 itself. (A bias in another dtype than its weight, never in the model, gets its
    (C,) gradient cast by autograd.)"""
    B, T, C = 2, 5, 16
    bf16 = torch.bfloat16
    x = torch.empty(B, T, C, device="meta", requires_grad=True)
    y = torch.empty(B, T, C, device="meta", dtype=bf16, requires_grad=True)
    w, b = (torch.empty(C, device="meta", requires_grad=True) for _ in range(2))
    u = torch.empty(B, T, 4 * C, device="meta", dtype=bf16, requires_grad=True)
    fb = torch.empty(4 * C, device="meta", requires_grad=True)
    b16 = torch.empty(C, device="meta", dtype=bf16, requires_grad=True)
    m = torch.empty(C, C, device="meta", dtype=bf16)  # a Linear's weight as autocast casts it
    with OpLog() as log:
        r, h, mean, rstd = arcana.add_layer_norm_fwd(x, y, w, b, EPS, bf16)
        h2, _, _ = arcana.layer_norm_fwd(r, w, b16, EPS, bf16)
        outputs = [r, h @ m, h2 @ m, arcana.gelu_fwd(u, fb)]
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    assert not mean.requires_grad and not rstd.requires_grad
    assert (h.dtype, h2.dtype) == (bf16, bf16)
    assert (x.grad.shape, x.grad.dtype, y.grad.dtype) == (x.shape, torch.float32, bf16)
    assert (w.grad.shape, b.grad.dtype, u.grad.dtype, fb.grad.shape) == (
        (C,),
        torch.float32,
        bf16,
        (4 * C,),
    )
    assert (b16.grad.shape, b16.grad.dtype) == ((C,), bf16)
    assert log.names.count("arcana.layer_norm_bwd") == 2 and "arcana.gelu_bwd" in log.names
    casts = [call for call in log.calls if call[0] in ("aten._to_copy", "aten.to", "aten.copy_")]
    assert casts == [("aten._to_copy", (C,))], f"casts around the kernels: {casts} in {log.names}"


class NormGeluOps(train_gpt.TorchOps):
    """TorchOps with this file's ops from CudaOps (LayerNorm, the fused add + LayerNorm, GELU):
    attention and the loss stay PyTorch's."""

    def __init__(self):
        self.kernels = require_kernels().CudaOps(train_gpt.TorchOps())

    def layer_norm(self, x, ln):
        return self.kernels.layer_norm(x, ln)

    def add_layer_norm(self, x, y, ln):
        return self.kernels.add_layer_norm(x, y, ln)

    def linear_gelu(self, x, fc):
        return self.kernels.linear_gelu(x, fc)


def test_compile_fullgraph_traces_through_the_ops(arcana):
    """The model with the LayerNorm/GELU kernels compiles with fullgraph=True (no graph break) and
    runs its backward, with the kernels' ops in the traced graphs and the loss's gradient flowing
    back through them. Traced with aot_eager's compiler on fake CPU tensors, where the ops' fake
    implementations stand in for the kernels: no GPU needed. (Not on meta tensors: under
    torch.compile, aten::nll_loss on the meta device goes to a Python meta kernel instead of its
    CompositeImplicitAutograd one, so it has no autograd kernel and the traced backward silently
    starts from zeros instead of the loss's gradient.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = {}

    def keep(name):  # aot_eager's compiler (run the graph as traced), keeping the graph
        def compiler(gm, example_inputs):
            graphs[name] = str(gm.graph)
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    mc = train_gpt.GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
    with FakeTensorMode():
        model = train_gpt.GPT(mc, NormGeluOps())
        idx = torch.zeros(2, 16, dtype=torch.long)
        backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
        _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, idx)
        loss.backward()
    assert model.transformer.h[0].ln_2.weight.grad.shape == (64,)
    assert model.transformer.h[0].mlp.c_fc.bias.grad.shape == (256,)
    for op in ("add_layer_norm_fwd", "layer_norm_fwd", "gelu_fwd"):
        assert f"arcana.{op}" in graphs["forward"], op
    for op in ("nll_loss_backward", "arcana.layer_norm_bwd", "arcana.gelu_bwd"):
        assert op in graphs["backward"], op


def test_cpu_tensors_get_the_clear_error(arcana):
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    calls = {
        "layer_norm_fwd": lambda: arcana.layer_norm_fwd(x, w, b, EPS),
        "add_layer_norm_fwd": lambda: arcana.add_layer_norm_fwd(x, x, w, b, EPS),
        "layer_norm_bwd": lambda: arcana.layer_norm_bwd(x, x, w, x[:, 0], x[:, 0]),
        "gelu_fwd": lambda: arcana.gelu_fwd(x, b),
        "gelu_bwd": lambda: arcana.gelu_bwd(x, x),
    }
    for name, call in calls.items():
        with pytest.raises(
            RuntimeError,
            match=rf"arcana::{name}: \w+ must be a CUDA tensor, got cpu; move it "
            rf"with \.cuda\(\) or use --kernels torch",
        ):
            call()


def test_set_variant_refuses_unknown_variants(arcana):
    """The test-only kernel switch of every op takes 0, 1 and 2 only, and says what each means."""
    for bad in (3, -1):
        with pytest.raises(
            RuntimeError,
            match=rf"arcana::_set_variant: variant must be 0 \(plain kernels\), 1 "
            rf"\(fast kernels\) or 2 \(fast kernels, cross-entropy rows re-read "
            rf"from L2\), got {bad}",
        ):
            arcana._set_variant(bad)


def test_kernels_cuda_is_refused_on_cpu():
    with pytest.raises(train_gpt.UserError, match="--kernels cuda needs a CUDA device"):
        train_gpt.select_ops("cuda", "cpu")
    assert isinstance(train_gpt.select_ops("auto", "cpu"), train_gpt.TorchOps)


def test_setup_without_a_toolkit_skips_or_fails_when_required():
    """No CUDA toolkit (a CUDA_HOME without one, and every other place setup.py looks hidden by
    making include/cuda_runtime.h invisible): setup.py builds nothing, says why and exits 0;
    ARCANA_REQUIRE_KERNELS=1 makes it fail."""
    hide_toolkit = (
        "import os, runpy, sys; isfile = os.path.isfile; "
        "os.path.isfile = lambda p: not str(p).endswith('cuda_runtime.h') and isfile(p); "
        "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')"
    )
    env = dict(os.environ, CUDA_HOME=os.path.join(ROOT, "no-such-toolkit"))
    env.pop("ARCANA_REQUIRE_KERNELS", None)
    cmd = [sys.executable, "-c", hide_toolkit]
    reason = (
        "no CUDA toolkit"
        if torch.version.cuda
        else f"torch {torch.__version__} is built without CUDA"
    )
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert (
        res.returncode == 0 and f"notice: not building the CUDA kernels: {reason}" in res.stderr
    ), res.stderr
    res = subprocess.run(
        cmd, cwd=ROOT, env=dict(env, ARCANA_REQUIRE_KERNELS="1"), capture_output=True, text=True
    )
    assert (
        res.returncode != 0 and f"error: cannot build the CUDA kernels: {reason}" in res.stderr
    ), res.stderr


# -----------------------------------------------------------------------------
# without a GPU: the kernels themselves, under a CPU emulation (tests/norm_gelu_emu.cpp)

EMU_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
EMU_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # max-norm, relative
EMU_SHAPE = (
    2,
    2048,
    1,
)  # SMs, threads and resident blocks per SM: small, so that the persistent kernels loop


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """tests/norm_gelu_emu.cpp built with g++ into a shared library,
    loaded with ctypes, on the EMU_SHAPE device."""
    lib = build_emulator(tmp_path_factory, "norm_gelu_emu.cpp")
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.emu_set_shape.argtypes = [I, I, I]
    lib.emu_launches.argtypes = [P, I]
    lib.emu_layer_norm_fwd.argtypes = [I, I, I, I, P, P, P, P, P, P, P, P, L, I, ctypes.c_float]
    lib.emu_layer_norm_bwd.argtypes = [I, I, I, I, P, P, P, P, P, P, P, P, P, P, L, I]
    lib.emu_gelu.argtypes = [I, I, P, P, P, P, P, L, L]
    lib.emu_set_shape(*EMU_SHAPE)
    return lib


@contextmanager
def emu_device(emu, sms, blocks_per_sm):
    """The emulated device with sms SMs on which blocks_per_sm blocks of any kernel fit at once (the
    occupancy API's answer), while the block runs."""
    emu.emu_set_shape(sms, 2048, blocks_per_sm)
    try:
        yield
    finally:
        emu.emu_set_shape(*EMU_SHAPE)


def emu_launches(emu):
    """The launches of the last emulated op:
    [(grid (x, y), block (x, y), dynamic shared memory bytes)]."""
    buf = (ctypes.c_int64 * 40)()
    n = emu.emu_launches(buf, 8)
    return [
        ((buf[5 * i], buf[5 * i + 1]), (buf[5 * i + 2], buf[5 * i + 3]), buf[5 * i + 4])
        for i in range(n)
    ]


class Guarded:
    """An output buffer that starts as NaN (an element left unwritten fails) inside 64 sentinel
    elements on each side (a write out of bounds fails); the data is 256-byte aligned, or `offset`
    elements past that."""

    PAD = 64

    def __init__(self, shape, dtype, offset=0):
        n = math.prod(shape)
        self.buf = torch.full((n + 2 * self.PAD,), 7.0, dtype=dtype)
        self.start, self.end = self.PAD + offset, self.PAD + offset + n
        self.t = self.buf[self.start : self.end].view(shape)
        self.t.fill_(float("nan"))

    def data_ptr(self):
        return self.t.data_ptr()

    def value(self, what):
        sentinels = torch.cat([self.buf[: self.start], self.buf[self.end :]])
        assert (sentinels == 7.0).all(), f"{what}: a kernel wrote outside the output"
        assert torch.isfinite(self.t).all(), f"{what}: elements left unwritten (still NaN)"
        return self.t.clone()


def emu_close(what, ours, ref, dtype):
    err = (ours.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err <= EMU_TOL[dtype], (
        f"{what}: max-norm relative error {err:.2e} > {EMU_TOL[dtype]:.0e}"
    )


def ptr(t):
    return None if t is None else t.data_ptr()


def misaligned(t, name, which):
    """t, or where name is `which` a copy of it one
    element past a 16-byte boundary (None stays None)."""
    if t is None or name != which:
        return t
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def emu_ln_forward(emu, variant, x, y, w, b, out_dtype, misalign=None):
    """layer_norm_fwd (y None) or add_layer_norm_fwd through the real launcher: (r or None, out in
    out_dtype, mean, rstd). misalign names the one pointer (x, y, r, out, weight, bias) to put one
    element off 16 bytes."""
    N, C = x.shape
    x, y, w, b = (
        misaligned(t, n, misalign) for t, n in ((x, "x"), (y, "y"), (w, "weight"), (b, "bias"))
    )
    out = Guarded((N, C), out_dtype, offset=int(misalign == "out"))
    r = None if y is None else Guarded((N, C), x.dtype, offset=int(misalign == "r"))
    mean, rstd = Guarded((N,), torch.float32), Guarded((N,), torch.float32)
    assert (
        emu.emu_layer_norm_fwd(
            EMU_DTYPES[x.dtype],
            -1 if y is None else EMU_DTYPES[y.dtype],
            EMU_DTYPES[out_dtype],
            variant,
            ptr(x),
            ptr(y),
            ptr(r),
            ptr(out),
            ptr(w),
            ptr(b),
            ptr(mean),
            ptr(rstd),
            N,
            C,
            EPS,
        )
        == 0
    )
    return (
        None if r is None else r.value("r"),
        out.value("out"),
        mean.value("mean"),
        rstd.value("rstd"),
    )


def emu_ln_backward(emu, variant, dout, x, w, mean, rstd, dr, dy_dtype, misalign=None):
    """layer_norm_bwd through the real launcher: (dx, dy or None, dweight, dbias). misalign as in
    emu_ln_forward, of dout, x, dr, dx, dy or weight."""
    N, C = x.shape
    dout, x, w, dr = (
        misaligned(t, n, misalign) for t, n in ((dout, "dout"), (x, "x"), (w, "weight"), (dr, "dr"))
    )
    dx = Guarded((N, C), x.dtype, offset=int(misalign == "dx"))
    dy = None if dy_dtype is None else Guarded((N, C), dy_dtype, offset=int(misalign == "dy"))
    dw, db = Guarded((C,), torch.float32), Guarded((C,), torch.float32)
    assert (
        emu.emu_layer_norm_bwd(
            EMU_DTYPES[x.dtype],
            EMU_DTYPES[dout.dtype],
            -1 if dy_dtype is None else EMU_DTYPES[dy_dtype],
            variant,
            ptr(dout),
            ptr(x),
            ptr(w),
            ptr(mean),
            ptr(rstd),
            ptr(dr),
            ptr(dx),
            ptr(dy),
            ptr(dw),
            ptr(db),
            N,
            C,
        )
        == 0
    )
    return (
        dx.value("dx"),
        None if dy is None else dy.value("dy"),
        dw.value("dweight"),
        db.value("dbias"),
    )


def ln_inputs(N, C, dtype, ydtype, out_dtype, seed):
    """x (mean 1, so a one-pass variance would cancel),
    y or None, weight, bias, and dout in out's dtype."""
    torch.manual_seed(seed)
    x = (2 * torch.randn(N, C) + 1).to(dtype)
    y = None if ydtype is None else torch.randn(N, C).to(ydtype)
    w, b = 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C)
    return x, y, w, b, torch.randn(N, C).to(out_dtype)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "case",
    [
        (7, 1000, F32, None, F32),
        (7, 1000, BF16, None, BF16),
        (7, 1000, F16, None, F16),
        (9, 1600, BF16, None, BF16),
        (
            33,
            64,
            F32,
            None,
            F32,
        ),  # 16 rows to a block, 3 row groups for 2 blocks: the persistent loop turns
        (5, 37, BF16, None, BF16),  # rows of 74 bytes: the plain kernels
        (1, 768, F32, None, BF16),  # one row, out in the autocast dtype
        (7, 100, F32, None, F16),  # 25 vectors: a partly idle warp
        (7, 768, F32, BF16, BF16),  # the model under bf16 autocast
        (7, 768, F32, BF16, F32),  # the same without out_dtype
        (6, 1002, F32, F16, F16),  # C not a multiple of x's vector width: the plain kernels
        (20, 256, BF16, BF16, BF16),
        (3, 4096, F32, BF16, BF16),  # 1024 vectors, the widest fast row: 1024 threads
        (2, 4100, F32, None, BF16),  # 1025 vectors: the plain kernels
        (
            2,
            8192,
            BF16,
            None,
            BF16,
        ),  # 64 KB of weight and bias: the plain forward, the fast backward (32 KB)
    ],
    ids=lambda c: (
        f"{c[0]}x{c[1]}-{short(c[2])}" + (f"+{short(c[3])}" if c[3] else "") + f"-out_{short(c[4])}"
    ),
)
@pytest.mark.parametrize("variant", [0, 1])
def test_emulated_layer_norm(emu, case, variant):
    """layer_norm_fwd / add_layer_norm_fwd and layer_norm_bwd (with dr, and y's gradient in y's
    dtype where it is not x's, for the fused op), run by the real launchers and kernels on the CPU,
    against float64; outputs NaN-poisoned and fenced. out and dout are in the case's out dtype.
    Where that differs from x's, or y's gradient is asked for, the results are bitwise those of the
    run in x's dtype rounded once: the new dtypes change only the loads and stores, never the fp32
    arithmetic."""
    N, C, dtype, ydtype, odtype = case
    x, y, w, b, dout = ln_inputs(N, C, dtype, ydtype, odtype, seed=N * C + variant)
    r, out, mean, rstd = emu_ln_forward(emu, variant, x, y, w, b, odtype)
    r_ref = (
        x.double() if y is None else (x.double() + y.double()).to(dtype).double()
    )  # r is stored, then normalized
    if r is not None:
        emu_close("r", r, r_ref, dtype)
    emu_close("out", out, F.layer_norm(r_ref, (C,), w.double(), b.double(), EPS), odtype)
    emu_close("mean", mean, r_ref.mean(-1), F32)
    emu_close("rstd", rstd, torch.rsqrt(r_ref.var(-1, unbiased=False) + EPS), F32)

    src = x if r is None else r
    dr = None if y is None else torch.randn(N, C).to(dtype)
    dy_dtype = ydtype if ydtype not in (None, dtype) else None
    dx, dy, dw, db = emu_ln_backward(emu, variant, dout, src, w, mean, rstd, dr, dy_dtype)
    xs = src.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    F.layer_norm(xs, (C,), wd, bd, EPS).backward(dout.double())
    dx_ref = xs.grad + (0 if dr is None else dr.double())
    emu_close("dx", dx, dx_ref, dtype)
    if dy_dtype is not None:
        emu_close("dy", dy, dx_ref, dy_dtype)
    emu_close("dweight", dw, wd.grad, F32)
    emu_close("dbias", db, bd.grad, F32)

    if odtype != dtype:
        r_x, out_x, mean_x, rstd_x = emu_ln_forward(emu, variant, x, y, w, b, dtype)
        assert torch.equal(out, out_x.to(odtype)), (
            "out differs from the kernels' x-dtype out rounded to out's dtype"
        )
        assert (
            torch.equal(mean, mean_x)
            and torch.equal(rstd, rstd_x)
            and (r is None or torch.equal(r, r_x))
        )
    if odtype != dtype or dy_dtype is not None:
        dx_x, _, dw_x, db_x = emu_ln_backward(
            emu, variant, dout.to(dtype), src, w, mean, rstd, dr, None
        )
        assert torch.equal(dx, dx_x) and torch.equal(dw, dw_x) and torch.equal(db, db_x), (
            "the gradients from dout in out's dtype differ "
            "from those from the same values in x's dtype"
        )
        if dy_dtype is not None:
            assert torch.equal(dy, dx.to(dy_dtype)), "dy is not dx rounded once to y's dtype"


def test_emulated_misaligned_data_takes_the_plain_kernels(emu):
    """Each pointer of each op in turn one element past a 16-byte boundary (LayerNorm with the
    model's dtypes under autocast): variant 1's launchers must run the plain kernels (their 128-bit
    accesses would fault on a GPU), so its results are bitwise those of variant 0. With aligned data
    they differ in the last bits (the fast kernels sum in another order, GELU takes another
    formula): the comparison sees which kernels ran."""
    N, C = 5, 200
    x, y, w, b, dout = ln_inputs(N, C, F32, BF16, BF16, seed=0)
    dr = torch.randn(N, C)
    r, _, mean, rstd = emu_ln_forward(emu, 0, x, y, w, b, BF16)

    def layer_norm_fwd(variant, misalign):
        return emu_ln_forward(emu, variant, x, y, w, b, BF16, misalign)

    def layer_norm_bwd(variant, misalign):
        return emu_ln_backward(emu, variant, dout, r, w, mean, rstd, dr, BF16, misalign)

    def gelu(with_bias, backward):  # "out" misaligns dx in the backward
        def run(variant, misalign):
            results = emu_gelu(
                emu, variant, (N, C), F32, with_bias, seed=1, backward=backward, misalign=misalign
            )
            return [t for t in (results[1:] if backward else results[:1]) if t is not None]

        run.__name__ = f"gelu_{'bwd' if backward else 'fwd'}{'+bias' if with_bias else ''}"
        return run

    cases = {
        layer_norm_fwd: ("x", "y", "r", "out", "weight", "bias"),
        layer_norm_bwd: ("dout", "x", "dr", "dx", "dy", "weight"),
        gelu(True, False): ("x", "out", "bias"),
        gelu(True, True): ("dout", "x", "out", "bias"),
        gelu(False, False): ("x", "out"),
        gelu(False, True): ("dout", "x", "out"),
    }
    for run, names in cases.items():
        assert not all(torch.equal(p, f) for p, f in zip(run(0, None), run(1, None))), (
            f"{run.__name__}: aligned, the fast kernels gave the plain ones' results"
        )
        for name in names:
            assert all(torch.equal(p, f) for p, f in zip(run(0, name), run(1, name))), (
                f"{run.__name__} with {name} misaligned: the fast kernels ran"
            )


def test_emulated_launch_shapes(emu):
    """The fast kernels' grids, read off the emulator's launches on a device of 3 SMs where 5 blocks
    of any kernel fit at once: one resident wave (15 blocks) or fewer where there is less work,
    never an assumed blocks-per-SM figure (the GELU grids once took 8 blocks per SM for granted);
    LayerNorm rows of up to 256 vectors two or more to a block; its shared memory weight and bias
    (and the backward's combine); results right."""
    with emu_device(emu, 3, 5):
        for dtype, threads, rows in ((F32, 192, 2), (BF16, 96, 5)):
            for N in (100, 3):
                blocks = min(-(-N // rows), 15)
                x, y, w, b, dout = ln_inputs(N, 768, dtype, BF16, dtype, seed=N)
                r, out, mean, rstd = emu_ln_forward(emu, 1, x, y, w, b, dtype)
                assert emu_launches(emu) == [((blocks, 1), (threads, rows), 2 * 768 * 4)]
                emu_close(
                    "out", out, F.layer_norm(r.double(), (768,), w.double(), b.double(), EPS), dtype
                )
                emu_ln_backward(emu, 1, dout, r, w, mean, rstd, None, None)
                assert emu_launches(emu) == [
                    ((blocks, 1), (threads, rows), 3 * 768 * 4),
                    ((24, 2), (32, 32), 0),
                ]
        # GELU: 200 rows of 16 vectors (one column tile) with bias:
        # 25 row groups of 8 rows, 15 blocks
        for dout in (False, True):
            emu_gelu(emu, 1, (200, 64), F32, True, seed=2, backward=dout)
            assert emu_launches(emu)[0] == ((1, 15), (32, 8), 0)
        # flat: 10,000 vectors are 40 blocks' worth of 256 threads, 15 blocks
        emu_gelu(emu, 1, (40000,), F32, False, seed=3)
        assert emu_launches(emu) == [((15, 1), (256, 1), 0)]


def test_emulated_layer_norm_more_partials_than_a_warp(emu):
    """On a device of 8 SMs x 5 blocks, 1285 rows of 64 (16 to a block) with the model's dtypes: 40
    blocks, each visiting 2 or 3 row groups, and 40 partial sums of dweight/dbias, more than
    sum_partials_kernel's 32 rows of threads take in one turn."""
    N, C = 1285, 64
    x, y, w, b, dout = ln_inputs(N, C, F32, BF16, BF16, seed=4)
    dr = torch.randn(N, C)
    with emu_device(emu, 8, 5):
        r, out, mean, rstd = emu_ln_forward(emu, 1, x, y, w, b, BF16)
        dx, dy, dw, db = emu_ln_backward(emu, 1, dout, r, w, mean, rstd, dr, BF16)
        assert emu_launches(emu)[0][0] == (40, 1)
    emu_close("out", out, F.layer_norm(r.double(), (C,), w.double(), b.double(), EPS), BF16)
    rs = r.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    F.layer_norm(rs, (C,), wd, bd, EPS).backward(dout.double())
    emu_close("dx", dx, rs.grad + dr.double(), F32)
    assert torch.equal(dy, dx.to(BF16))
    emu_close("dweight", dw, wd.grad, F32)
    emu_close("dbias", db, bd.grad, F32)


def emu_gelu(emu, variant, shape, dtype, with_bias, seed, backward=True, misalign=None):
    """gelu_fwd and, with backward, gelu_bwd through the real launchers: (out, dx or None, dbias or
    None), checked against float64. misalign names the one pointer (x, out, dout, bias) to put one
    element off 16 bytes; out stands for dx as well."""
    torch.manual_seed(seed)
    x = (3 * torch.randn(shape)).to(dtype)
    C, n = shape[-1], math.prod(shape)
    bias = 0.5 * torch.randn(C) if with_bias else None
    dout = torch.randn(shape).to(dtype)
    u = x.double() + (0 if bias is None else bias.double())
    x, bias, dout = (
        misaligned(t, name, misalign) for t, name in ((x, "x"), (bias, "bias"), (dout, "dout"))
    )
    out = Guarded(shape, dtype, offset=int(misalign == "out"))
    assert (
        emu.emu_gelu(EMU_DTYPES[dtype], variant, None, ptr(x), ptr(bias), ptr(out), None, n, C) == 0
    )
    out = out.value("out")
    emu_close("out", out, F.gelu(u, approximate="tanh"), dtype)
    if not backward:
        return out, None, None
    dx = Guarded(shape, dtype, offset=int(misalign == "out"))
    dbias = Guarded((C,), torch.float32) if with_bias else None
    assert (
        emu.emu_gelu(
            EMU_DTYPES[dtype], variant, ptr(dout), ptr(x), ptr(bias), ptr(dx), ptr(dbias), n, C
        )
        == 0
    )
    uu = u.clone().requires_grad_()
    F.gelu(uu, approximate="tanh").backward(dout.double())
    dx = dx.value("dx")
    emu_close("dx", dx, uu.grad, dtype)
    if dbias is None:
        return out, dx, None
    dbias = dbias.value("dbias")
    emu_close("dbias", dbias, uu.grad.reshape(-1, C).sum(0), F32)
    return out, dx, dbias


@pytest.mark.parametrize(
    "case",
    [
        ((7, 1000), F32, True),
        ((7, 1000), F32, False),
        ((3, 3072), BF16, True),
        ((3, 3072), BF16, False),
        ((7, 1001), BF16, True),
        ((7, 1001), BF16, False),
        ((2, 5, 64), F16, True),
        ((1, 3072), F32, True),
    ],
    ids=lambda c: "x".join(map(str, c[0])) + f"-{short(c[1])}" + ("+bias" if c[2] else ""),
)
@pytest.mark.parametrize("variant", [0, 1])
def test_emulated_gelu(emu, case, variant):
    """gelu_fwd and gelu_bwd (dx, dbias) through the real launchers and kernels on the CPU, against
    float64: flat with a tail (1001 columns: 7007 elements), with bias on the 2-D tiles, 1001-wide
    bias rows (the plain fallback), one row."""
    shape, dtype, with_bias = case
    emu_gelu(emu, variant, shape, dtype, with_bias, seed=math.prod(shape) + variant)


# -----------------------------------------------------------------------------
# on a GPU: helpers

ROWS = [1, 7, 4097, 65536]
WIDTHS = [768, 1000, 1024, 1600]
ERRORS = WorstErrors("op", "output", "dtype", "var")


@pytest.fixture(scope="module", autouse=True)
def error_table(request):
    """Print the worst error of each op/output/dtype/variant after the GPU tests."""
    yield
    print_after_tests(request.config, ERRORS.lines())


@pytest.fixture
def seed():
    """Fresh random inputs each run; the seed is in every failure message to reproduce it."""
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def check(op, name, ours, ref, torch_lowp, variant, seed, shape):
    """ours against ref (float64 for fp32 inputs, fp32 for 16-bit ones); torch_lowp is PyTorch's own
    result on the 16-bit inputs (None for fp32). Errors are max-norm: max |a - ref|, relative to
    max |ref| for fp32."""
    ours = ours.detach()
    assert torch.isfinite(ours).all(), (
        f"{op} {name}: non-finite values (an element left unwritten, still NaN "
        f"from the poisoning?); seed {seed}"
    )
    ref = ref.detach().double()
    scale = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    if torch_lowp is None:
        ref_err, tol = None, 1e-5 * scale
    else:
        ref_err = (torch_lowp.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
        tol = max(2 * ref_err, 1e-5 * scale)
    ERRORS.record((op, name, short(ours.dtype), variant), shape, err, ref_err, tol)
    assert err <= tol, (
        f"{op} {name} ({short(ours.dtype)}, shape {tuple(shape)}, variant {variant}): max error "
        f"{err:.3e} > tolerance {tol:.3e} (PyTorch's own {short(ours.dtype)} error: {ref_err}); "
        f"seed {seed}"
    )


def reference_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def ln_reference(x, weight, bias, dout, y=None, dr=None, round_to=None):
    """LayerNorm of r = x (+ y) and its gradients (dr, if given, is the gradient arriving at r) with
    PyTorch in x's dtype: (r, out, dx, dy, dweight, dbias). With round_to, PyTorch's 16-bit result
    as it computes one for 16-bit inputs and float32 weights: in fp32, with r rounded to round_to
    before it is normalized (it is stored) and r, out, dx, dy rounded at the end; dweight and dbias
    stay float32, as the weights."""
    x = x.detach().requires_grad_()
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    inputs = [x, weight, bias]
    r = x
    if y is not None:
        y = y.detach().requires_grad_()
        inputs.insert(1, y)
        r = x + y
    if round_to is not None:
        r = r.to(round_to).to(x.dtype)
    out = F.layer_norm(r, (r.size(-1),), weight, bias, EPS)
    outputs, grads_in = [out], [dout.to(out.dtype)]
    if dr is not None:
        outputs.append(r)
        grads_in.append(dr.to(r.dtype))
    grads = list(torch.autograd.grad(outputs, inputs, grads_in))
    if y is None:
        grads.insert(1, None)
    dx, dy, dw, db = grads
    result = [r.detach(), out.detach(), dx, dy]
    if round_to is not None:
        result = [None if t is None else t.to(round_to) for t in result]
    return (*result, dw, db)


# -----------------------------------------------------------------------------
# on a GPU: LayerNorm


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("N", ROWS)
def test_layer_norm(arcana, poison, seed, N, C, dtype, variant):
    """layer_norm_fwd (out, mean, rstd) and layer_norm_bwd (dx, dweight, dbias), weights in float32
    as the model's; x has a non-zero mean so a one-pass variance would show its cancellation."""
    x = (2 * torch.randn(N, C, device="cuda") + 3).to(dtype)
    weight, bias = ln_params(C, "cuda")
    dout = torch.randn(N, C, device="cuda").to(dtype)
    out, mean, rstd = arcana.layer_norm_fwd(x, weight, bias, EPS)
    dx, dw, db, dy = arcana.layer_norm_bwd(dout, x, weight, mean, rstd)

    rd = reference_dtype(dtype)
    _, out_ref, dx_ref, _, dw_ref, db_ref = ln_reference(
        x.to(rd), weight.to(rd), bias.to(rd), dout.to(rd)
    )
    xr = x.to(rd)
    mean_ref = xr.mean(-1)
    rstd_ref = torch.rsqrt(xr.var(-1, unbiased=False) + EPS)
    low = (
        None
        if dtype == torch.float32
        else ln_reference(x.float(), weight, bias, dout.float(), round_to=dtype)
    )
    args = ("layer_norm", variant, seed, (N, C))
    check(args[0], "out", out, out_ref, None if low is None else low[1], *args[1:])
    check(args[0], "mean", mean, mean_ref, None if low is None else mean_ref.float(), *args[1:])
    check(args[0], "rstd", rstd, rstd_ref, None if low is None else rstd_ref.float(), *args[1:])
    check(args[0], "dx", dx, dx_ref, None if low is None else low[2], *args[1:])
    check(args[0], "dweight", dw, dw_ref, None if low is None else low[4], *args[1:])
    check(args[0], "dbias", db, db_ref, None if low is None else low[5], *args[1:])
    assert (out.dtype, dx.dtype, mean.dtype, dw.dtype, dy.shape) == (
        dtype,
        dtype,
        torch.float32,
        torch.float32,
        (0,),
    )


ADD_DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]  # (x, y): the last two as autocast


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
@pytest.mark.parametrize("dtypes", ADD_DTYPES, ids=lambda d: f"{short(d[0])}+{short(d[1])}")
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("N", ROWS)
def test_add_layer_norm(arcana, poison, seed, N, C, dtypes, variant):
    """add_layer_norm_fwd (r, out, mean, rstd) and its backward:
    layer_norm_bwd on r with the incoming dr."""
    xdt, ydt = dtypes
    x = (2 * torch.randn(N, C, device="cuda") + 1).to(xdt)
    y = torch.randn(N, C, device="cuda").to(ydt)
    weight, bias = ln_params(C, "cuda")
    dout = torch.randn(N, C, device="cuda").to(xdt)
    dr = torch.randn(N, C, device="cuda").to(xdt)
    r, out, mean, rstd = arcana.add_layer_norm_fwd(x, y, weight, bias, EPS)
    dx, dw, db, _ = arcana.layer_norm_bwd(dout, r, weight, mean, rstd, dr)

    lowp = xdt != torch.float32
    rd = torch.float32 if lowp else torch.float64
    r_ref, out_ref, dx_ref, _, dw_ref, db_ref = ln_reference(
        x.to(rd), weight.to(rd), bias.to(rd), dout.to(rd), y=y.to(rd), dr=dr.to(rd)
    )
    low = None
    if lowp:
        low = ln_reference(
            x.float(), weight, bias, dout.float(), y=y.float(), dr=dr.float(), round_to=xdt
        )
    args = (f"add_layer_norm[{short(ydt)}]", variant, seed, (N, C))
    check(args[0], "r", r, r_ref, None if low is None else low[0], *args[1:])
    check(args[0], "out", out, out_ref, None if low is None else low[1], *args[1:])
    check(args[0], "dx", dx, dx_ref, None if low is None else low[2], *args[1:])
    check(args[0], "dweight", dw, dw_ref, None if low is None else low[4], *args[1:])
    check(args[0], "dbias", db, db_ref, None if low is None else low[5], *args[1:])
    assert (r.dtype, out.dtype, dx.dtype) == (xdt, xdt, xdt)


OUT_DTYPES = [
    (None, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]  # (y, out)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
@pytest.mark.parametrize(
    "dtypes", OUT_DTYPES, ids=lambda d: f"{'+' + short(d[0]) if d[0] else ''}-out_{short(d[1])}"
)
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("N", ROWS)
def test_layer_norm_out_in_the_autocast_dtype(arcana, poison, seed, N, C, dtypes, variant):
    """x float32 (the residual stream) and out_dtype bf16/fp16, as CudaOps calls them under
    autocast, without and with the fused add of a y in that dtype. out against PyTorch's path,
    F.layer_norm in float32 then the cast the next Linear makes (2x its error against float64), and
    bitwise our own float32 out rounded once. The backward takes dout in out's dtype and gives y's
    gradient in y's dtype: dx, dweight and dbias bitwise those from the same dout in float32, dy
    bitwise that dx rounded once (PyTorch's autograd casts r's gradient for y)."""
    ydt, odt = dtypes
    x = 2 * torch.randn(N, C, device="cuda") + 1
    y = None if ydt is None else torch.randn(N, C, device="cuda").to(ydt)
    dr = None if ydt is None else torch.randn(N, C, device="cuda")
    weight, bias = ln_params(C, "cuda")
    dout = torch.randn(N, C, device="cuda").to(odt)

    def forward(out_dtype):
        if y is None:
            return (None, *arcana.layer_norm_fwd(x, weight, bias, EPS, out_dtype))
        return arcana.add_layer_norm_fwd(x, y, weight, bias, EPS, out_dtype)

    r, out, mean, rstd = forward(odt)
    r32, out32, mean32, rstd32 = forward(None)
    src = x if r is None else r
    dx, dw, db, dy = arcana.layer_norm_bwd(dout, src, weight, mean, rstd, dr, ydt)
    dx32, dw32, db32, _ = arcana.layer_norm_bwd(dout.float(), src, weight, mean, rstd, dr)
    assert (out.dtype, dx.dtype, dy.dtype if ydt else dy.numel()) == (
        odt,
        torch.float32,
        ydt if ydt else 0,
    )
    assert (
        torch.equal(out, out32.to(odt)) and torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
    )
    assert r is None or torch.equal(r, r32)
    assert torch.equal(dx, dx32) and torch.equal(dw, dw32) and torch.equal(db, db32)
    assert ydt is None or torch.equal(dy, dx32.to(ydt))

    def ref(
        dtype,
    ):  # (r, out, dx, dy, dweight, dbias) of PyTorch's LayerNorm in dtype on the same inputs
        return ln_reference(
            x.to(dtype),
            weight.to(dtype),
            bias.to(dtype),
            dout.to(dtype),
            y=None if y is None else y.to(dtype),
            dr=None if dr is None else dr.to(dtype),
        )

    ref64, torch_path = ref(torch.float64), ref(torch.float32)
    name = f"{'add_' if ydt else ''}layer_norm[out {short(odt)}]"
    check(name, "out", out, ref64[1], torch_path[1].to(odt), variant, seed, (N, C))
    check(name, "dx", dx, ref64[2], None, variant, seed, (N, C))
    if ydt is not None:
        check(name, "dy", dy, ref64[2], torch_path[2].to(ydt), variant, seed, (N, C))
    check(name, "dweight", dw, ref64[4], None, variant, seed, (N, C))
    check(name, "dbias", db, ref64[5], None, variant, seed, (N, C))


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
@pytest.mark.parametrize("shape", [(5, 37), (3, 2, 100), (4, 2056), (3, 8192)], ids=str)
def test_layer_norm_shapes_off_the_fast_path(arcana, poison, seed, shape, variant):
    """Rows whose bytes are not a multiple of 16 (C = 37, C = 100 in bf16), 3-D inputs, and rows too
    wide for the fast forward (C = 8192: its weight and bias would take 64 KB of shared memory) or
    for any fast kernel (C = 8192 in fp32) run correctly with either variant (variant 1 falls back
    to the plain kernels)."""
    for dtype in DTYPES:
        x = torch.randn(shape, device="cuda").to(dtype)
        C = shape[-1]
        weight, bias = ln_params(C, "cuda")
        dout = torch.randn(shape, device="cuda").to(dtype)
        out, mean, rstd = arcana.layer_norm_fwd(x, weight, bias, EPS)
        dx, dw, db, _ = arcana.layer_norm_bwd(dout, x, weight, mean, rstd)
        rd = reference_dtype(dtype)
        _, out_ref, dx_ref, _, dw_ref, db_ref = ln_reference(
            x.to(rd), weight.to(rd), bias.to(rd), dout.to(rd)
        )
        low = (
            None
            if dtype == torch.float32
            else ln_reference(x.float(), weight, bias, dout.float(), round_to=dtype)
        )
        assert mean.shape == shape[:-1]
        for name, ours, ref, i in (
            ("out", out, out_ref, 1),
            ("dx", dx, dx_ref, 2),
            ("dweight", dw, dw_ref, 4),
            ("dbias", db, db_ref, 5),
        ):
            check(
                "layer_norm[odd]",
                name,
                ours,
                ref,
                None if low is None else low[i],
                variant,
                seed,
                shape,
            )


@pytest.mark.cuda
def test_layer_norm_weights_in_low_precision(arcana, poison, seed):
    """weight and bias in the input's dtype
    (a model cast with .to(bfloat16)): gradients come back in it."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(4097, 768, device="cuda").to(dtype)
        weight, bias = ln_params(768, "cuda", dtype)
        dout = torch.randn(4097, 768, device="cuda").to(dtype)
        out, mean, rstd = arcana.layer_norm_fwd(x, weight, bias, EPS)
        dx, dw, db, _ = arcana.layer_norm_bwd(dout, x, weight, mean, rstd)
        _, out_ref, dx_ref, _, dw_ref, db_ref = ln_reference(
            x.float(), weight.float(), bias.float(), dout.float()
        )
        low = ln_reference(x, weight, bias, dout)  # PyTorch's LayerNorm all in 16 bits
        assert (dw.dtype, db.dtype) == (dtype, dtype)
        for name, ours, ref, i in (
            ("out", out, out_ref, 1),
            ("dx", dx, dx_ref, 2),
            ("dweight", dw, dw_ref, 4),
            ("dbias", db, db_ref, 5),
        ):
            check("layer_norm[w16]", name, ours, ref, low[i], 1, seed, (4097, 768))


# -----------------------------------------------------------------------------
# on a GPU: GELU


def gelu_reference(x, bias, dout):
    """GELU of x (+ bias) and its gradients in x's dtype: (out, dx, dbias)."""
    x = x.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    out = F.gelu(x if b is None else x + b, approximate="tanh")
    grads = torch.autograd.grad(out, [x] + ([b] if b is not None else []), dout.to(out.dtype))
    return out.detach(), grads[0], grads[1] if b is not None else None


def gelu_torch_lowp(x, bias, dout):
    """PyTorch's 16-bit version as the model runs it: under autocast the bias is added in the matmul
    and u rounded to x's dtype; GELU and its gradient in that dtype; dbias is the sum of the 16-bit
    gradients."""
    u = x if bias is None else (x.float() + bias.float()).to(x.dtype)
    out = F.gelu(u, approximate="tanh")
    dx = torch.ops.aten.gelu_backward(dout, u, approximate="tanh")
    dbias = None if bias is None else dx.reshape(-1, dx.size(-1)).sum(0).float()
    return out, dx, dbias


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("C", WIDTHS + [3072])
@pytest.mark.parametrize("N", ROWS)
def test_gelu(arcana, poison, seed, N, C, dtype, with_bias, variant):
    """gelu_fwd and gelu_bwd (dx, dbias) with the bias in float32 as the model's c_fc.bias."""
    x = (3 * torch.randn(N, C, device="cuda")).to(dtype)
    bias = 0.5 * torch.randn(C, device="cuda") if with_bias else None
    dout = torch.randn(N, C, device="cuda").to(dtype)
    out = arcana.gelu_fwd(x, bias)
    dx, dbias = arcana.gelu_bwd(dout, x, bias)

    rd = reference_dtype(dtype)
    out_ref, dx_ref, db_ref = gelu_reference(
        x.to(rd), None if bias is None else bias.to(rd), dout.to(rd)
    )
    low = None if dtype == torch.float32 else gelu_torch_lowp(x, bias, dout)
    args = ("gelu+bias" if with_bias else "gelu", variant, seed, (N, C))
    check(args[0], "out", out, out_ref, None if low is None else low[0], *args[1:])
    check(args[0], "dx", dx, dx_ref, None if low is None else low[1], *args[1:])
    if with_bias:
        check(args[0], "dbias", dbias, db_ref, None if low is None else low[2], *args[1:])
        assert dbias.dtype == torch.float32
    else:
        assert dbias.shape == (0,)
    assert (out.dtype, dx.dtype) == (dtype, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
def test_gelu_shapes_off_the_fast_path(arcana, poison, seed, variant):
    """A flat tail (numel not a multiple of 8), a misaligned view (offset by one element), a bias
    row of 1001 (not a multiple of 8), and a 3-D input all run correctly."""
    base = torch.randn(7 * 1001 + 1, device="cuda")
    cases = [
        (base[: 7 * 1001].view(7, 1001), False),
        (base[1:].view(7, 1001), False),
        (base[1:].view(7, 1001), True),
        (torch.randn(2, 9, 3072, device="cuda"), True),
    ]
    for x32, with_bias in cases:
        for dtype in DTYPES:
            x = x32.to(dtype) if dtype != torch.float32 else x32
            C = x.size(-1)
            bias = 0.5 * torch.randn(C, device="cuda") if with_bias else None
            dout = torch.randn(x.shape, device="cuda").to(dtype)
            out = arcana.gelu_fwd(x, bias)
            dx, dbias = arcana.gelu_bwd(dout, x, bias)
            rd = reference_dtype(dtype)
            out_ref, dx_ref, db_ref = gelu_reference(
                x.to(rd), None if bias is None else bias.to(rd), dout.to(rd)
            )
            low = None if dtype == torch.float32 else gelu_torch_lowp(x, bias, dout)
            name = f"gelu[odd{'+bias' if with_bias else ''}]"
            check(
                name, "out", out, out_ref, None if low is None else low[0], variant, seed, x.shape
            )
            check(name, "dx", dx, dx_ref, None if low is None else low[1], variant, seed, x.shape)
            if with_bias:
                check(
                    name,
                    "dbias",
                    dbias,
                    db_ref,
                    None if low is None else low[2],
                    variant,
                    seed,
                    x.shape,
                )


# -----------------------------------------------------------------------------
# on a GPU: registration, input checks, determinism


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1], indirect=True)
def test_opcheck(arcana, variant):
    """torch.library.opcheck: schema, autograd registration,
    fake tensors and AOT dispatch of every op."""
    N, C = 7, 1000
    for dtype in DTYPES:
        x = torch.randn(N, C, device="cuda").to(dtype).requires_grad_()
        w, b = ln_params(C, "cuda", requires_grad=True)
        ydt = torch.bfloat16 if dtype == torch.float32 else dtype
        y = torch.randn(N, C, device="cuda").to(ydt).requires_grad_()
        torch.library.opcheck(arcana.layer_norm_fwd.default, (x, w, b, EPS))
        torch.library.opcheck(arcana.add_layer_norm_fwd.default, (x, y, w, b, EPS))
        torch.library.opcheck(arcana.layer_norm_fwd.default, (x, w, b, EPS, ydt))
        torch.library.opcheck(arcana.add_layer_norm_fwd.default, (x, y, w, b, EPS, ydt))
        _, mean, rstd = arcana.layer_norm_fwd(x.detach(), w.detach(), b.detach(), EPS)
        d = torch.randn(N, C, device="cuda").to(dtype)
        torch.library.opcheck(
            arcana.layer_norm_bwd.default, (d, x.detach(), w.detach(), mean, rstd, d)
        )
        torch.library.opcheck(
            arcana.layer_norm_bwd.default, (d.to(ydt), x.detach(), w.detach(), mean, rstd, d, ydt)
        )
        fb = torch.randn(C, device="cuda", requires_grad=True)
        torch.library.opcheck(arcana.gelu_fwd.default, (x, fb))
        torch.library.opcheck(arcana.gelu_fwd.default, (x, None))
        torch.library.opcheck(arcana.gelu_bwd.default, (d, x.detach(), fb.detach()))
        torch.library.opcheck(arcana.gelu_bwd.default, (d, x.detach(), None))


@pytest.mark.cuda
def test_bad_inputs_get_clear_errors(arcana):
    x = torch.randn(8, 64, device="cuda")
    w, b = ln_params(64, "cuda")
    cases = [
        (
            lambda: arcana.layer_norm_fwd(x.double(), w, b, EPS),
            r"x has dtype Double; expected float32, bfloat16",
        ),
        (lambda: arcana.layer_norm_fwd(x.t(), w, b, EPS), r"x must be contiguous"),
        (lambda: arcana.layer_norm_fwd(x, w[:32], b, EPS), r"weight must have shape \(64,\)"),
        (lambda: arcana.layer_norm_fwd(x, w, b.cpu(), EPS), r"bias must be a CUDA tensor, got cpu"),
        (
            lambda: arcana.add_layer_norm_fwd(x.bfloat16(), x, w, b, EPS),
            r"y of dtype Float does not go with x of dtype BFloat16; "
            r"it must be x's dtype, or x must be float32",
        ),
        (
            lambda: arcana.layer_norm_fwd(x.half(), w, b, EPS, torch.bfloat16),
            r"out_dtype BFloat16 does not go with x of dtype Half",
        ),
        (
            lambda: arcana.layer_norm_fwd(x, w, b, EPS, torch.float64),
            r"out_dtype Double is not float32, bfloat16",
        ),
        (
            lambda: arcana.add_layer_norm_fwd(x, x[:4], w, b, EPS),
            r"y has shape \[4, 64\] but x has shape",
        ),
        (
            lambda: arcana.layer_norm_bwd(x, x, w, x[:, 0].contiguous(), x[:4, 0].contiguous()),
            r"rstd must hold one value per row of x \(8\)",
        ),
        (
            lambda: arcana.layer_norm_bwd(
                x, x.half(), w, x[:, 0].contiguous(), x[:, 0].contiguous()
            ),
            r"dout of dtype Float does not go with x of dtype Half",
        ),
        (
            lambda: arcana.layer_norm_bwd(
                x, x, w, x[:, 0].contiguous(), x[:, 0].contiguous(), x.half()
            ),
            r"dr has dtype Half, expected Float \(the gradient of r has r's dtype, which is x's\)",
        ),
        (
            lambda: arcana.layer_norm_bwd(
                x.half(),
                x.half(),
                w,
                x[:, 0].contiguous(),
                x[:, 0].contiguous(),
                None,
                torch.float32,
            ),
            r"dy_dtype Float does not go with x of dtype Half",
        ),
        (lambda: arcana.gelu_fwd(x, w[:10]), r"bias must have shape \(64,\)"),
        (lambda: arcana.gelu_bwd(x.half(), x), r"dout .* must have x's shape and dtype"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.cuda
def test_backward_reductions_are_deterministic(arcana):
    """dweight, dbias (LayerNorm, in bf16 and in the model's autocast dtypes) and dbias (GELU) come
    from fixed-order sums: bitwise equal run to run."""
    w, b = ln_params(768, "cuda")
    for x, dout, dr, dy_dtype in (
        (torch.randn(65536, 768, device="cuda", dtype=torch.bfloat16),) * 2 + (None, None),
        (
            torch.randn(65536, 768, device="cuda"),
            torch.randn(65536, 768, device="cuda", dtype=torch.bfloat16),
            torch.randn(65536, 768, device="cuda"),
            torch.bfloat16,
        ),
    ):
        _, mean, rstd = arcana.layer_norm_fwd(x, w, b, EPS)
        first = arcana.layer_norm_bwd(dout, x, w, mean, rstd, dr, dy_dtype)
        second = arcana.layer_norm_bwd(dout, x, w, mean, rstd, dr, dy_dtype)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    u = torch.randn(16384, 3072, device="cuda", dtype=torch.bfloat16)
    fb = torch.randn(3072, device="cuda")
    assert torch.equal(arcana.gelu_bwd(u, u, fb)[1], arcana.gelu_bwd(u, u, fb)[1])


# -----------------------------------------------------------------------------
# on a GPU: the model


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=short)
def test_cuda_ops_match_torch_ops_under_autocast(arcana, seed, dtype):
    """CudaOps against TorchOps with the model's dtypes under autocast: the float32 residual stream,
    16-bit branch outputs and MLP activations. LayerNorm outputs come in the autocast dtype,
    TorchOps's float32 ones as the Linear after them rounds them; r stays float32. Through those
    Linears and back: x's gradient in float32, y's in y's dtype, the LayerNorm weights' in float32,
    all as TorchOps's, and no cast kernel (aten::_to_copy) anywhere, where TorchOps runs one each
    way at each LayerNorm."""
    C = 768
    ln = torch.nn.LayerNorm(C).cuda()
    fc = torch.nn.Linear(C, 4 * C).cuda()
    with torch.no_grad():
        ln.weight.normal_(1, 0.1)
        ln.bias.normal_(0, 0.1)
        fc.bias.normal_(0, 0.1)
    x = torch.randn(4, 64, C, device="cuda", requires_grad=True)
    y = torch.randn(4, 64, C, device="cuda", dtype=dtype, requires_grad=True)
    m = (torch.randn(C, C, device="cuda") / C**0.5).to(
        dtype
    )  # the next Linear's weight, as autocast has it
    douts = [torch.randn(4, 64, C, device="cuda", dtype=t) for t in (dtype, torch.float32, dtype)]

    def layer_norms(ops):
        """h1 = LN(x), (r, h2) = (x + y, LN(x + y)) and the
        gradients through h1 @ m, r and h2 @ m, profiled."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.autocast("cuda", dtype=dtype):
                h1 = ops.layer_norm(x, ln)
                r, h2 = ops.add_layer_norm(x, y, ln)
                outputs = [F.linear(h1, m), r, F.linear(h2, m)]
            grads = torch.autograd.grad(outputs, [x, y, ln.weight, ln.bias], douts)
        casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        return [h1, r, h2, *grads], casts

    (h1, r, h2, dx, dy, dw, db), casts = layer_norms(NormGeluOps())
    (h1_ref, r_ref, h2_ref, dx_ref, dy_ref, dw_ref, db_ref), casts_ref = layer_norms(
        train_gpt.TorchOps()
    )
    assert casts == 0 and casts_ref >= 4, (
        f"casts: {casts} with the kernels, {casts_ref} with PyTorch's ops"
    )
    assert (h1.dtype, r.dtype, h2.dtype, dx.dtype, dy.dtype, dw.dtype) == (
        dtype,
        torch.float32,
        dtype,
        torch.float32,
        dtype,
        torch.float32,
    )
    msg = lambda m: f"{m} (seed {seed})"  # noqa: E731
    for ours, ref in (
        (h1, h1_ref),
        (h2, h2_ref),
        (dy, dy_ref),
    ):  # the same fp32 values to within a 16-bit ulp
        torch.testing.assert_close(ours, ref.to(dtype), atol=2e-2, rtol=2e-2, msg=msg)
    for ours, ref in ((r, r_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=msg)
    with torch.autocast("cuda", dtype=dtype):
        g, g_ref = NormGeluOps().linear_gelu(x, fc), train_gpt.TorchOps().linear_gelu(x, fc)
    assert (g.dtype, g.shape) == (g_ref.dtype, g_ref.shape)
    torch.testing.assert_close(g, g_ref, atol=2e-2, rtol=2e-2, msg=msg)


def grads_close(model_a, model_b, rtol):
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        err = (pa.grad.float() - pb.grad.float()).norm().item()
        scale = pb.grad.float().norm().item()
        assert err <= rtol * scale + 1e-6, (
            f"{name}: gradient differs by {err:.3e} (norm {scale:.3e})"
        )


@pytest.mark.cuda
def test_compiled_model_with_kernels_matches_eager_torch(arcana, seed):
    """A torch.compile(fullgraph=True) GPT with the kernels, forward and backward under bf16
    autocast, against the eager PyTorch model with the same weights."""
    torch._dynamo.reset()
    mc = train_gpt.GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=4, n_embd=256)
    ref = train_gpt.GPT(mc, train_gpt.TorchOps()).cuda()
    model = train_gpt.GPT(mc, NormGeluOps()).cuda()
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    targets = torch.randint(0, 50257, (4, 128), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(idx, targets)
        _, loss_ref = ref(idx, targets)
    loss.backward()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-2 * abs(loss_ref.item()), f"seed {seed}"
    grads_close(model, ref, rtol=5e-2)


@pytest.mark.cuda
def test_training_with_kernels_matches_torch(arcana, tmp_path, seed):
    """50 steps of the tiny model: the loss curve with --kernels cuda follows --kernels torch within
    bf16 tolerance (2% per step, the drift of 50 steps of bf16 rounding differences), and it goes
    down."""
    data = str(tmp_path / "data")
    write_shards(
        data, seed, vocab=1000, period=97, n_train=40000, n_val=8192
    )  # small: 97 tokens repeated
    args = [
        "--model",
        "tiny",
        "--device",
        "cuda",
        "--data_dir",
        data,
        "--max_steps",
        "50",
        "--warmup_steps",
        "10",
        "--batch_size",
        "4",
        "--block_size",
        "128",
        "--total_batch_size",
        "1024",
        "--val_every",
        "0",
        "--hellaswag_every",
        "0",
        "--sample_every",
        "0",
        "--checkpoint_every",
        "0",
    ]
    cuda = train_losses(args, str(tmp_path / "cuda"), "cuda", timeout=600)
    ref = train_losses(args, str(tmp_path / "torch"), "torch", timeout=600)
    assert len(cuda) == len(ref) == 50
    worst = max(abs(a - b) / b for a, b in zip(cuda, ref))
    assert worst <= 2e-2, (
        f"loss curves differ by up to {100 * worst:.2f}%:\ncuda  {cuda}\ntorch {ref}"
    )
    assert ref[-1] < ref[0] - 1.0, f"the loss did not go down: {ref}"
