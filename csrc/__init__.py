"""
ArcanaGPT's CUDA kernels as torch.ops.arcana.*,
and the Python half that makes them a drop-in for the model's ops.

`import csrc` loads the compiled extension (csrc/arcana_kernels*.so, built by
`python setup.py build_ext --inplace`), whose C++ side declares every op (ops.cpp) and its CUDA
implementation (*.cu); this file then adds what torch.compile and autograd need (a fake
implementation per op, each forward's backward), the chunked lm_head loss, and CudaOps, the kernels
behind train_gpt.py's TorchOps interface. The kernels themselves are described in csrc/README.md.
"""

import math
import time
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from . import arcana_kernels  # noqa: F401  (loading it declares torch.ops.arcana.*)

# -----------------------------------------------------------------------------
# fake implementations (shapes for torch.compile and opcheck) and autograd


def _row_stats(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32), x.new_empty(
        x.shape[:-1], dtype=torch.float32
    )


_fake = torch.library.register_fake
_fake("arcana::layer_norm_fwd")(
    lambda x, weight, bias, eps, out_dtype=None: (
        torch.empty_like(x, dtype=out_dtype),
        *_row_stats(x),
    )
)
_fake("arcana::add_layer_norm_fwd")(
    lambda x, y, weight, bias, eps, out_dtype=None: (
        torch.empty_like(x),
        torch.empty_like(x, dtype=out_dtype),
        *_row_stats(x),
    )
)
_fake("arcana::layer_norm_bwd")(
    lambda dout, x, weight, mean, rstd, dr=None, dy_dtype=None: (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(weight),
        x.new_empty(0) if dy_dtype is None else torch.empty_like(x, dtype=dy_dtype),
    )
)
_fake("arcana::gelu_fwd")(lambda x, bias=None: torch.empty_like(x))
_fake("arcana::gelu_bwd")(
    lambda dout, x, bias=None: (
        torch.empty_like(x),
        torch.empty_like(bias) if bias is not None else x.new_empty(0, dtype=torch.float32),
    )
)
_fake("arcana::attention_fwd")(
    lambda qkv: (  # qkv (B, T, 3, H, D) -> out (B, T, H, D), lse (B, H, T)
        qkv.new_empty(qkv.shape[:2] + qkv.shape[3:]),
        qkv.new_empty(qkv.shape[0], qkv.shape[3], qkv.shape[1], dtype=torch.float32),
    )
)
_fake("arcana::attention_bwd")(
    lambda dout, qkv, out, lse: qkv.new_empty(qkv.shape)
)  # dqkv, contiguous
_fake("arcana::cross_entropy_fwd_bwd")(
    lambda logits, targets, grad_scale, compute_grad: (
        logits.new_empty(logits.shape[:1], dtype=torch.float32),
        logits.new_empty(logits.shape if compute_grad else 0),
    )
)


def _layer_norm_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])  # mean, rstd
    ctx.save_for_backward(inputs[0], inputs[1], *output[1:])  # x, weight, mean, rstd


def _layer_norm_backward(ctx, dout, dmean, drstd):
    dx, dweight, dbias, _ = torch.ops.arcana.layer_norm_bwd(
        dout.contiguous(), *ctx.saved_tensors
    )  # dout: out's dtype
    return dx, dweight, dbias, None, None


def _add_layer_norm_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[2:])
    ctx.save_for_backward(output[0], inputs[2], *output[2:])  # the backward normalizes r = x + y
    x, y = inputs[:2]
    ctx.y_dtype = (
        y.dtype if y.dtype != x.dtype else None
    )  # y's gradient, when it needs its own dtype


def _add_layer_norm_backward(ctx, dr, dout, dmean, drstd):
    # r's gradient: dr from the blocks after it, plus the one through LayerNorm(r); x and y both get
    # it, y in its own dtype from the same kernel (else autograd would add a cast kernel)
    dx, dweight, dbias, dy = torch.ops.arcana.layer_norm_bwd(
        dout.contiguous(), *ctx.saved_tensors, dr.contiguous(), ctx.y_dtype
    )
    return dx, dx if ctx.y_dtype is None else dy, dweight, dbias, None, None


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, bias


