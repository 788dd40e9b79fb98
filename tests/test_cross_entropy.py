"""The fused softmax/cross-entropy/dlogits kernel (csrc/cross_entropy.cu,
torch.ops.arcana.cross_entropy_fwd_bwd) and the chunked lm_head loss that calls it
(csrc/__init__.py: lm_head_loss_op, CudaOps.lm_head_loss).

Three parts:
- CPU: the schema, the fake implementation (meta and fake tensors, torch.compile), the clear error
  for CPU tensors, CudaOps.lm_head_loss's choice of path. Needs the built extension: skipped without
  it, failed without it when ARCANA_REQUIRE_KERNELS=1 (CI).
- CPU emulation: tests/cross_entropy_emu.cpp compiles the kernels and the launcher for the CPU
  (threads as OS threads, shuffles and barriers emulated) and runs every variant, both vector widths
  and both places the row is kept between the sweeps, on small shapes, built for sm_90 and for sm_86
  (the other branch of the fast kernel's launch bounds); needs only g++ and the CUDA headers.
- GPU (marker cuda): every variant (torch.ops.arcana._set_variant, set by the `variant` fixture)
  against a float64 reference for fp32/bf16/fp16 at V = 50304, 50257, 1000, 7 and 1, 7, 4097 rows
  with -1 targets mixed in and the outputs poisoned with NaN; out-of-range targets, misaligned rows,
  input checks, determinism, opcheck; the chunked loss against F.cross_entropy on the full logits; a
  model step with the kernel against TorchOps; the peak memory of a d12-sized loss; and the loss
  curve of a 200-step d12 run with --kernels cuda against --kernels torch. A table of the worst
  errors is printed at the end.

Tolerances: losses (fp32 whatever the input dtype) and fp32 dlogits within 1e-5 of the largest
reference value; bf16/fp16 dlogits within twice the error of cross_entropy_rows (PyTorch's fp32
softmax rounded once to 16 bits, the path the kernel replaces), against the same float64 reference.
"""

import ctypes
import math
import random

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import (
    ARCHS,
    WorstErrors,
    build_emulator,
    print_after_tests,
    require_kernels,
    short,
    train_losses,
    write_shards,
)

import train_gpt
from train_gpt import TorchOps

SCHEMA = (
    "arcana::cross_entropy_fwd_bwd(Tensor logits, Tensor targets, Tensor grad_scale, "
    "bool compute_grad) -> (Tensor losses, Tensor dlogits)"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(logits, targets, grad_scale, dtype=torch.float64):
    """(losses, dlogits) computed in dtype from the logits as given (16-bit values upcast exactly).
    In float32, with dlogits rounded to the logits' dtype, it stands in for csrc.cross_entropy_rows
    (the PyTorch path the kernel replaces) in the emulator tests, which run without the
    extension."""
    x = logits.to(dtype)
    valid = targets != -1
    safe = targets.clamp(min=0)
    lse = torch.logsumexp(x, dim=-1)
    losses = torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], 0.0)
    grad = torch.softmax(x, dim=-1)
    grad[torch.arange(len(targets), device=x.device), safe] -= 1.0
    grad *= (valid.to(dtype) * grad_scale)[:, None]
    return losses, grad


