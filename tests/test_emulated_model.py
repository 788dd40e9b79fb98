"""The model on the kernels, and the start-of-run check, without a GPU: the whole arcana library
built from csrc/ for the CPU (tests/emu_ops.cpp: the real kernels, emulated, behind the torch
bindings a GPU run goes through) takes the place of the extension in a fresh process
(tests/emulated_ops.py), where csrc/__init__.py adds autograd, CudaOps and the check on top, as on a
GPU. Select these tests with `-k emulated_model`.

- A tiny GPT (2 blocks; head sizes 64 and 128; T = 97 and 120, ragged on every kernel's tiles, with
  the causal diagonal inside a tile; vocabularies of 1000 and 1001, the cross-entropy kernel's
  vector and scalar rows) runs forward, backward and 3 AdamW steps through CudaOps on CPU tensors,
  with every output buffer NaN-poisoned, and matches TorchOps with the tolerances of the GPU tests:
  in float32, and under CPU autocast to bfloat16, which gives the ops the dtypes bf16 autocast gives
  them on a GPU (float32 residual stream, bf16 branch outputs, LayerNorm outputs and attention
  inputs; checked op by op). Fast kernels, plain ones (variant 0) and the cross-entropy's L2 re-read
  (variant 2), on an emulated H100; the fast ones also on an A100 and an sm_86 GPU, each from a
  build for its architecture (ARCANA_ARCH: its branches, its shared memory and threads per SM).
- torch.compile(fullgraph=True) of that model (inductor) runs the emulated ops and matches eager.
- torch.library.opcheck on every op with real data;
  contiguous views off a 16-byte boundary through the bindings.
- The start-of-run check (train_gpt.checked_kernels over csrc.check_kernels) passes the kernels, and
  catches a copy of csrc/ built with a planted bug in GELU's backward: --kernels auto falls back to
  PyTorch's GELU with a warning naming it, --kernels cuda stops naming it. Its choices and lines are
  also checked on made-up verdicts.

Each emulated test runs one function of this module in
its own process (their names do not start with test_).
"""

import math
import os
import shutil
from contextlib import nullcontext

import pytest
import torch
from emulated_ops import build, run_emulated
from kernel_testing import ARCHS, ROOT, require_kernels

import train_gpt
from prepare import UserError

MODULE = "test_emulated_model"
MODELS = {  # GPTConfig fields beside n_layer=2
    "hs64": dict(n_embd=128, n_head=2, block_size=97, vocab_size=1000),
    "hs128": dict(n_embd=256, n_head=2, block_size=120, vocab_size=1001),
}
B = 2  # sequences per batch
# loss (relative), gradients and the 3 steps' weight updates (norm-relative): in bf16 the GPU model
# tests' loss and gradient bounds; in float32 the kernels' 1e-5, with room for two blocks of them;
# the updates twice the gradients'
TOLERANCES = {
    "float32": (1e-5, 1e-4, 2e-4),
    "bfloat16": (1e-2, 5e-2, 1e-1),
}
PLANTED_BUG = (  # GELU's backward, fast kernel: the derivative of 2z without its 2
    "const float dz2 = 2.f * kSqrt2OverPi * (1.f + 3.f * kCubic * u * u);",
    "const float dz2 = kSqrt2OverPi * (1.f + 3.f * kCubic * u * u);",
)


@pytest.fixture(scope="session")
def build_dir(request, tmp_path_factory):
    """Where the emulated libraries are built:
    pytest's cache folder, which keeps them across sessions."""
    cache = getattr(request.config, "cache", None)  # none under -p no:cacheprovider
    if cache is None:
        return str(tmp_path_factory.mktemp("emulated_ops"))
    return str(cache.mkdir("emulated_ops"))


def built(library):
    if library is None:
        pytest.skip(
            "the emulated library needs g++ and the CUDA headers (cuda_bf16.h); set CUDA_HOME"
        )
    return library