def _gelu_backward(ctx, dout):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.arcana.gelu_bwd(dout.contiguous(), x, bias)
    return dx, dbias if bias is not None else None


def _attention_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse
    ctx.save_for_backward(inputs[0], *output)  # qkv, out, lse: the backward recomputes the scores


def _attention_backward(ctx, dout, dlse):
    return torch.ops.arcana.attention_bwd(dout, *ctx.saved_tensors)


for _op, _backward, _setup in [
    ("layer_norm_fwd", _layer_norm_backward, _layer_norm_setup),
    ("add_layer_norm_fwd", _add_layer_norm_backward, _add_layer_norm_setup),
    ("gelu_fwd", _gelu_backward, _gelu_setup),
    ("attention_fwd", _attention_backward, _attention_setup),
]:
    torch.library.register_autograd(f"arcana::{_op}", _backward, setup_context=_setup)

# -----------------------------------------------------------------------------
# the lm_head loss without the (rows, vocab) logits


def cross_entropy_rows(logits, targets, grad_scale, compute_grad):
    """The PyTorch twin of arcana::cross_entropy_fwd_bwd: per-row cross-entropy (0 where the target
    is -1) and, with compute_grad, d(sum of losses)/d(logits) * grad_scale in the logits' dtype
    (else an empty tensor)."""
    valid = targets != -1
    safe = targets.clamp(min=0).unsqueeze(1)
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    losses = torch.where(valid, lse - lf.gather(1, safe).squeeze(1), 0.0)
    if not compute_grad:
        return losses, logits.new_empty(0)
    grad = torch.exp(lf - lse.unsqueeze(1))  # softmax
    grad.scatter_add_(
        1, safe, torch.full_like(safe, -1.0, dtype=grad.dtype)
    )  # minus the one-hot target
    grad *= (valid.float() * grad_scale).unsqueeze(1)
    return losses, grad.to(logits.dtype)


ADDMM_OUT_DTYPE = (
    "dtype_out" in torch.ops.aten.addmm.overloads()
)  # addmm(..., out_dtype=, out=): newer torch


@torch.library.custom_op("arcana::lm_head_loss", mutates_args=())
def lm_head_loss_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
    compute_grad: bool,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits = h @ weight.T against targets (-1 = ignore), chunk_rows rows at
    a time so the logits never exist whole. The gradients are made on the way (each chunk's dlogits
    is used at once and dropped): returns (loss, dh, dweight), the last two empty without
    compute_grad."""
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    count = (t != -1).sum()
    grad_scale = (
        1.0 / count.clamp(min=1).float()
    )  # stays on the device: the host never waits for the GPU here
    loss = torch.zeros(
        (), dtype=torch.float64, device=h.device
    )  # a sum of many rows: keep its digits
    dh = torch.empty_like(h2) if compute_grad else h.new_empty(0)
    dweight = torch.zeros_like(weight, dtype=torch.float32) if compute_grad else weight.new_empty(0)
    cross_entropy = torch.ops.arcana.cross_entropy_fwd_bwd if use_kernel else cross_entropy_rows
    for start in range(0, h2.size(0), chunk_rows):
        hc, tc = h2[start : start + chunk_rows], t[start : start + chunk_rows]
        logits = hc @ weight.t()  # (rows, vocab)
        losses, dlogits = cross_entropy(logits, tc, grad_scale, compute_grad)
        del logits  # its memory serves the next chunk's logits
        loss += losses.sum(dtype=torch.float64)
        if compute_grad:
            torch.mm(
                dlogits, weight, out=dh[start : start + chunk_rows]
            )  # written in place, no temporary
            if ADDMM_OUT_DTYPE and dlogits.is_cuda and dlogits.dtype != torch.float32:
                # cuBLAS adds the bf16 product into the fp32 sum itself:
                # no (vocab, C) fp32 temporary per chunk
                torch.addmm(dweight, dlogits.t(), hc, out_dtype=torch.float32, out=dweight)
            else:
                dweight += (dlogits.t() @ hc).float()
    loss = (loss / count).float()  # F.cross_entropy's mean (NaN when no target counts, as there)
    return loss, dh.view_as(h) if compute_grad else dh, dweight


@lm_head_loss_op.register_fake
def _(h, weight, targets, chunk_rows, compute_grad, use_kernel):
    loss = h.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, h.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(h), torch.empty_like(weight, dtype=torch.float32)


def _lm_head_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])  # dh, dweight: the gradients, ready-made
    ctx.weight_dtype = inputs[1].dtype


def _lm_head_loss_backward(ctx, grad_loss, grad_dh, grad_dweight):
    dh, dweight = ctx.saved_tensors
    return (
        grad_loss.to(dh.dtype) * dh,
        (grad_loss * dweight).to(ctx.weight_dtype),
        None,
        None,
        None,
        None,
    )


lm_head_loss_op.register_autograd(_lm_head_loss_backward, setup_context=_lm_head_loss_setup)


def chunked_lm_head_loss(h, weight, targets, chunk_rows=8192, use_kernel=False):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) holding one chunk of
    (chunk_rows, vocab) logits at a time instead of all (B*T, vocab). Under autocast the matmuls run
    in the autocast dtype, as F.linear's."""
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return lm_head_loss_op(h, weight, targets, chunk_rows, compute_grad, use_kernel)[0]