def random_case(n, V, dtype, device, seed):
    """Peaked logits like a trained model's (a few large, most small), targets -1 in rows 1, 6, 11,
    ... and otherwise drawn half from the likely tokens; grad_scale as the chunked loss passes it:
    1 / counted rows, a one-element fp32 tensor on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, V, generator=gen, device=device) * 2.0
    hot = torch.randint(0, V, (n, 4), generator=gen, device=device)
    logits.scatter_add_(1, hot, torch.full((n, 4), 8.0, device=device))
    targets = torch.randint(0, V, (n,), generator=gen, device=device)
    likely = torch.rand(n, generator=gen, device=device) < 0.5
    targets = torch.where(likely, hot[:, 0], targets)
    targets[1::5] = -1
    grad_scale = 1.0 / (targets != -1).sum().clamp(min=1).float()
    return logits.to(dtype), targets, grad_scale


# -----------------------------------------------------------------------------
# without a GPU


def test_schema(arcana):
    assert str(arcana.cross_entropy_fwd_bwd.default._schema) == SCHEMA


@pytest.mark.parametrize("dtype", DTYPES, ids=short)
def test_fake_shapes_on_meta(arcana, dtype):
    logits = torch.empty(6, 50304, device="meta", dtype=dtype)
    targets = torch.empty(6, device="meta", dtype=torch.long)
    scale = torch.empty((), device="meta")
    losses, dlogits = arcana.cross_entropy_fwd_bwd(logits, targets, scale, True)
    assert (losses.shape, losses.dtype) == ((6,), torch.float32)
    assert (dlogits.shape, dlogits.dtype, dlogits.is_contiguous()) == ((6, 50304), dtype, True)
    losses, dlogits = arcana.cross_entropy_fwd_bwd(logits, targets, scale, False)
    assert (losses.shape, dlogits.shape, dlogits.dtype) == ((6,), (0,), dtype)


def test_fake_in_fake_tensor_mode_and_compile(arcana):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        losses, dlogits = arcana.cross_entropy_fwd_bwd(
            torch.empty(3, 7, dtype=torch.bfloat16),
            torch.empty(3, dtype=torch.long),
            torch.ones(()),
            True,
        )
    assert (losses.shape, dlogits.shape, dlogits.dtype) == ((3,), (3, 7), torch.bfloat16)

    def loss_and_grad(logits, targets):
        scale = 1.0 / (targets != -1).sum().clamp(min=1).float()  # as lm_head_loss_op computes it
        losses, dlogits = torch.ops.arcana.cross_entropy_fwd_bwd(logits, targets, scale, True)
        return losses.sum(), dlogits * 2

    torch._dynamo.reset()
    compiled = torch.compile(loss_and_grad, backend="aot_eager", fullgraph=True)
    loss, d = compiled(
        torch.empty(5, 11, device="meta"), torch.empty(5, device="meta", dtype=torch.long)
    )
    assert (loss.shape, d.shape) == ((), (5, 11))


def test_cpu_tensors_get_the_clear_error(arcana):
    with pytest.raises(
        RuntimeError,
        match=r"arcana::cross_entropy_fwd_bwd: logits must be a CUDA tensor, got cpu; "
        r"move it with \.cuda\(\) or use --kernels torch",
    ):
        arcana.cross_entropy_fwd_bwd(
            torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(()), True
        )


def test_cuda_ops_loss_paths(monkeypatch):
    """CudaOps.lm_head_loss: the chunked kernel path, without logits, for bf16 and fp32; the
    full-logits PyTorch path under fp16 autocast, whose GradScaler factor comes too late for dlogits
    stored in fp16. (The chunked call is replaced here: only the choice is tested.)"""
    csrc = require_kernels()
    calls = []
    monkeypatch.setattr(
        csrc,
        "chunked_lm_head_loss",
        lambda h, weight, targets, use_kernel=False: calls.append((h.dtype, use_kernel)) or 0.0,
    )
    ops = csrc.CudaOps(TorchOps())
    h, weight = torch.randn(2, 8, 16), torch.randn(100, 16)
    targets = torch.randint(0, 100, (2, 8))
    for dtype in (torch.float32, torch.bfloat16):
        assert ops.lm_head_loss(h.to(dtype), weight.to(dtype), targets) == (None, 0.0)
    assert calls == [(torch.float32, True), (torch.bfloat16, True)]
    # CudaOps reads the autocast of the tensors' device
    with torch.autocast("cpu", dtype=torch.float16):
        logits, loss = ops.lm_head_loss(h, weight, targets)
    assert logits.shape == (2, 8, 100) and torch.isfinite(loss) and len(calls) == 2


# -----------------------------------------------------------------------------
# CPU emulation of the kernels


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """emulators(arch): tests/cross_entropy_emu.cpp built with g++ for architecture arch (ARCHS)
    into a shared library, loaded with ctypes; each architecture built once."""
    libs = {}

    def get(arch):
        if arch not in libs:
            lib = build_emulator(tmp_path_factory, "cross_entropy_emu.cpp", arch=ARCHS[arch])
            P, I, L, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
            lib.emu_cross_entropy.argtypes = [I, I, I, I, P, P, P, P, L, I, Fl]
            lib.emu_cross_entropy.restype = I
            libs[arch] = lib
        return libs[arch]

    return get


@pytest.fixture(scope="module")
def emu(emulators):
    """The emulator built for the H100 (sm_90)."""
    return emulators("sm90")


GUARD = 64  # elements after dlogits that must stay untouched


def emu_run(lib, logits, targets, grad_scale, compute_grad, variant, row_fits, offset=0):
    """The launcher on the CPU: (losses, dlogits or None). offset > 0 shifts the logits by that many
    elements from a 16-byte boundary (the launcher then takes the scalar path, as it would on the
    GPU)."""
    n, V = logits.shape
    store = torch.empty(n * V + offset, dtype=logits.dtype)
    x = store[offset:].view(n, V)
    x.copy_(logits)
    vec = V % (16 // logits.element_size()) == 0 and x.data_ptr() % 16 == 0
    losses = torch.full((n,), float("nan"))
    out = torch.full((n * V + GUARD,), float("nan"), dtype=logits.dtype)
    out[n * V :] = 3.0
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[logits.dtype]
    rc = lib.emu_cross_entropy(
        code,
        variant,
        int(vec),
        int(row_fits),
        x.data_ptr(),
        targets.data_ptr(),
        losses.data_ptr(),
        out.data_ptr() if compute_grad else None,
        n,
        V,
        ctypes.c_float(float(grad_scale)),
    )
    assert rc == 0
    assert (out[n * V :] == 3.0).all(), "the kernel wrote past the end of dlogits"
    if not compute_grad:
        assert out[: n * V].isnan().all(), "dlogits written without compute_grad"
    return losses, out[: n * V].view(n, V) if compute_grad else None


# (variant, what variant 1 is told about shared memory): the plain kernel, the fast kernel with the
# row in shared memory, the fast kernel re-reading it (variant 1 where it does not fit, and
# variant 2)
EMU_PATHS = [(0, True), (1, True), (1, False), (2, True)]


# small rows in every dtype, GPT-2-sized ones (1024 threads per block) in fp32 and bf16
# (emulation time), built for sm_90; and on sm_86, whose fast kernel asks one resident block per SM,
# not two (sm_80's build is sm_90's)
EMU_CASES = (
    [(n, V, dtype, "sm90") for n, V in [(3, 7), (6, 1000), (2, 4100)] for dtype in DTYPES]
    + [
        (n, V, dtype, "sm90")
        for n, V in [(3, 50257), (2, 50304)]
        for dtype in (torch.float32, torch.bfloat16)
    ]
    + [(6, 1000, torch.bfloat16, "sm86"), (2, 50304, torch.bfloat16, "sm86")]
)


@pytest.mark.parametrize(
    "n,V,dtype,arch", EMU_CASES, ids=lambda v: short(v) if isinstance(v, torch.dtype) else str(v)
)
def test_emulated_kernels_match_reference(emulators, n, V, dtype, arch):
    emu = emulators(arch)
    seed = n * 100003 + V
    logits, targets, grad_scale = random_case(n, V, dtype, "cpu", seed)
    ref_losses, ref_grad = reference(logits, targets, grad_scale)
    torch_grad = reference(logits, targets, grad_scale, torch.float32)[1].to(dtype)
    grad_tol = max(
        2 * (torch_grad.double() - ref_grad).abs().max().item(), 1e-5 * ref_grad.abs().max().item()
    )
    for variant, fits in EMU_PATHS:
        losses, grad = emu_run(emu, logits, targets, grad_scale, True, variant, fits)
        what = f"variant {variant} (row in shared memory: {fits and variant == 1}), seed {seed}"
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all(), (
            f"unwritten outputs, {what}"
        )
        assert (losses[targets == -1] == 0).all() and (grad[targets == -1] == 0).all(), what
        loss_err = (losses.double() - ref_losses).abs().max().item()
        assert loss_err <= 1e-5 * ref_losses.abs().max().item(), (
            f"loss error {loss_err:.3e}, {what}"
        )
        grad_err = (grad.double() - ref_grad).abs().max().item()
        assert grad_err <= grad_tol, f"dlogits error {grad_err:.3e} > {grad_tol:.3e}, {what}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=short)
def test_emulated_misaligned_rows_and_no_grad(emu, dtype):
    """Rows that start off a 16-byte boundary take the scalar path;
    compute_grad=False writes losses only."""
    logits, targets, grad_scale = random_case(4, 1024, dtype, "cpu", 7)
    ref_losses, ref_grad = reference(logits, targets, grad_scale)
    for variant, fits in EMU_PATHS:
        losses, grad = emu_run(emu, logits, targets, grad_scale, True, variant, fits, offset=1)
        assert (
            losses.double() - ref_losses
        ).abs().max().item() <= 1e-5 * ref_losses.abs().max().item()
        assert (grad.double() - ref_grad).abs().max().item() <= 1e-2 * grad_scale.item()
        no_grad_losses, _ = emu_run(emu, logits, targets, grad_scale, False, variant, fits)
        assert torch.equal(no_grad_losses, losses)  # sweep 1 is the same with or without a gradient


def test_emulated_out_of_range_targets(emu):
    """A target outside [-1, V) gives a NaN loss and NaN dlogits for its row only, and no access
    outside the buffers; -1 gives 0."""
    logits, _, _ = random_case(5, 40, torch.float32, "cpu", 3)
    targets = torch.tensor([3, -2, 40, -1, 10**12])
    for variant, fits in EMU_PATHS:
        losses, grad = emu_run(emu, logits, targets, 1.0, True, variant, fits)
        assert torch.isfinite(losses[0]) and losses[3] == 0 and (grad[3] == 0).all()
        for row in (1, 2, 4):
            assert losses[row].isnan() and grad[row].isnan().all(), (variant, row)
        assert torch.isfinite(grad[0]).all()


def test_emulated_extreme_logits(emu):
    """-inf logits (masked tokens) are ignored; a row of one finite value and -inf elsewhere has
    loss 0 at that value; NaN in a row makes its loss NaN (as PyTorch)."""
    V = 64
    logits = torch.randn(3, V)
    logits[0, 5:] = -math.inf
    logits[1, :] = -math.inf
    logits[1, 9] = 2.5
    logits[2, 17] = math.nan
    targets = torch.tensor([2, 9, 0])
    for variant, fits in EMU_PATHS:
        losses, grad = emu_run(emu, logits, targets, 1.0, True, variant, fits)
        ref = torch.logsumexp(logits[0], 0) - logits[0, 2]
        assert abs(losses[0].item() - ref.item()) < 1e-5 and (grad[0, 5:] == 0).all()
        assert abs(losses[1].item()) < 1e-6 and abs(grad[1]).max().item() < 1e-6
        assert losses[2].isnan()


# -----------------------------------------------------------------------------
# on a GPU: the kernel

ERRORS = WorstErrors("op", "dtype", "var", "output")


@pytest.fixture(scope="module", autouse=True)
def error_table(request):
    """Print the worst error of each dtype/variant/output after the GPU tests."""
    yield
    print_after_tests(request.config, ERRORS.lines())


def record(dtype, variant, out, shape, err, ref_err, tol):
    """The result in the table; True when err is within tol."""
    return ERRORS.record(("cross_entropy", short(dtype), variant, out), shape, err, ref_err, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=short)
@pytest.mark.parametrize("V", [50304, 50257, 1000, 7])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_kernel_matches_reference(arcana, poison, n, V, dtype, variant):
    seed = random.randrange(2**31)
    logits, targets, grad_scale = random_case(n, V, dtype, "cuda", seed)
    ref_losses, ref_grad = reference(logits, targets, grad_scale)
    losses, grad = arcana.cross_entropy_fwd_bwd(logits, targets, grad_scale, True)
    assert (losses.dtype, losses.shape, grad.dtype, grad.shape) == (
        torch.float32,
        (n,),
        dtype,
        (n, V),
    )
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all(), (
        f"unwritten outputs; seed {seed}"
    )
    loss_err = (losses.double() - ref_losses).abs().max().item()
    loss_tol = 1e-5 * ref_losses.abs().max().item()
    assert record(dtype, variant, "losses", (n, V), loss_err, None, loss_tol), (
        f"loss error {loss_err:.3e} > {loss_tol:.3e}; seed {seed}"
    )
    grad_err = (grad.double() - ref_grad).abs().max().item()
    scale = ref_grad.abs().max().item()
    if dtype == torch.float32:
        torch_err, grad_tol = None, 1e-5 * scale
    else:
        _, torch_grad = require_kernels().cross_entropy_rows(logits, targets, grad_scale, True)
        torch_err = (torch_grad.double() - ref_grad).abs().max().item()
        grad_tol = max(2 * torch_err, 1e-5 * scale)
    assert record(dtype, variant, "dlogits", (n, V), grad_err, torch_err, grad_tol), (
        f"dlogits error {grad_err:.3e} > {grad_tol:.3e} (PyTorch's own: {torch_err}); seed {seed}"
    )
    # without the gradient: the same losses, an empty dlogits
    no_grad_losses, empty = arcana.cross_entropy_fwd_bwd(logits, targets, grad_scale, False)
    assert empty.shape == (0,) and empty.dtype == dtype
    torch.testing.assert_close(
        no_grad_losses, losses, rtol=1e-6, atol=0
    )  # same sweep 1, without the row copy


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1, 2], indirect=True)
def test_out_of_range_targets_and_misaligned_rows(arcana, poison, variant):
    V = 50304
    base = torch.randn(6 * V + 1, device="cuda", dtype=torch.bfloat16)
    logits = base[1:].view(6, V)  # contiguous, 2 bytes off a 16-byte boundary: the scalar path
    targets = torch.tensor([5, -2, V, -1, 2**40, 77], device="cuda")
    half = torch.tensor(0.5, device="cuda")
    losses, grad = arcana.cross_entropy_fwd_bwd(logits, targets, half, True)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here
    for row in (1, 2, 4):
        assert losses[row].isnan() and grad[row].isnan().all()
    assert losses[3] == 0 and (grad[3] == 0).all()
    good = torch.tensor([0, 5], device="cuda")
    ref_losses, ref_grad = reference(logits[[0, 5]], targets[[0, 5]], half)
    assert (losses[good].double() - ref_losses).abs().max().item() < 1e-4
    assert (grad[good].double() - ref_grad).abs().max().item() < 4e-3


@pytest.mark.cuda
def test_bad_inputs_get_clear_errors(arcana):
    x = torch.randn(8, 64, device="cuda")
    t = torch.zeros(8, dtype=torch.long, device="cuda")
    one = torch.ones((), device="cuda")
    op = arcana.cross_entropy_fwd_bwd
    cases = [
        (
            lambda: op(x.double(), t, one, True),
            r"logits has dtype Double; expected float32, bfloat16 or float16",
        ),
        (
            lambda: op(x.view(2, 4, 64), t, one, True),
            r"logits must be 2-D \(rows, vocab\), got shape \[2, 4, 64\]",
        ),
        (lambda: op(x.t(), t, one, True), r"logits must be contiguous"),
        (lambda: op(x, t.int(), one, True), r"targets has dtype Int, expected Long"),
        (
            lambda: op(x, t[:4], one, True),
            r"targets must have shape \(8,\), one per row of logits, got \[4\]",
        ),
        (lambda: op(x, t.cpu(), one, True), r"targets must be a CUDA tensor, got cpu"),
        (lambda: op(x, t, one.cpu(), True), r"grad_scale must be a CUDA tensor, got cpu"),
        (lambda: op(x, t, one.double(), True), r"grad_scale has dtype Double, expected Float"),
        (lambda: op(x, t, one.expand(2), True), r"grad_scale must hold one value, got shape \[2\]"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    losses, grad = op(x[:0], t[:0], one, True)
    assert losses.shape == (0,) and grad.shape == (0, 64)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [1, 2], indirect=True)
def test_deterministic(arcana, variant):
    logits, targets, grad_scale = random_case(512, 50304, torch.bfloat16, "cuda", 1)
    first = arcana.cross_entropy_fwd_bwd(logits, targets, grad_scale, True)
    second = arcana.cross_entropy_fwd_bwd(logits, targets, grad_scale, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [0, 1, 2], indirect=True)
def test_opcheck(arcana, variant):
    for dtype in DTYPES:
        logits, targets, grad_scale = random_case(7, 1000, dtype, "cuda", 5)
        torch.library.opcheck(
            arcana.cross_entropy_fwd_bwd.default, (logits, targets, grad_scale, True)
        )
        torch.library.opcheck(
            arcana.cross_entropy_fwd_bwd.default, (logits, targets, grad_scale, False)
        )


# -----------------------------------------------------------------------------
# on a GPU: the chunked loss and the model


def lm_head_case(rows, C, V, seed, dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(rows // 64, 64, C, generator=gen).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=gen) * 0.05).to("cuda", dtype).requires_grad_()
    targets = torch.randint(0, V, (rows // 64, 64), generator=gen)
    targets[0, :13] = -1
    targets[-1, -5:] = -1
    return h, weight, targets.cuda()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.cuda
def test_chunked_loss_with_kernel_equals_cross_entropy(arcana):
    """fp32: loss and gradients as F.cross_entropy on the full logits, to fp32 rounding. bf16 under
    autocast: as the TorchOps path (full bf16 logits, F.cross_entropy on their float32 copy), to
    bf16 rounding."""
    csrc = require_kernels()
    h, weight, targets = lm_head_case(4096, 256, 50304, 0)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: both sides in full fp32
    try:
        expected = F.cross_entropy(
            (h @ weight.t()).view(-1, 50304), targets.view(-1), ignore_index=-1
        )
        eh, ew = torch.autograd.grad(expected, (h, weight))
        loss = csrc.chunked_lm_head_loss(h, weight, targets, chunk_rows=1500, use_kernel=True)
        gh, gw = torch.autograd.grad(loss, (h, weight))
    finally:
        torch.set_float32_matmul_precision(precision)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert rel_err(gh, eh) < 1e-5 and rel_err(gw, ew) < 1e-5

    cuda_ops = csrc.CudaOps(TorchOps())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, expected = TorchOps().lm_head_loss(h, weight, targets)
        _, loss = cuda_ops.lm_head_loss(h, weight, targets)
    eh, ew = torch.autograd.grad(expected, (h, weight))
    gh, gw = torch.autograd.grad(loss, (h, weight))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 2e-3 * expected.item()
    assert rel_err(gh, eh) < 2e-2 and rel_err(gw, ew) < 2e-2
    with (
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16),
    ):  # evaluation: no gradient work
        assert (
            abs(cuda_ops.lm_head_loss(h, weight, targets)[1].item() - loss.item())
            < 1e-6 * loss.item()
        )


class LossOps(TorchOps):
    """TorchOps with only the loss from CudaOps: isolates the chunked kernel path in a model."""

    def __init__(self):
        self.kernels = require_kernels().CudaOps(TorchOps())

    def lm_head_loss(self, h, weight, targets):
        return self.kernels.lm_head_loss(h, weight, targets)


def grads_close(model_a, model_b, rtol):
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert rel_err(pa.grad, pb.grad) <= rtol, f"{name}: gradient differs"


@pytest.mark.cuda
@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compile"])
def test_model_step_matches_torch_ops(arcana, compile_model):
    """A GPT forward and backward under bf16 autocast with the chunked kernel loss (eager, and
    compiled with fullgraph=True) against TorchOps with the same weights: same loss and gradients to
    bf16 rounding."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mc = train_gpt.GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=4, n_embd=256)
    ref = train_gpt.GPT(mc, TorchOps()).cuda()
    model = train_gpt.GPT(mc, LossOps()).cuda()
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50257, (8, 128), device="cuda")
    targets = torch.randint(0, 50257, (8, 128), device="cuda")
    targets[0, :10] = -1
    run = torch.compile(model, fullgraph=True) if compile_model else model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = run(idx, targets)
        _, loss_ref = ref(idx, targets)
    assert logits is None
    loss.backward()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 5e-3 * loss_ref.item()
    grads_close(
        model, ref, rtol=5e-2
    )  # bf16 rounding, and Inductor's fusions in the compiled model
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(idx)  # without targets: the logits, for sampling and HellaSwag
    assert logits.shape == (8, 128, 50304)