@pytest.fixture(scope="session")
def emulated_libraries(build_dir):
    """emulated_libraries(arch): tests/emu_ops.cpp built from csrc/ for the GPU of architecture arch
    (ARCHS), or a skip without g++ or the CUDA headers."""
    return lambda arch: built(build(build_dir, arch=ARCHS[arch]))


@pytest.fixture(scope="session")
def emulated_library(emulated_libraries):
    """The library on an emulated H100 (sm_90)."""
    return emulated_libraries("sm90")


@pytest.fixture(scope="session")
def planted_library(build_dir, tmp_path_factory):
    """The same, built from a scratch copy of csrc/ with PLANTED_BUG in gelu.cu."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(
        os.path.join(ROOT, "csrc"), root / "csrc", ignore=shutil.ignore_patterns("*.so", "*.py*")
    )
    gelu = root / "csrc" / "gelu.cu"
    source = gelu.read_text()
    assert source.count(PLANTED_BUG[0]) == 1, "gelu.cu changed: update PLANTED_BUG"
    gelu.write_text(source.replace(*PLANTED_BUG))
    return built(build(build_dir, csrc=str(root / "csrc")))


# -----------------------------------------------------------------------------
# part 1: the model through CudaOps on the emulated kernels


@pytest.mark.parametrize(
    "model,dtype,variant,arch",
    [
        ("hs64", "bfloat16", "1", "sm90"),  # vector rows of logits kept in shared memory
        ("hs64", "bfloat16", "0", "sm90"),  # the plain kernels
        ("hs64", "float32", "1", "sm90"),  # attention on SDPA; the other kernels in float32
        (
            "hs128",
            "bfloat16",
            "2",
            "sm90",
        ),  # odd vocabulary: scalar rows of logits, re-read from L2
        ("hs64", "bfloat16", "1", "sm80"),  # an A100: dQ's scalar atomics
        (
            "hs64",
            "bfloat16",
            "1",
            "sm86",
        ),  # an sm_86 GPU: the small backward tiles, rows re-read from L2
    ],
)
def test_emulated_model_matches_torch_ops(emulated_libraries, model, dtype, variant, arch):
    run_emulated(emulated_libraries(arch), MODULE, "model_matches_torch_ops", model, dtype, variant)


def test_emulated_model_compiled_matches_eager(emulated_library):
    run_emulated(emulated_library, MODULE, "compiled_matches_eager")


def test_emulated_model_opcheck(emulated_library):
    run_emulated(emulated_library, MODULE, "opcheck_every_op")


def test_emulated_model_misaligned_views(emulated_library):
    run_emulated(emulated_library, MODULE, "misaligned_views")


def tiny_gpt(model, dtype):
    """The TorchOps model and a CudaOps copy of it,
    a batch, and the autocast of dtype ("float32": none)."""
    import csrc

    mc = train_gpt.GPTConfig(n_layer=2, **MODELS[model])
    torch.manual_seed(0)
    ref = train_gpt.GPT(mc, train_gpt.TorchOps())
    ours = train_gpt.GPT(mc, csrc.CudaOps(train_gpt.TorchOps()))
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, mc.vocab_size, (2, B, mc.block_size), generator=gen)
    amp = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    return ref, ours, idx, targets, amp


def rel(a, b):
    """Norm-relative distance of a from b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model_matches_torch_ops(model, dtype, variant):
    torch.ops.arcana._set_variant(int(variant))
    torch.ops.arcana._set_poison(True)  # an output element a kernel leaves unwritten stays NaN
    ref, ours, idx, targets, amp = tiny_gpt(model, dtype)
    loss_tol, grad_tol, update_tol = TOLERANCES[dtype]
    start = [p.detach().clone() for p in ref.parameters()]
    optimizers = [m.configure_optimizer(0.1, 1e-3, "cpu") for m in (ref, ours)]
    for step in range(3):
        loss_ref = forward_backward(ref, idx, targets, amp)
        with OpDtypes() as seen:
            loss = forward_backward(ours, idx, targets, amp)
        assert seen.dtypes == expected_dtypes(dtype), seen.dtypes
        assert abs(loss - loss_ref) <= loss_tol * loss_ref, (
            f"step {step}: loss {loss}, TorchOps {loss_ref}"
        )
        for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
            assert rel(b.grad, a.grad) <= grad_tol, (
                f"step {step}, {name}: gradient {rel(b.grad, a.grad):.3g}"
            )
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    # the weights' updates: the k-slice of c_attn's bias has a zero gradient, rounding noise that
    # AdamW normalizes into full steps, so the updates are compared as a whole
    ours_delta = torch.cat([(b - s).flatten() for b, s in zip(ours.parameters(), start)])
    ref_delta = torch.cat([(a - s).flatten() for a, s in zip(ref.parameters(), start)])
    assert rel(ours_delta, ref_delta) <= update_tol, (
        f"weight updates differ by {rel(ours_delta, ref_delta):.3g}"
    )