# -----------------------------------------------------------------------------
# the model's ops on the kernels


def autocast_dtype(x):
    """The dtype autocast gives matmuls on x's device, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def matmul_dtype(x):
    """The dtype the Linear after a LayerNorm of x computes in: autocast's, else x's."""
    return autocast_dtype(x) or x.dtype


OPS = (
    "layer_norm",
    "add_layer_norm",
    "linear_gelu",
    "attention",
    "lm_head_loss",
)  # the model's, in TorchOps


class CudaOps:
    """train_gpt.py's TorchOps interface on the kernels, for the ops named in `kernels`
    (all by default); the others, and those where a kernel does not apply, call the PyTorch ops it
    is given. Under autocast the residual stream x is float32 and the branch outputs bf16: the
    kernels take that pair as it is and give what the PyTorch path gives, but for LayerNorm outputs
    already in the autocast dtype that the Linear after them would cast them to."""

    name = "cuda"

    def __init__(self, torch_ops, kernels=OPS):
        self.torch_ops = torch_ops
        self.kernels = tuple(op for op in OPS if op in kernels)
        for op in OPS:
            if op not in self.kernels:
                setattr(self, op, getattr(torch_ops, op))

    def layer_norm(self, x, ln):
        """LayerNorm's output in the dtype of the matmul it feeds (autocast's, else x's): the
        PyTorch path's float32 result rounded once, with no cast kernel after it, nor one for its
        gradient."""
        return torch.ops.arcana.layer_norm_fwd(
            x.contiguous(), ln.weight, ln.bias, ln.eps, matmul_dtype(x)
        )[0]

    def add_layer_norm(self, x, y, ln):
        """r = x + y in x's dtype (the float32 residual stream), its LayerNorm as in layer_norm."""
        r, h, _, _ = torch.ops.arcana.add_layer_norm_fwd(
            x.contiguous(), y.contiguous(), ln.weight, ln.bias, ln.eps, matmul_dtype(x)
        )
        return r, h

    def linear_gelu(self, x, fc):
        """The matmul without its bias,
        then one pass over the (B, T, 4C) activation adding the bias and GELU."""
        return torch.ops.arcana.gelu_fwd(F.linear(x, fc.weight).contiguous(), fc.bias)

    def attention(self, qkv, n_head):
        """The fused kernel reads q, k and v in place. It takes bf16/fp16 (autocast) and head sizes
        64 and 128; float32 runs keep SDPA rather than lose precision to a cast."""
        B, T, C3 = qkv.shape
        hs = C3 // (3 * n_head)
        if qkv.dtype not in (torch.bfloat16, torch.float16) or hs not in (64, 128):
            return self.torch_ops.attention(qkv, n_head)
        return torch.ops.arcana.attention_fwd(qkv.view(B, T, 3, n_head, hs))[0].view(B, T, C3 // 3)

    def lm_head_loss(self, h, weight, targets):
        """The loss without the full logits; no logits are returned. float16 runs keep the PyTorch
        path: their GradScaler factor arrives after dlogits (down to 1e-10) would have flushed to
        zero in fp16."""
        if autocast_dtype(h) == torch.float16:
            return self.torch_ops.lm_head_loss(h, weight, targets)
        return None, chunked_lm_head_loss(h, weight, targets, use_kernel=True)


# -----------------------------------------------------------------------------
# the start-of-run check: each kernel against PyTorch at the run's shapes

CHECK_LOSS_ROWS = (
    8192  # rows of the lm_head loss in the check: its full-logits PyTorch path needs (rows, vocab)
)


class Verdict(NamedTuple):
    """One op of the start-of-run check: whether its kernels gave PyTorch's results, why not, and
    the time of one forward and backward with the kernels and with PyTorch's op (ms; NaN where not
    measured)."""

    op: str
    passed: bool
    error: str
    kernel_ms: float
    torch_ms: float


class KernelCrash(RuntimeError):
    """A kernel broke the device during the check (an illegal address, a trap): the CUDA context is
    lost, and this process can run nothing more on the GPU."""


def check_kernels(
    torch_ops, device, dtype, batch_size, block_size, n_embd, n_head, vocab_size, repeats=10
):
    """Each of the model's ops whose kernels apply to a run of these shapes and dtype (float32, or
    bfloat16/float16 under autocast) run forward and backward on random inputs with CudaOps and with
    torch_ops: the Verdicts, in OPS order. A result passes where its error against a float32
    reference (float64 for float32 runs) is at most twice PyTorch's own plus a floor (the kernel
    tests' rule); both are then timed, `repeats` calls after a warm-up. The lm_head loss takes at
    most CHECK_LOSS_ROWS rows. Raises KernelCrash where the device fails."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(0)  # the same inputs on every process of a run
    B, T, C = batch_size, block_size, n_embd
    cases = _check_cases(B, T, C, n_head, vocab_size, dtype, device, gen)
    kernels = CudaOps(torch_ops)
    verdicts = []
    for op, case in cases.items():
        error = _check_accuracy(op, case, kernels, torch_ops, dtype, device)
        kernel_ms = _time_ms(op, case, kernels, dtype, device, repeats) if not error else math.nan
        torch_ms = _time_ms(op, case, torch_ops, dtype, device, repeats)
        verdicts.append(Verdict(op, not error, error, kernel_ms, torch_ms))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the check's inputs and results, back to the GPU
    return verdicts


class _Case(NamedTuple):
    leaves: list  # the op's inputs in the run's dtypes; the floating-point ones get gradients
    grads: list  # the gradient arriving at each output (None: a loss, 1)
    call: Callable  # call(ops, *leaves) -> the op's outputs
    names: list  # of the outputs, then of the leaves' gradients


def _check_cases(B, T, C, n_head, V, dtype, device, gen):
    """{op: _Case} at the run's shapes, for the ops whose kernels apply: attention on bf16/fp16 with
    head size 64 or 128, the lm_head loss but under float16 autocast. The inputs are the model's: a
    float32 residual stream, branch outputs and activations in the autocast dtype, float32
    parameters."""

    def randn(*shape, scale=1.0, shift=0.0, dt=torch.float32):
        return (torch.randn(shape, generator=gen, device=device) * scale + shift).to(dt)

    def layer(weight, bias):  # a LayerNorm's or a Linear's parameters, as the ops read them
        return SimpleNamespace(weight=weight, bias=bias, eps=1e-5)

    x, dx = randn(B, T, C, scale=2.0, shift=1.0), randn(B, T, C, dt=dtype)
    ln = [randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)]
    cases = {
        "layer_norm": _Case(
            [x, *ln],
            [dx],
            lambda ops, x, w, b: (ops.layer_norm(x, layer(w, b)),),
            ["out", "dx", "dweight", "dbias"],
        ),
        "add_layer_norm": _Case(
            [x, randn(B, T, C, dt=dtype), *ln],
            [randn(B, T, C), dx],
            lambda ops, x, y, w, b: ops.add_layer_norm(x, y, layer(w, b)),
            ["r", "out", "dx", "dy", "dweight", "dbias"],
        ),
        "linear_gelu": _Case(
            [randn(B, T, C, dt=dtype), randn(4 * C, C, scale=C**-0.5), randn(4 * C, scale=0.5)],
            [randn(B, T, 4 * C, dt=dtype)],
            lambda ops, x, w, b: (ops.linear_gelu(x, layer(w, b)),),
            ["out", "dx", "dweight", "dbias"],
        ),
    }
    if dtype in (torch.bfloat16, torch.float16) and C // n_head in (64, 128):
        cases["attention"] = _Case(
            [randn(B, T, 3 * C, dt=dtype)],
            [dx],
            lambda ops, qkv: (ops.attention(qkv, n_head),),
            ["out", "dqkv"],
        )
    if dtype != torch.float16:
        rows = max(1, min(B, CHECK_LOSS_ROWS // T))
        targets = torch.randint(0, V, (rows, T), generator=gen, device=device)
        cases["lm_head_loss"] = _Case(
            [randn(rows, T, C, dt=dtype), randn(V, C, scale=0.05), targets],
            [None],
            lambda ops, h, w, t: (ops.lm_head_loss(h, w, t)[1],),
            ["loss", "dh", "dweight"],
        )
    return cases


def _run(case, ops, leaves, dtype):
    """case's op with ops on leaves, forward (under autocast for a 16-bit dtype) and backward: its
    outputs, then its leaves' gradients."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in leaves]
    low = dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(leaves[0].device.type, dtype=dtype if low else None, enabled=low):
        outputs = case.call(ops, *leaves)
    grads = [
        torch.ones_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, case.grads)
    ]
    inputs = [t for t in leaves if t.requires_grad]
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, inputs, grads))