@pytest.mark.cuda
def test_peak_memory_below_full_logits(arcana):
    """The d12 lm_head loss at B*T = 16384 rows (C = 768, V = 50304, bf16 autocast), forward and
    backward: the chunked kernel path peaks far below the full-logits PyTorch path (2 x 824 MB
    chunks against 1.65 GB of bf16 logits plus their fp32 copies)."""
    h, weight, targets = lm_head_case(16384, 768, 50304, 1)

    def peak(ops):
        h.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = ops.lm_head_loss(h, weight, targets)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    chunked, full = peak(require_kernels().CudaOps(TorchOps())), peak(TorchOps())
    print(
        f"\nlm_head loss peak memory at 16384 x 50304: chunked kernel {chunked / 2**30:.2f} GiB, "
        f"full logits {full / 2**30:.2f} GiB"
    )
    assert chunked < 0.5 * full, (chunked, full)


def smooth(values, k=10):
    """Trailing mean over k steps (the per-step loss of a 2048-token batch is itself noisy)."""
    return [
        sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
        for i in range(len(values))
    ]


@pytest.mark.cuda
def test_200_step_loss_curve_matches_torch(arcana, tmp_path):
    """The issue's end-to-end check: 200 steps of d12 (T = 256, 2048 tokens per step) with --kernels
    cuda follow --kernels torch within bf16 noise. The noise is measured, not assumed: the distance
    between the bf16 and the float32 runs of the PyTorch path, both smoothed over 10 steps. The
    kernels' curve must stay within twice that distance of the bf16 PyTorch curve (plus 0.01 on
    average, 0.05 at worst, for curves that happen to agree closely), and the loss must fall."""
    data = str(tmp_path / "data")
    write_shards(data, 0, vocab=50257, period=997, n_train=300_000, n_val=20_000)

    def run(kernels, log_dir, dtype="bfloat16"):
        args = [
            "--model",
            "d12",
            "--dtype",
            dtype,
            "--device",
            "cuda",
            "--data_dir",
            data,
            "--max_steps",
            "200",
            "--warmup_steps",
            "20",
            "--batch_size",
            "8",
            "--block_size",
            "256",
            "--total_batch_size",
            "2048",
            "--val_every",
            "0",
            "--hellaswag_every",
            "0",
            "--sample_every",
            "0",
            "--checkpoint_every",
            "0",
        ]
        return train_losses(args, str(tmp_path / log_dir), kernels, timeout=900)

    cuda = run("cuda", "cuda")
    ref = run("torch", "torch")
    fp32 = run("torch", "fp32", dtype="float32")
    assert len(cuda) == len(ref) == len(fp32) == 200
    d_cuda = [abs(a - b) for a, b in zip(smooth(cuda), smooth(ref))]
    d_noise = [abs(a - b) for a, b in zip(smooth(fp32), smooth(ref))]
    mean_cuda, mean_noise = sum(d_cuda) / 200, sum(d_noise) / 200
    print(
        f"\n200-step d12 loss: torch bf16 {ref[0]:.3f} -> {ref[-1]:.3f}, "
        f"cuda {cuda[0]:.3f} -> {cuda[-1]:.3f}, "
        f"torch fp32 -> {fp32[-1]:.3f}; |cuda - torch| mean {mean_cuda:.4f} max {max(d_cuda):.4f}, "
        f"|fp32 - bf16| mean {mean_noise:.4f} max {max(d_noise):.4f} (10-step means)"
    )
    assert mean_cuda <= 2 * mean_noise + 0.01 and max(d_cuda) <= 2 * max(d_noise) + 0.05, (
        f"loss curves differ beyond bf16 noise:\ncuda  {cuda}\ntorch {ref}\nfp32  {fp32}"
    )
    assert ref[-1] < ref[0] - 2.0, f"the loss did not go down: {ref}"