def forward_backward(model, idx, targets, amp):
    with amp:
        _, loss = model(idx, targets)
    loss.backward()
    return loss.item()


class OpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """{arcana op: {the dtypes of its tensor and dtype arguments, per call}} of the ops dispatched
    while active (not those an op calls inside: lm_head_loss's cross_entropy_fwd_bwd)."""

    def __init__(self):
        super().__init__()
        self.dtypes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func.overloadpacket)
        if op.startswith("arcana."):
            dtypes = [a.dtype if torch.is_tensor(a) else a for a in args]
            names = tuple(str(d)[6:] for d in dtypes if isinstance(d, torch.dtype))
            self.dtypes.setdefault(op[7:], set()).add(names)
        return func(*args, **(kwargs or {}))


def expected_dtypes(dtype):
    """What OpDtypes sees of the model: under autocast the residual stream (x, r, dr) float32, the
    branch outputs (y), LayerNorm outputs, attention and the MLP's activation in the autocast dtype,
    parameters float32, as on a GPU; in float32 everything float32, with attention on SDPA."""
    f, low = "float32", "bfloat16"
    if dtype == f:
        low = f
    ops = {
        "layer_norm_fwd": {(f, f, f, low)},  # x, weight, bias, out_dtype
        "add_layer_norm_fwd": {(f, low, f, f, low)},  # x, y, weight, bias, out_dtype
        "gelu_fwd": {(low, f)},  # c_fc's output without its bias, the bias
        "lm_head_loss": {(low, low, "int64")},  # h, weight, targets
        "gelu_bwd": {(low, low, f)},
        # dout, x, weight, mean, rstd; the fused op's with dr and y's dtype where it is not x's
        "layer_norm_bwd": {(low, f, f, f, f), (low, f, f, f, f, f, low)},
    }
    if dtype == f:
        ops["layer_norm_bwd"] = {(f,) * 5, (f,) * 6}
    else:
        ops["attention_fwd"] = {(low,)}
        ops["attention_bwd"] = {(low, low, low, f)}  # dout, qkv, out, lse
    return ops


def compiled_matches_eager():
    """torch.compile(fullgraph=True), inductor:
    forward and backward of the bf16 model, against eager."""
    _, model, idx, targets, amp = tiny_gpt("hs64", "bfloat16")
    params = list(model.parameters())
    results = []
    for m in (model, torch.compile(model, fullgraph=True)):
        with amp:
            _, loss = m(idx, targets)
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss, grads), (loss_c, grads_c) = results
    assert abs(loss_c.item() - loss.item()) <= 1e-2 * loss.item()
    for p, g, gc in zip(model.named_parameters(), grads, grads_c):
        assert rel(gc, g) <= 5e-2 or g.norm() == 0, p[0]