def _check_accuracy(op, case, kernels, torch_ops, dtype, device):
    """ "" where every result of the kernels is within its tolerance, else the first that is not,
    and why."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(
        "highest"
    )  # no TF32: the matmuls beside the kernels in full fp32
    try:
        try:
            ours = _run(case, kernels, case.leaves, dtype)
            _synchronize(device)
        except Exception as e:  # an input the kernels refuse, or a slip on their Python side
            _raise_if_device_fault(op, e)
            return f"{type(e).__name__}: {_first_line(e)}"
        theirs = _run(case, torch_ops, case.leaves, dtype)
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        upcast = [t.to(ref_dtype) if t.is_floating_point() else t for t in case.leaves]
        ref = _run(case, torch_ops, upcast, ref_dtype)
    finally:
        torch.set_float32_matmul_precision(precision)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for name, a, b, r in zip(case.names, ours, theirs, ref):
        r = r.double()
        err = (a.double() - r).abs().max().item()
        # PyTorch's result as the model hands it on:
        # a LayerNorm output in the dtype of the matmul after it
        err_torch = (b.to(a.dtype).double() - r).abs().max().item()
        tol = 2 * err_torch + floor * r.abs().max().item()
        if not err <= tol:  # NaN fails
            return (
                f"{name}: max error {err:.3g} > tolerance {tol:.3g}, PyTorch's own {err_torch:.3g}"
            )
    return ""


def _time_ms(op, case, ops, dtype, device, repeats):
    """Milliseconds per forward and backward of case's op with ops, after one call of warm-up."""
    try:
        _run(case, ops, case.leaves, dtype)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            _run(case, ops, case.leaves, dtype)
        _synchronize(device)
    except RuntimeError as e:
        _raise_if_device_fault(op, e)
        raise
    return (time.perf_counter() - start) / repeats * 1e3


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _raise_if_device_fault(op, e):
    """A CUDA error (as opposed to an input the op refused)
    leaves the context broken: KernelCrash."""
    if isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e):
        raise KernelCrash(
            f"the {op} kernels broke the GPU in the start-of-run check ({_first_line(e)})"
        ) from e


def _first_line(e):
    return str(e).strip().split("\n", 1)[0]