def opcheck_every_op():
    """opcheck (schema, fake implementation, autograd registration, AOT dispatch) with real data, in
    the model's dtypes; attention_selftest's products."""
    import csrc

    arcana = torch.ops.arcana
    x, y = torch.randn(2, 33, 128, requires_grad=True), torch.randn(2, 33, 128).bfloat16()
    w, b = (1 + 0.1 * torch.randn(128)).requires_grad_(), torch.randn(128).requires_grad_()
    _, mean, rstd = arcana.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    u, fb = torch.randn(2, 33, 512).bfloat16().requires_grad_(), torch.randn(512).requires_grad_()
    qkv = torch.randn(2, 33, 3, 2, 64).bfloat16().requires_grad_()
    out, lse = arcana.attention_fwd(qkv.detach())
    logits, tgt = torch.randn(66, 1000).bfloat16(), torch.randint(0, 1000, (66,))
    h, head = (
        torch.randn(2, 33, 128).bfloat16().requires_grad_(),
        (0.05 * torch.randn(1000, 128)).bfloat16(),
    )
    detached = [t.detach() for t in (x, w, mean, rstd)]
    calls = [
        (arcana.layer_norm_fwd, (x, w, b, 1e-5, torch.bfloat16)),
        (arcana.add_layer_norm_fwd, (x, y.requires_grad_(), w, b, 1e-5, torch.bfloat16)),
        (arcana.layer_norm_bwd, (y.detach(), *detached, x.detach(), torch.bfloat16)),
        (arcana.gelu_fwd, (u, fb)),
        (arcana.gelu_bwd, (u.detach(), u.detach(), fb.detach())),
        (arcana.attention_fwd, (qkv,)),
        (arcana.attention_bwd, (torch.randn_like(out), qkv.detach(), out, lse)),
        (arcana.cross_entropy_fwd_bwd, (logits, tgt, torch.tensor([1 / 66]), True)),
        (csrc.lm_head_loss_op, (h, head, tgt.view(2, 33), 40, True, True)),  # 2 chunks of rows
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)
    from test_attention import selftest_expected, selftest_inputs

    x = selftest_inputs(
        torch.bfloat16, 1
    )  # the test-only op (no fake implementation): its known products
    assert torch.equal(arcana.attention_selftest(x), selftest_expected(x))


def off_by_one(t):
    """A contiguous copy of t whose data starts one element
    past a 16-byte boundary (as a view at an odd offset)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.detach().reshape(-1)
    return buf[1:].view(t.shape)


def misaligned_views():
    """Contiguous views off a 16-byte boundary go through the bindings to the kernels that take them
    (the plain ones; attention_bwd copies them) with the results of aligned data, or, for qkv, get
    the clear error."""
    arcana = torch.ops.arcana
    arcana._set_poison(True)
    x, y = torch.randn(3, 40, 128), torch.randn(3, 40, 128).bfloat16()
    w, b = 1 + 0.1 * torch.randn(128), 0.1 * torch.randn(128)
    u, fb = torch.randn(3, 40, 512).bfloat16(), torch.randn(512)
    qkv = torch.randn(2, 40, 3, 2, 64).bfloat16()
    out, lse = arcana.attention_fwd(qkv)
    dout = torch.randn_like(out)
    _, mean, rstd = arcana.layer_norm_fwd(x, w, b, 1e-5)
    logits, tgt = torch.randn(80, 1000), torch.randint(0, 1000, (80,))
    calls = {  # op: (call, arguments, the indices of those to misalign)
        "layer_norm_fwd": (arcana.layer_norm_fwd, (x, w, b, 1e-5, torch.bfloat16), (0, 1)),
        "add_layer_norm_fwd": (
            arcana.add_layer_norm_fwd,
            (x, y, w, b, 1e-5, torch.bfloat16),
            (0, 1, 2),
        ),
        "layer_norm_bwd": (
            arcana.layer_norm_bwd,
            (y, x, w, mean, rstd, x, torch.bfloat16),
            (0, 1, 5),
        ),
        "gelu_fwd": (arcana.gelu_fwd, (u, fb), (0, 1)),
        "gelu_bwd": (arcana.gelu_bwd, (u, u, fb), (0, 1)),
        "attention_bwd": (arcana.attention_bwd, (dout, qkv, out, lse), (0, 2)),
        "cross_entropy_fwd_bwd": (
            arcana.cross_entropy_fwd_bwd,
            (logits, tgt, torch.ones(1), True),
            (0,),
        ),
    }
    for name, (op, args, which) in calls.items():
        aligned = op(*args)
        for i in which:
            shifted = [off_by_one(a) if j == i else a for j, a in enumerate(args)]
            for k, (a, s) in enumerate(zip(as_list(aligned), as_list(op(*shifted)))):
                tol = 1e-5 if a.dtype == torch.float32 else 1e-2
                torch.testing.assert_close(
                    s, a, rtol=tol, atol=tol, msg=f"{name}, argument {i}, output {k}"
                )
    with pytest.raises(RuntimeError, match="qkv's data must be 16-byte aligned"):
        arcana.attention_fwd(off_by_one(qkv.view(2, 40, -1)).view(qkv.shape))


def as_list(result):
    return [result] if torch.is_tensor(result) else list(result)


# -----------------------------------------------------------------------------
# part 2: the start-of-run check


def test_emulated_model_start_check_passes_the_kernels(emulated_library):
    run_emulated(emulated_library, MODULE, "start_check_passes")


def test_emulated_model_start_check_catches_a_planted_bug(planted_library):
    run_emulated(planted_library, MODULE, "start_check_catches_the_planted_bug")


def check_config():
    return train_gpt.GPTConfig(n_layer=2, **MODELS["hs64"])


def start_check_passes():
    """Every kernel passes at the tiny model's shapes in bf16 (attention and the loss included) and
    in float32; --kernels cuda then runs them all."""
    import csrc

    for dtype, checked in (
        (torch.bfloat16, list(csrc.OPS)),
        (torch.float32, ["layer_norm", "add_layer_norm", "linear_gelu", "lm_head_loss"]),
    ):
        ops, lines = train_gpt.checked_kernels(
            "cuda", train_gpt.TorchOps(), "cpu", dtype, check_config(), B, 1
        )
        print("\n".join(lines))
        assert list(ops.kernels) == checked and not any(
            line.startswith("warning") for line in lines
        )
        assert [line.split()[0] for line in lines[1:]] == checked, lines


def start_check_catches_the_planted_bug():
    """GELU's backward is wrong (PLANTED_BUG): auto keeps every other kernel that is faster and runs
    PyTorch's GELU, with one warning line naming it and its error; cuda stops with one line naming
    it."""
    import csrc

    verdicts = csrc.check_kernels(
        train_gpt.TorchOps(), "cpu", torch.bfloat16, B, 97, 128, 2, 1000, repeats=1
    )
    assert [v.op for v in verdicts if not v.passed] == ["linear_gelu"], verdicts
    assert verdicts[2].error.startswith("dx: max error"), verdicts[2]
    ops, lines = train_gpt.checked_kernels(
        "auto", train_gpt.TorchOps(), "cpu", torch.bfloat16, check_config(), B, 1
    )
    print("\n".join(lines))
    assert "linear_gelu" not in ops.kernels and ops.linear_gelu == ops.torch_ops.linear_gelu
    warnings = [line for line in lines if line.startswith("warning")]
    assert (
        len(warnings) == 1
        and "the linear_gelu kernels failed their start-of-run check (dx: " in warnings[0]
    )
    with pytest.raises(
        UserError, match=r"^--kernels cuda: the linear_gelu kernels failed .*\(dx: max error"
    ):
        train_gpt.checked_kernels(
            "cuda", train_gpt.TorchOps(), "cpu", torch.bfloat16, check_config(), B, 1
        )


# -----------------------------------------------------------------------------
# part 2 without the emulation: the choices on made-up verdicts, the errors, the device faults


def fake_check(monkeypatch, csrc, verdicts):
    monkeypatch.setattr(csrc, "check_kernels", lambda *args: verdicts)


def test_emulated_model_start_check_choices(monkeypatch):
    """auto takes a kernel that passed and is faster, PyTorch's op where the kernel is slower
    (saying so) or failed (with a warning); cuda every kernel, or a UserError naming the first that
    failed; a kernel that broke the GPU stops the run with one line pointing at --kernels torch."""
    csrc = require_kernels()
    verdicts = [
        csrc.Verdict("layer_norm", True, "", 1.0, 2.0),
        csrc.Verdict("attention", True, "", 3.0, 2.0),
        csrc.Verdict("linear_gelu", False, "dx: max error 0.5 > tolerance 0.01", math.nan, 2.0),
    ]
    fake_check(monkeypatch, csrc, verdicts)
    mc, torch_ops = check_config(), train_gpt.TorchOps()
    ops, lines = train_gpt.checked_kernels("auto", torch_ops, "cpu", torch.bfloat16, mc, 16)
    assert ops.kernels == ("layer_norm",) and ops.attention == torch_ops.attention
    assert (
        lines[0].startswith("kernels: checked against PyTorch in ")
        and "B=16, T=97, C=128, 2 heads" in lines[0]
    )
    assert lines[1].split() == "layer_norm kernels 1.000 ms, PyTorch 2.000 ms: kernels".split()
    assert lines[2].endswith("ms: PyTorch (faster)")
    assert lines[3] == (
        "warning: the linear_gelu kernels failed their start-of-run check "
        "(dx: max error 0.5 > tolerance 0.01); using PyTorch's"
    )
    with pytest.raises(
        UserError, match=r"--kernels cuda: the linear_gelu kernels failed their start-of-run "
    ):
        train_gpt.checked_kernels("cuda", torch_ops, "cpu", torch.bfloat16, mc, 16)
    fake_check(monkeypatch, csrc, verdicts[:2])
    ops, lines = train_gpt.checked_kernels("cuda", torch_ops, "cpu", torch.bfloat16, mc, 16)
    assert ops.kernels == ("layer_norm", "attention") and lines[2].endswith("ms: kernels")

    def crash(*args):
        raise csrc.KernelCrash(
            "the attention kernels broke the GPU in the start-of-run check (CUDA error: x)"
        )

    monkeypatch.setattr(csrc, "check_kernels", crash)
    with pytest.raises(
        UserError, match=r"\(CUDA error: x\); this process cannot go on: --kernels torch runs"
    ):
        train_gpt.checked_kernels("auto", torch_ops, "cpu", torch.bfloat16, mc, 16)
    assert train_gpt.select_run_ops("auto", "cpu", torch.float32, mc, 16)[1] == []


def test_emulated_model_start_check_tells_errors_from_device_faults(monkeypatch):
    """csrc.check_kernels, here with the real extension on CPU tensors: an op that refuses its
    inputs fails its verdict with the op's message; a CUDA error (the context is lost) raises
    KernelCrash."""
    csrc = require_kernels()
    mc = check_config()
    args = (
        train_gpt.TorchOps(),
        "cpu",
        torch.bfloat16,
        1,
        8,
        mc.n_embd,
        mc.n_head,
        mc.vocab_size,
        1,
    )
    verdicts = csrc.check_kernels(*args)
    assert [v.op for v in verdicts] == list(csrc.OPS) and not any(v.passed for v in verdicts)
    assert "x must be a CUDA tensor, got cpu" in verdicts[0].error and math.isnan(
        verdicts[0].kernel_ms
    )

    def fault(self, *a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(csrc.CudaOps, "attention", fault)
    with pytest.raises(
        csrc.KernelCrash, match=r"^the attention kernels broke the GPU .* illegal memory access "
    ):
        csrc.check_kernels(*args)


def test_emulated_model_start_check_agreed_across_processes(monkeypatch):
    """Under torch.distributed a kernel is used only where every process would use it: the flags are
    reduced with MIN (here against another process's, [True, True, False, True])."""
    import torch.distributed as dist

    def all_reduce(t, op):
        assert op == dist.ReduceOp.MIN and t.dtype == torch.int32
        t.copy_(torch.minimum(t, torch.tensor([1, 1, 0, 1], dtype=torch.int32)))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert train_gpt.agreed([True, False, True, True], "cpu") == [True, False, False, True]
