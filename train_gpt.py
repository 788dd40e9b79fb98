"""
ArcanaGPT: train GPT-2 (124M to 1.5B) from scratch on FineWeb-edu token shards.

One process (CPU, Apple MPS, or one GPU):
    python train_gpt.py
    python train_gpt.py --model tiny --device cpu --batch_size 8 --block_size 128 --total_batch_size 8192
Eight GPUs on one node:
    torchrun --standalone --nproc_per_node=8 train_gpt.py --compile
Two nodes of eight GPUs (run on every node, same --rdzv_endpoint):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=gpt2 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train_gpt.py --compile
Continue the newest checkpoint in --log_dir, or sample from one:
    python train_gpt.py --resume auto
    python train_gpt.py --resume log/model_19073.pt --sample "Hello, I'm a language model,"

Every flag: python train_gpt.py --help. The data comes from `python prepare.py`.
"""

import argparse
import dataclasses
import gc
import glob
import inspect
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import EOT_TOKEN, GPT2_VOCAB_SIZE, UserError, format_duration, gpt2_encoding


# -----------------------------------------------------------------------------
# configuration

@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can see (learned position embeddings)
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 tokens padded to a multiple of 128
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width


# Named model shapes; --n_layer/--n_head/--n_embd/--block_size/--vocab_size override any field.
MODEL_PRESETS = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=256),  # CPU smoke runs
    "d12": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 124M
    "d24": dict(n_layer=24, n_head=16, n_embd=1024),  # GPT-2 350M
    "d36": dict(n_layer=36, n_head=20, n_embd=1280),  # GPT-2 774M
    "d48": dict(n_layer=48, n_head=25, n_embd=1600),  # GPT-2 1.5B
}


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = "edu_fineweb10B"  # folder of *_train_*.npy / *_val_*.npy uint16 token shards (prepare.py)
    log_dir: str = "log"  # log.txt, run.json and model_*.pt checkpoints go here
    shuffle: bool = False  # permute the order of train shards each epoch (seeded, reproducible)
    # model
    model: str = "d12"  # model preset: tiny, d12 (124M), d24 (350M), d36 (774M), d48 (1.5B)
    n_layer: Optional[int] = None  # override the preset's number of blocks
    n_head: Optional[int] = None  # override the preset's attention heads
    n_embd: Optional[int] = None  # override the preset's width
    block_size: Optional[int] = None  # sequence length T (default: the preset's context, 1024 for GPT-2)
    vocab_size: Optional[int] = None  # override the embedding rows (default 50304)
    # batch and schedule
    batch_size: int = 64  # micro-batch B, sequences per forward pass per process
    total_batch_size: int = 524288  # tokens per optimizer step, across processes and accumulation steps
    max_steps: int = 19073  # optimizer steps (19073 x 524288 tokens = one pass over 10B tokens)
    warmup_steps: int = 715  # linear learning-rate warmup steps
    max_lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # learning rate at the end of the cosine decay
    weight_decay: float = 0.1  # AdamW weight decay, applied to 2-D weights only
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 turns clipping off)
    # evaluation, sampling, checkpoints
    val_every: int = 250  # validation loss every this many steps, and at the last step (0: last step only)
    val_steps: int = 20  # validation batches of total_batch_size tokens (the same tokens however it is split)
    hellaswag_every: int = 250  # HellaSwag accuracy every this many steps and at the last step (0: never)
    hellaswag_dir: str = ""  # folder holding hellaswag_val.jsonl (default: hellaswag.py's cache folder)
    sample_every: int = 250  # print sample completions every this many steps (0: never)
    sample: str = ""  # with --resume: print completions of this prompt and exit instead of training
    num_samples: int = 4  # completions per sampling
    sample_length: int = 32  # new tokens per completion
    checkpoint_every: int = 5000  # checkpoint every this many steps, and at the last step (0: last step only)
    keep_checkpoints: int = 3  # keep the newest this many checkpoints (0: keep all)
    resume: str = ""  # 'auto' continues the newest valid checkpoint in log_dir; or a checkpoint path
    # hardware
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model
    kernels: str = "auto"  # auto, cuda (the arcana_kernels extension) or torch (PyTorch ops)
    seed: int = 1337  # seed for initialization, data shuffling and sampling


CHOICES = {
    "model": sorted(MODEL_PRESETS),
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "kernels": ["auto", "cuda", "torch"],
}


def field_comments(cls):
    """The trailing `# comment` of each dataclass field: the one place a flag is documented."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train GPT-2 on token shards (see the module docstring for launch commands).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(default=f.default, help=comments.get(f.name, "").replace("%", "%%"))
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {Optional[int]: int, int: int, float: float, str: str}[f.type]
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv=None):
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def model_config(cfg):
    """Resolve --model and its overrides into a GPTConfig, refusing shapes that cannot work."""
    if cfg.model not in MODEL_PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    fields = dict(MODEL_PRESETS[cfg.model])
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(cfg, name) is not None:
            fields[name] = getattr(cfg, name)
    mc = GPTConfig(**fields)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(mc, name) < 1:
            raise UserError(f"--{name} {getattr(mc, name)} must be a positive integer")
    if mc.n_embd % mc.n_head:
        raise UserError(f"--n_embd {mc.n_embd} is not divisible by --n_head {mc.n_head}; "
                        f"the head size is n_embd / n_head, so pick values that divide evenly")
    if mc.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"--vocab_size {mc.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens")
    return mc


def check_train_config(cfg, mc, world_size):
    """Refuse invalid combinations before any work is done."""
    tokens_per_micro_step = cfg.batch_size * mc.block_size * world_size
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size {cfg.batch_size} must be at least 1")
    if cfg.total_batch_size % tokens_per_micro_step:
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size * block_size * "
            f"world_size = {cfg.batch_size} * {mc.block_size} * {world_size} = {tokens_per_micro_step}; "
            f"use a multiple of {tokens_per_micro_step} (e.g. {tokens_per_micro_step * max(1, round(cfg.total_batch_size / tokens_per_micro_step))})")
    if cfg.max_steps < 1:
        raise UserError(f"--max_steps {cfg.max_steps} must be at least 1")
    if not 0 <= cfg.min_lr <= cfg.max_lr:
        raise UserError(f"--min_lr {cfg.min_lr} must lie between 0 and --max_lr {cfg.max_lr}")
    if cfg.warmup_steps < 0 or cfg.grad_clip < 0:
        raise UserError("--warmup_steps and --grad_clip must not be negative")
    for name in ("val_every", "val_steps", "hellaswag_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "num_samples", "sample_length"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)} must not be negative")


# -----------------------------------------------------------------------------
# ops seam: the three hot ops (causal attention, LayerNorm, GELU) and the loss, behind one interface

class TorchOps:
    """The PyTorch path: the reference in tests, the fallback on CPU and MPS, the baseline in benchmarks."""
    name = "torch"

    def layer_norm(self, x, ln):
        return F.layer_norm(x, (x.size(-1),), ln.weight, ln.bias, ln.eps)

    def add_layer_norm(self, x, y, ln):
        """r = x + y, then LayerNorm(r): returns both (the new residual stream and its normalization)."""
        r = x + y
        return r, self.layer_norm(r, ln)

    def linear_gelu(self, x, fc):
        """GELU (tanh approximation, as GPT-2) of the Linear layer fc applied to x."""
        return F.gelu(F.linear(x, fc.weight, fc.bias), approximate="tanh")

    def attention(self, qkv, n_head):
        """Causal self-attention from c_attn's packed output (B, T, 3C); returns (B, T, C)."""
        B, T, C3 = qkv.shape
        q, k, v = qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C3 // 3)

    def lm_head_loss(self, h, weight, targets):
        """Logits h @ weight.T and their mean cross-entropy against targets (-1 = ignore)."""
        logits = F.linear(h, weight)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss


class CudaOps(TorchOps):
    """The compiled arcana_kernels extension (csrc/), on CUDA tensors. An op without a kernel yet falls back
    to the PyTorch method it inherits."""
    name = "cuda"

    def layer_norm(self, x, ln):
        """arcana::layer_norm_fwd: out has x's dtype, as F.layer_norm's (under autocast x is the float32
        residual stream, so both give float32)."""
        if ln.weight is None or ln.bias is None:
            return super().layer_norm(x, ln)
        out, _, _ = torch.ops.arcana.layer_norm_fwd(x.contiguous(), ln.weight, ln.bias, ln.eps)
        return out

    def add_layer_norm(self, x, y, ln):
        """arcana::add_layer_norm_fwd, reading the residual stream x and the branch output y once. Under
        autocast x is float32 and y bfloat16: the kernel takes that pair as it is and adds in fp32, as x + y
        does. Any other pair of dtypes is first cast to the dtype x + y would have."""
        if ln.weight is None or ln.bias is None:
            return super().add_layer_norm(x, y, ln)
        if y.dtype != x.dtype and x.dtype != torch.float32:
            dtype = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(dtype), y.to(dtype)
        r, h, _, _ = torch.ops.arcana.add_layer_norm_fwd(x.contiguous(), y.contiguous(), ln.weight, ln.bias, ln.eps)
        return r, h

    def linear_gelu(self, x, fc):
        """The matmul without its bias, then arcana::gelu_fwd adding the bias and applying GELU in one pass
        over the (B, T, 4C) activation. Under autocast the matmul gives bf16 and the kernel reads the float32
        bias as it is; the output has the matmul's dtype, as the PyTorch path's."""
        return torch.ops.arcana.gelu_fwd(F.linear(x, fc.weight).contiguous(), fc.bias)

    def attention(self, qkv, n_head):
        """The fused causal attention kernel, reading q, k and v in place from c_attn's output. It takes bf16 or
        fp16 (autocast runs) and head sizes 64 and 128; float32 runs (no autocast) and other head sizes get
        the PyTorch path, rather than a silent cast that would lower a float32 run's precision."""
        B, T, C3 = qkv.shape
        hs = C3 // (3 * n_head)
        if qkv.dtype not in (torch.bfloat16, torch.float16) or hs not in (64, 128):
            return super().attention(qkv, n_head)
        y, _ = torch.ops.arcana.attention_fwd(qkv.view(B, T, 3, n_head, hs))  # (B, T, nh, hs)
        return y.view(B, T, C3 // 3)

    def lm_head_loss(self, h, weight, targets):
        """The loss without the full logits tensor (chunked, the softmax/cross-entropy/dlogits part in one
        kernel pass); no logits are returned. float16 runs keep the PyTorch path: their GradScaler factor
        reaches the loss only in the backward, after the chunked path has stored dlogits (softmax / tokens,
        down to 1e-10) in float16, where they would flush to zero."""
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
        if dtype == torch.float16:
            return super().lm_head_loss(h, weight, targets)
        return None, chunked_lm_head_loss(h, weight, targets, use_kernel=True)


KERNELS = {"loaded": None, "error": None}  # whether `import arcana_kernels` worked, and why not


def load_kernels():
    """Import the extension once and register the Python half of its ops (fake implementations for
    torch.compile, autograd); True when torch.ops.arcana.* is usable."""
    if KERNELS["loaded"] is None:
        try:
            import arcana_kernels  # noqa: F401  (importing registers torch.ops.arcana.*)
        except ImportError as e:
            KERNELS.update(loaded=False, error=str(e))
        else:
            register_norm_gelu_ops()
            register_attention_ops()
            register_cross_entropy_ops()
            KERNELS["loaded"] = True
    return KERNELS["loaded"]


def register_norm_gelu_ops():
    """The Python half of the LayerNorm and GELU ops (csrc/layernorm.cu, csrc/gelu.cu; schemas in
    csrc/ops.cpp): fake implementations, so torch.compile traces through them without graph breaks, and
    autograd, each forward's backward calling its backward op with the forward's variant. mean and rstd are
    outputs without a gradient. A backward op computes every gradient it can; the ones no input needs are
    dropped here."""
    @torch.library.register_fake("arcana::layer_norm_fwd")
    def _(x, weight, bias, eps, variant=1):
        rows = x.shape[:-1]
        return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("arcana::add_layer_norm_fwd")
    def _(x, y, weight, bias, eps, variant=1):
        rows = x.shape[:-1]
        return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @torch.library.register_fake("arcana::layer_norm_bwd")
    def _(dout, x, weight, mean, rstd, dr=None, variant=1):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("arcana::gelu_fwd")
    def _(x, bias=None, variant=1):
        return x.new_empty(x.shape)

    @torch.library.register_fake("arcana::gelu_bwd")
    def _(dout, x, bias=None, variant=1):
        dbias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0, dtype=torch.float32)
        return x.new_empty(x.shape), dbias

    def layer_norm_setup(ctx, inputs, output):
        x, weight, bias, eps, variant = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.variant, ctx.bias_dtype = variant, bias.dtype

    def layer_norm_backward(ctx, dout, dmean, drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.arcana.layer_norm_bwd(dout.contiguous(), x, weight, mean, rstd, None,
                                                             ctx.variant)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dweight if need[1] else None,
                dbias.to(ctx.bias_dtype) if need[2] else None, None, None)

    torch.library.register_autograd("arcana::layer_norm_fwd", layer_norm_backward, setup_context=layer_norm_setup)

    def add_layer_norm_setup(ctx, inputs, output):
        x, y, weight, bias, eps, variant = inputs
        r, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(r, weight, mean, rstd)  # the backward normalizes r, not x
        ctx.variant, ctx.y_dtype, ctx.bias_dtype = variant, y.dtype, bias.dtype

    def add_layer_norm_backward(ctx, dr, dout, dmean, drstd):
        r, weight, mean, rstd = ctx.saved_tensors
        # d(loss)/dr = the gradient arriving at r (the next blocks) + the one through LayerNorm(r); x and y
        # get it both, y in its own dtype.
        dx, dweight, dbias = torch.ops.arcana.layer_norm_bwd(dout.contiguous(), r, weight, mean, rstd,
                                                             None if dr is None else dr.contiguous(), ctx.variant)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dx.to(ctx.y_dtype) if need[1] else None, dweight if need[2] else None,
                dbias.to(ctx.bias_dtype) if need[3] else None, None, None)

    torch.library.register_autograd("arcana::add_layer_norm_fwd", add_layer_norm_backward,
                                    setup_context=add_layer_norm_setup)

    def gelu_setup(ctx, inputs, output):
        x, bias, variant = inputs
        ctx.save_for_backward(x, bias)
        ctx.variant = variant

    def gelu_backward(ctx, dout):
        x, bias = ctx.saved_tensors
        dx, dbias = torch.ops.arcana.gelu_bwd(dout.contiguous(), x, bias, ctx.variant)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dbias if bias is not None and need[1] else None, None

    torch.library.register_autograd("arcana::gelu_fwd", gelu_backward, setup_context=gelu_setup)


def register_attention_ops():
    """The Python half of torch.ops.arcana.attention_fwd/_bwd (csrc/attention.cu): fake implementations, so
    torch.compile traces through them, and autograd: the backward of attention_fwd is attention_bwd, which
    recomputes the scores from qkv, out and lse; lse is an output without a gradient."""
    @torch.library.register_fake("arcana::attention_fwd")
    def _(qkv, variant=1):
        B, T, _, H, D = qkv.shape  # qkv (B, T, 3, H, D)
        return qkv.new_empty(B, T, H, D), qkv.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.register_fake("arcana::attention_bwd")
    def _(dout, qkv, out, lse, variant=1):
        return qkv.new_empty(qkv.shape)  # dqkv (B, T, 3, H, D), contiguous whatever qkv's strides

    def setup_context(ctx, inputs, output):
        qkv, variant = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.variant = variant
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, dlse):
        qkv, out, lse = ctx.saved_tensors
        return torch.ops.arcana.attention_bwd(dout, qkv, out, lse, ctx.variant), None

    torch.library.register_autograd("arcana::attention_fwd", backward, setup_context=setup_context)


def register_cross_entropy_ops():
    """The Python half of torch.ops.arcana.cross_entropy_fwd_bwd (csrc/cross_entropy.cu): its fake
    implementation, so torch.compile and opcheck see its shapes. No autograd: it already computes the gradient
    it is used for, inside arcana::lm_head_loss, whose autograd is registered below."""
    @torch.library.register_fake("arcana::cross_entropy_fwd_bwd")
    def _(logits, targets, grad_scale, compute_grad, variant=1):
        losses = logits.new_empty(logits.shape[:1], dtype=torch.float32)  # (rows,)
        return losses, logits.new_empty(logits.shape if compute_grad else (0,))  # dlogits (rows, V), or (0,)


def select_ops(kernels, device_type):
    """--kernels auto|cuda|torch on this device -> the ops object the model calls."""
    if kernels == "torch":
        return TorchOps()
    if kernels == "cuda":
        if device_type != "cuda":
            raise UserError(f"--kernels cuda needs a CUDA device, but this run uses {device_type}; "
                            f"use --kernels torch (or auto) here")
        if not load_kernels():
            raise UserError(f"--kernels cuda: the arcana_kernels extension is not built ({KERNELS['error']}); "
                            f"build it with `python setup.py build_ext --inplace` on a machine with nvcc, "
                            f"or use --kernels torch")
        return CudaOps()
    if kernels == "auto":
        return CudaOps() if device_type == "cuda" and load_kernels() else TorchOps()
    raise UserError(f"unknown --kernels {kernels!r}; choose auto, cuda or torch")


def cross_entropy_rows(logits, targets, grad_scale, compute_grad):
    """One chunk of the loss: per-row cross-entropy (0 where the target is -1) and, when compute_grad,
    d(sum of losses)/d(logits) * grad_scale (a number or a one-element fp32 tensor) in the logits' dtype (else
    an empty tensor). Softmax in fp32. The PyTorch twin of the arcana::cross_entropy_fwd_bwd kernel."""
    valid = targets != -1
    safe = targets.clamp(min=0).unsqueeze(1)
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    losses = torch.where(valid, lse - lf.gather(1, safe).squeeze(1), 0.0)
    if not compute_grad:
        return losses, logits.new_empty(0)
    grad = torch.exp(lf - lse.unsqueeze(1))  # softmax
    grad.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=grad.dtype))  # minus the one-hot target
    grad *= (valid.float() * grad_scale).unsqueeze(1)
    return losses, grad.to(logits.dtype)


MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=torch.float32) (CUDA)


@torch.library.custom_op("arcana::lm_head_loss", mutates_args=())
def lm_head_loss_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                    compute_grad: bool, use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits = h @ weight.T against targets (-1 = ignore), computed chunk_rows rows at
    a time so the (rows, vocab) logits never exist whole. The gradients are computed on the way (each chunk's
    dlogits is used at once and dropped), returned as (loss, dh, dweight); empty when not compute_grad."""
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    count = (t != -1).sum()
    grad_scale = 1.0 / count.clamp(min=1).float()  # stays on the device: the host never waits for the GPU here
    loss = torch.zeros((), dtype=torch.float64, device=h.device)  # a sum of many rows: keep its digits
    dh = torch.empty_like(h2) if compute_grad else h.new_empty(0)
    dweight = torch.zeros_like(weight, dtype=torch.float32) if compute_grad else weight.new_empty(0)
    for start in range(0, h2.size(0), chunk_rows):
        hc, tc = h2[start:start + chunk_rows], t[start:start + chunk_rows]
        logits = hc @ weight.t()  # (rows, vocab)
        if use_kernel:
            losses, dlogits = torch.ops.arcana.cross_entropy_fwd_bwd(logits, tc, grad_scale, compute_grad)
        else:
            losses, dlogits = cross_entropy_rows(logits, tc, grad_scale, compute_grad)
        del logits  # its memory serves the next chunk's logits
        loss += losses.sum(dtype=torch.float64)
        if compute_grad:
            torch.mm(dlogits, weight, out=dh[start:start + chunk_rows])  # written in place, no temporary
            if MM_OUT_DTYPE and dlogits.is_cuda and dlogits.dtype in (torch.bfloat16, torch.float16):
                # cuBLAS writes the fp32 product directly: no (vocab, C) bf16 temporary, rounding and copy
                dweight += torch.mm(dlogits.t(), hc, out_dtype=torch.float32)
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
    h, weight = inputs[0], inputs[1]
    _, dh, dweight = output
    ctx.save_for_backward(dh, dweight)
    ctx.weight_dtype = weight.dtype


def _lm_head_loss_backward(ctx, grad_loss, grad_dh, grad_dweight):
    dh, dweight = ctx.saved_tensors
    if dh.numel() == 0:
        raise RuntimeError("arcana::lm_head_loss was called with compute_grad=False, so it has no gradients")
    return grad_loss.to(dh.dtype) * dh, (grad_loss * dweight).to(ctx.weight_dtype), None, None, None, None


lm_head_loss_op.register_autograd(_lm_head_loss_backward, setup_context=_lm_head_loss_setup)


def chunked_lm_head_loss(h, weight, targets, chunk_rows=8192, use_kernel=False):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) without materializing the logits: peak
    memory holds one chunk of (chunk_rows, vocab) logits instead of all (B*T, vocab). Under autocast the
    matmuls run in the autocast dtype, as F.linear's would."""
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = lm_head_loss_op(h, weight, targets, chunk_rows, compute_grad, use_kernel)
    return loss


# -----------------------------------------------------------------------------
# model

class CausalSelfAttention(nn.Module):

    def __init__(self, config, ops):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.n_head = config.n_head
        self.ops = ops

    def forward(self, h):
        return self.c_proj(self.ops.attention(self.c_attn(h), self.n_head))  # (B, T, C)


class MLP(nn.Module):

    def __init__(self, config, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.ops = ops

    def forward(self, h):
        return self.c_proj(self.ops.linear_gelu(h, self.c_fc))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):

    def __init__(self, config, ops):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config, ops)
        self.ops = ops

    def forward(self, x, h, ln_next):
        """GPT-2's block, x + attn(ln_1(x)) then x + mlp(ln_2(x)), with each residual add fused with the
        LayerNorm that follows it. x is the residual stream, h = ln_1(x) computed by the caller, and the
        result is (new residual stream, ln_next of it) for the next block (or the final LayerNorm)."""
        x, h = self.ops.add_layer_norm(x, self.attn(h), self.ln_2)
        x, h = self.ops.add_layer_norm(x, self.mlp(h), ln_next)
        return x, h


class GPT(nn.Module):

    def __init__(self, config, ops=None):
        super().__init__()
        self.config = config
        self.ops = ops or TorchOps()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embedding, as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5  # each block adds two projections to the residual stream
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_ops(self, ops):
        """Switch every module to another ops implementation (weights untouched)."""
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # the tied wte/lm_head weight counts once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        blocks = self.transformer.h
        h = self.ops.layer_norm(x, blocks[0].ln_1)
        for i, block in enumerate(blocks):
            ln_next = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            x, h = block(x, h, ln_next)
        if targets is None:
            return self.lm_head(h), None  # (B, T, vocab)
        return self.ops.lm_head_loss(h, self.lm_head.weight, targets)

    def configure_optimizer(self, weight_decay, learning_rate, device_type):
        """AdamW; weight decay on matrices and embeddings (>= 2-D), none on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 fused=(device_type == "cuda"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, top_k=50, generator=None, real_vocab=GPT2_VOCAB_SIZE):
        """Extend idx (B, T) by max_new_tokens tokens sampled from the top_k most likely, one at a time."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :real_vocab].float()  # padding rows are never real tokens
            probs = F.softmax(logits, dim=-1)
            topk_probs, topk_idx = torch.topk(probs, min(top_k, real_vocab), dim=-1)
            choice = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, torch.gather(topk_idx, -1, choice)), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir, ops=None):
        """OpenAI's GPT-2 weights from a local Hugging Face-format directory (no network) or, when the hub
        is reachable, by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        if os.path.isdir(name_or_dir):
            path = name_or_dir
        elif name_or_dir in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
            try:
                from huggingface_hub import snapshot_download
                path = snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors"])
            except Exception as e:
                raise UserError(f"could not fetch {name_or_dir} from the Hugging Face hub ({type(e).__name__}: {e}); "
                                f"download the repository elsewhere and pass its directory instead") from e
        else:
            raise UserError(f"{name_or_dir!r} is neither a directory nor one of gpt2, gpt2-medium, gpt2-large, gpt2-xl")
        return cls._from_hf_dir(path, ops)

    @classmethod
    def _from_hf_dir(cls, path, ops):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path} has no config.json; expected a Hugging Face GPT-2 directory")
        with open(config_path) as f:
            hf = json.load(f)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{config_path}: activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        safetensors_path = os.path.join(path, "model.safetensors")
        bin_path = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(safetensors_path):
            from safetensors.torch import load_file
            sd_hf = load_file(safetensors_path)
        elif os.path.isfile(bin_path):
            sd_hf = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{path} has neither model.safetensors nor pytorch_model.bin")
        model = cls(config, ops)
        sd = model.state_dict()
        transposed = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        loaded = set()
        for key, value in sd_hf.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the causal-mask buffers of older checkpoints, not weights
            name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if name not in sd:
                raise UserError(f"{path}: unexpected weight {key!r} for a GPT-2 model")
            if name.endswith(transposed):
                value = value.t()  # Hugging Face's Conv1D stores (in, out); nn.Linear wants (out, in)
            if value.shape != sd[name].shape:
                raise UserError(f"{path}: weight {key!r} has shape {tuple(value.shape)}, expected {tuple(sd[name].shape)}")
            with torch.no_grad():
                sd[name].copy_(value)
            loaded.add(name)
        loaded |= {"lm_head.weight"} if "transformer.wte.weight" in loaded else set()  # tied
        missing = sorted(set(sd) - loaded)
        if missing:
            raise UserError(f"{path}: missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return model


# -----------------------------------------------------------------------------
# data

def find_shards(data_dir, split):
    """The sorted *.npy shards in data_dir whose names contain split ('train' or 'val')."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} does not exist; run `python prepare.py` first "
                        f"(or point --data_dir at the folder it wrote)")
    shards = sorted(glob.glob(os.path.join(data_dir, f"*{split}*.npy")))
    if not shards:
        raise UserError(f"--data_dir {data_dir} has no *_{split}_*.npy shards; run `python prepare.py` first "
                        f"(prepare.py --out_dir {data_dir} writes them there)")
    return shards


def open_shard(path):
    """Memory-map one token shard (never loaded whole), checking that it is a 1-D array of integers."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"shard {path} is corrupt or truncated ({e}); delete it and run prepare.py again") from e
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise UserError(f"shard {path} holds a {tokens.dtype} array of shape {tokens.shape}, "
                        f"not a 1-D array of token ids; regenerate it with prepare.py")
    return tokens


class ShardLoader:
    """Contiguous (B, T) windows from a list of token shards. Each optimizer micro-step takes one span of
    B*T*world_size tokens; rank r reads window r of the span, so ranks read disjoint data and the set of
    tokens per step does not depend on how it is split across processes. At the end of a shard the loader
    moves to the next (dropping the tail that does not fill a span) and wraps around at the end of the list."""

    def __init__(self, shards, B, T, rank=0, world_size=1, vocab_size=None, shuffle=False, seed=0):
        self.shards, self.B, self.T = shards, B, T
        self.rank, self.world_size = rank, world_size
        self.vocab_size, self.shuffle, self.seed = vocab_size, shuffle, seed
        self.span = B * T * world_size
        self.lengths = [len(open_shard(p)) for p in shards]  # opens (and so checks) every shard up front
        if all(n < self.span + 1 for n in self.lengths):
            raise UserError(f"every shard in {os.path.dirname(shards[0]) or '.'} is shorter than one batch of "
                            f"batch_size * block_size * world_size + 1 = {self.span + 1} tokens; "
                            f"lower --batch_size or --block_size, or prepare more data")
        self.reset()

    def order(self, epoch):
        if not self.shuffle:
            return list(range(len(self.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]

    def reset(self):
        self.load_state_dict({"epoch": 0, "index": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.index, self.pos = state["epoch"], state["index"], state["pos"]
        self._open()
        if self.pos + self.span + 1 > len(self.tokens):  # a stored position past a usable window
            self._next_shard()

    def _open(self):
        self.path = self.shards[self.order(self.epoch)[self.index]]
        self.tokens = open_shard(self.path)

    def _next_shard(self):
        while True:
            self.index += 1
            if self.index == len(self.shards):
                self.epoch, self.index = self.epoch + 1, 0
            self.pos = 0
            self._open()
            if len(self.tokens) >= self.span + 1:
                return

    def next_batch(self):
        start = self.pos + self.rank * self.B * self.T
        buf = np.asarray(self.tokens[start:start + self.B * self.T + 1], dtype=np.int64)
        if self.vocab_size is not None and buf.max() >= self.vocab_size:
            raise UserError(f"shard {self.path} holds token id {buf.max()} at or past the model's vocab_size "
                            f"{self.vocab_size}; it was not written by a GPT-2 tokenizer (re-run prepare.py)")
        buf = torch.from_numpy(buf)
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        self.pos += self.span
        if self.pos + self.span + 1 > len(self.tokens):
            self._next_shard()
        return x, y


# -----------------------------------------------------------------------------
# runtime: device, processes, precision

@dataclass
class Runtime:
    rank: int  # this process among all processes
    local_rank: int  # this process on its node (its GPU index)
    world_size: int  # processes in the run
    device: str  # e.g. cuda:3, cpu, mps
    device_type: str  # cuda, cpu or mps
    master: bool  # rank 0: the one process that logs and writes checkpoints
    ddp: bool  # launched by torchrun


def resolve_device(name, local_rank):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if re.fullmatch(r"cuda:\d+", name):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
        if int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name, "cuda"
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
        return name, "mps"
    if name == "cpu":
        return name, "cpu"
    raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def setup_runtime(device_name):
    ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device, device_type = resolve_device(device_name, local_rank)
    if ddp:
        if device_type == "mps":
            raise UserError("multi-process training on MPS is not supported; run one process with python train_gpt.py")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device, device_type, rank == 0, ddp)


def resolve_dtype(name, device_type):
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device_type, dtype):
    """Mixed precision for matmuls when dtype is 16-bit; weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def all_reduce_mean(t, rt):
    """Mean across processes (SUM then divide: gloo has no AVG)."""
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= rt.world_size
    return t


def device_name(rt):
    if rt.device_type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    return platform.processor() or platform.machine()


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


# bf16 dense tensor-core peak FLOP/s by device name (vendor datasheets); the first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A6000", 155e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
]


def peak_flops(rt, dtype):
    """The device's bf16/fp16 dense peak, or None where unknown (no MFU is shown then)."""
    if rt.device_type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(rt.device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(model, T):
    """Training FLOPs per token: 6 per weight that multiplies (all but the position embedding), plus
    causal attention's 6 * n_layer * n_embd * T (half of the full T x T score and value matmuls)."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 6 * c.n_layer * c.n_embd * T


# -----------------------------------------------------------------------------
# evaluation and sampling

def batch_to_device(x, y, device):
    """A batch from the loader on the run's device. A CPU batch bound for a GPU is pinned first: a copy from
    pinned memory is queued behind the GPU's work, where one from pageable memory may wait for it."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate_val(model, loader, micro_batches, rt, amp):
    """Mean loss over the first micro_batches windows of each rank in the val shards (always the same tokens)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=rt.device)
    for _ in range(micro_batches):
        x, y = batch_to_device(*loader.next_batch(), rt.device)
        with amp:
            _, loss = model(x, y)
        total += loss.detach().float()
    model.train()
    return all_reduce_mean(total / micro_batches, rt).item()


def print_samples(model, prompt, num_samples, length, rt, amp, seed):
    enc = gpt2_encoding()
    tokens = enc.encode_ordinary(prompt) or [EOT_TOKEN]
    idx = torch.tensor(tokens, dtype=torch.long, device=rt.device).unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=rt.device).manual_seed(seed)  # its own stream: training RNG untouched
    model.eval()
    with amp:
        out = model.generate(idx, length, top_k=50, generator=generator)
    model.train()
    for i, row in enumerate(out.tolist()):
        print(f"sample {i}: {enc.decode(row)!r}")


# -----------------------------------------------------------------------------
# checkpoints

def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """(step, path) of every model_NNNNN.pt in log_dir, newest first; temp files are not listed."""
    found = []
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def atomic_torch_save(obj, path):
    """Write to a temp file beside path, flush it to disk, then rename: a kill mid-write never leaves a
    corrupt file under the final name."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state():
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {  # plain lists and tensors only, so checkpoints load with weights_only=True
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """A checkpoint dict, or a UserError saying why it does not load."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())  # torch's messages span lines; errors here are one line
        raise UserError(f"checkpoint {path} does not load ({type(e).__name__}: {reason}); "
                        f"it may be truncated or not an ArcanaGPT checkpoint") from e
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= set(ckpt):
        raise UserError(f"checkpoint {path} is not an ArcanaGPT checkpoint (no model, model_config and step)")
    return ckpt


def newest_valid_checkpoint(log_dir):
    """The newest checkpoint in log_dir that loads, skipping (with a warning) any that do not."""
    for _, path in list_checkpoints(log_dir):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None, None


def model_from_checkpoint(path, device="cpu", ops=None):
    """(GPT with the checkpoint's weights on device, the checkpoint dict): for sampling and evaluation."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]), ops)
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# logging

def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class RunLog:
    """log_dir/log.txt in build-nanogpt's `{step} {stream} {value}` format, written by the master only."""

    def __init__(self, log_dir, master):
        self.path = os.path.join(log_dir, "log.txt")
        self.master = master

    def truncate_after(self, step):
        """Keep what a run resumed at `step` has already logged: train lines before it, and val/hella lines
        up to it (those were measured before the checkpoint was written). The rest is rewritten."""
        if not (self.master and os.path.exists(self.path)):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0].isdigit():
                    s = int(parts[0])
                    if s < step or (s == step and parts[1] != "train"):
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step, stream, value):
        if self.master:
            with open(self.path, "a") as f:
                f.write(f"{step} {stream} {value}\n")


# -----------------------------------------------------------------------------
# training

def learning_rate(step, cfg):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


def forward_backward(model, ddp_model, loader, grad_accum, device, amp, scaler=None):
    """Gradients of one optimizer step's mean loss over grad_accum micro-batches, accumulated in .grad;
    under DDP (ddp_model given) they are synchronized on the last micro-batch only. Returns the mean loss."""
    model.train()
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = batch_to_device(*loader.next_batch(), device)
        sync = ddp_model is None or micro_step == grad_accum - 1
        with (nullcontext() if sync else ddp_model.no_sync()):
            with amp:
                _, loss = model(x, y)
            loss = loss.float() / grad_accum  # the mean over the whole step, not a sum of micro-step means
            loss_accum += loss.detach()
            (scaler.scale(loss) if scaler else loss).backward()
    return loss_accum


def due(step, every, last):
    return last or (every > 0 and step % every == 0)


class StopRequest:
    """SIGINT/SIGTERM ask the run to finish its step, checkpoint and exit 0; a second signal aborts."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              f"(send it again to abort at once)", file=sys.stderr, flush=True)


def resolve_resume(cfg):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run."""
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        path, ckpt = newest_valid_checkpoint(cfg.log_dir)
        if path is None:
            print(f"--resume auto: no valid checkpoint in {cfg.log_dir}; starting from scratch")
        return path, ckpt
    return cfg.resume, load_checkpoint(cfg.resume)


def check_fresh_log_dir(cfg):
    """A fresh run must not overwrite an earlier run's log and checkpoints."""
    log_txt = os.path.join(cfg.log_dir, "log.txt")
    if list_checkpoints(cfg.log_dir) or (os.path.exists(log_txt) and os.path.getsize(log_txt) > 0):
        raise UserError(f"--log_dir {cfg.log_dir} already holds a run (log.txt or model_*.pt); "
                        f"pass --resume auto to continue it, or choose another --log_dir")


def sample_from_checkpoint(cfg):
    """`--sample PROMPT --resume PATH|auto`: print completions and return."""
    path, ckpt = resolve_resume(cfg)
    if path is None:
        raise UserError("--sample needs a checkpoint: pass --resume PATH (or --resume auto with a --log_dir holding one)")
    rt = setup_runtime(cfg.device)
    mc = GPTConfig(**ckpt["model_config"])
    if cfg.block_size is not None and cfg.block_size > mc.block_size:
        raise UserError(f"--block_size {cfg.block_size} is larger than checkpoint {path}'s block_size {mc.block_size}")
    model = GPT(mc, select_ops(cfg.kernels, rt.device_type))
    model.load_state_dict(ckpt["model"])
    model.to(rt.device)
    amp = autocast_context(rt.device_type, resolve_dtype(cfg.dtype, rt.device_type))
    print(f"{path}: step {ckpt['step']}, val loss {ckpt.get('val_loss')}")
    print_samples(model, cfg.sample, cfg.num_samples, cfg.sample_length, rt, amp, cfg.seed)


def train(cfg):
    """Run training as configured; returns the process exit code."""
    mc = model_config(cfg)
    rt = setup_runtime(cfg.device)
    check_train_config(cfg, mc, rt.world_size)
    B, T = cfg.batch_size, mc.block_size
    grad_accum = cfg.total_batch_size // (B * T * rt.world_size)
    dtype = resolve_dtype(cfg.dtype, rt.device_type)
    amp = autocast_context(rt.device_type, dtype)
    ops = select_ops(cfg.kernels, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves

    resume_path, ckpt = resolve_resume(cfg)
    if ckpt is not None and ckpt["model_config"] != asdict(mc):
        diff = ", ".join(f"{k}={ckpt['model_config'].get(k)} (this run: {v})"
                         for k, v in asdict(mc).items() if ckpt["model_config"].get(k) != v)
        raise UserError(f"checkpoint {resume_path} has a different model: {diff}; "
                        f"pass the same --model/--n_* flags, or another --log_dir")
    if not cfg.resume:
        check_fresh_log_dir(cfg)

    train_loader = ShardLoader(find_shards(cfg.data_dir, "train"), B, T, rt.rank, rt.world_size,
                               vocab_size=mc.vocab_size, shuffle=cfg.shuffle, seed=cfg.seed)
    val_loader = ShardLoader(find_shards(cfg.data_dir, "val"), B, T, rt.rank, rt.world_size,
                             vocab_size=mc.vocab_size)

    torch.manual_seed(cfg.seed)
    raw_model = GPT(mc, ops).to(rt.device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type) if dtype == torch.float16 else None
    start_step = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["train_loader"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        if ckpt.get("world_size", rt.world_size) != rt.world_size:
            print(f"warning: {resume_path} was written by {ckpt['world_size']} processes, this run has "
                  f"{rt.world_size}: the data order from here on differs from the original run", file=sys.stderr)
    # gradient_as_bucket_view: after the all-reduce, .grad is a view into DDP's bucket instead of a copy of it:
    # one gradient-sized copy per step and one gradient-sized buffer fewer. Safe with this loop: grads are set
    # to None (never detach_()ed), the no_sync micro-steps accumulate into fresh tensors that the synchronized
    # one copies into the bucket, and clipping and the fused AdamW only read or scale .grad in place.
    ddp_model = DDP(raw_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    broadcast_buffers=False, gradient_as_bucket_view=True) if rt.ddp else None
    model = ddp_model or raw_model
    if cfg.compile:
        model = torch.compile(model)  # compiling the DDP wrapper lets it overlap gradient sync with backward

    log = RunLog(cfg.log_dir, rt.master)
    if rt.master:
        os.makedirs(cfg.log_dir, exist_ok=True)
        if ckpt is not None:
            log.truncate_after(start_step)
        elif os.path.exists(log.path):
            os.replace(log.path, log.path + ".bak")  # --resume auto without a checkpoint: keep the old log
        write_json_atomic({
            "config": asdict(cfg), "model_config": asdict(mc), "resumed_from": resume_path,
            "start_step": start_step, "tokens_per_step": cfg.total_batch_size, "grad_accum_steps": grad_accum,
            "world_size": rt.world_size, "device": rt.device, "device_name": device_name(rt),
            "dtype": str(dtype).replace("torch.", ""), "kernels": ops.name, "parameters": raw_model.num_params(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "cuda": torch.version.cuda},
            "git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, os.path.join(cfg.log_dir, "run.json"))
        print(f"config: {json.dumps(asdict(cfg))}")
        print(f"model: {json.dumps(asdict(mc))}, {raw_model.num_params():,} parameters")
        print(f"{rt.world_size} process(es) on {rt.device}, {str(dtype).replace('torch.', '')}, kernels {ops.name}, "
              f"compile {cfg.compile}; {cfg.total_batch_size:,} tokens per step = {B} x {T} x {rt.world_size} "
              f"x {grad_accum} accumulation steps")
        if resume_path:
            print(f"resuming from {resume_path} at step {start_step}")

    hellaswag_path = None
    if cfg.hellaswag_every > 0:
        import hellaswag
        hellaswag_path = hellaswag.find_data("val", cfg.hellaswag_dir or None)
        if hellaswag_path is not None:
            try:  # a bad file is refused now, not at the first evaluation
                hellaswag.load_examples(hellaswag_path, require_labels=True)
            except hellaswag.HellaSwagError as e:
                raise UserError(f"--hellaswag_dir: {e}") from None
        if hellaswag_path is None and rt.master:
            print(f"HellaSwag data not found in {cfg.hellaswag_dir or hellaswag.DEFAULT_DATA_DIR}: skipping it "
                  f"(run `python hellaswag.py --download` once to fetch it)")

    sample_every = cfg.sample_every
    if rt.master and sample_every > 0:
        try:  # sampling is a nicety: without a tokenizer the run goes on, and says so now, not at step 250
            gpt2_encoding()
        except UserError as e:
            print(f"warning: {e}; sampling is off for this run", file=sys.stderr)
            sample_every = 0

    peak = peak_flops(rt, dtype)
    flops_step = flops_per_token(raw_model, T) * cfg.total_batch_size
    step_times = []
    val_loss = None
    last_checkpoint = resume_path
    stop_agreed = False  # set only from a value every process sees, so all stop at the same step
    with StopRequest() as stop:
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            resumed_here = ckpt is not None and step == start_step  # evals and checkpoint of this step already done
            stopping = stop_agreed
            if not resumed_here and not stopping:
                if due(step, cfg.val_every, last):
                    val_loss = evaluate_val(model, val_loader, cfg.val_steps * grad_accum, rt, amp)
                    log.write(step, "val", f"{val_loss:.4f}")
                    if rt.master:
                        print(f"step:{step}/{cfg.max_steps} val_loss:{val_loss:.4f}")
                if hellaswag_path and due(step, cfg.hellaswag_every, last):
                    model.eval()
                    with amp:
                        correct_norm, correct, total = hellaswag.evaluate(
                            model, rt.device, rt.rank, rt.world_size, path=hellaswag_path)
                    model.train()
                    log.write(step, "hella", f"{correct_norm / total:.4f}")
                    if rt.master:
                        print(f"step:{step}/{cfg.max_steps} hella_acc_norm:{correct_norm / total:.4f} "
                              f"acc:{correct / total:.4f} ({total} examples)")
                if rt.master and sample_every > 0 and step > 0 and due(step, sample_every, last):
                    print_samples(raw_model, "Hello, I'm a language model,", cfg.num_samples, cfg.sample_length,
                                  rt, amp, cfg.seed + step)
            checkpoint_due = step > start_step and (stopping or due(step, cfg.checkpoint_every, last))
            if checkpoint_due and rt.master:
                path = checkpoint_path(cfg.log_dir, step)
                atomic_torch_save({
                    "model": raw_model.state_dict(), "config": asdict(cfg), "model_config": asdict(mc), "step": step,
                    "val_loss": val_loss if due(step, cfg.val_every, last) and not stopping else None,
                    "optimizer": optimizer.state_dict(), "train_loader": train_loader.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(),
                    "world_size": rt.world_size,
                }, path)
                last_checkpoint = path
                print(f"saved {path}")
                if cfg.keep_checkpoints > 0:
                    for _, old in list_checkpoints(cfg.log_dir)[cfg.keep_checkpoints:]:
                        os.remove(old)
            if last or stopping:
                if last and step == start_step and ckpt is not None and rt.master:
                    print(f"nothing to do: {resume_path} is already at --max_steps {cfg.max_steps}")
                break

            synchronize(rt.device_type)
            t0 = time.time()
            optimizer.zero_grad(set_to_none=True)
            loss_accum = forward_backward(model, ddp_model, train_loader, grad_accum, rt.device, amp, scaler)
            stats = torch.stack([loss_accum, torch.tensor(float(stop.requested), device=rt.device)])
            if rt.ddp:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            loss_value = stats[0].item() / rt.world_size
            stop_agreed = stats[1].item() > 0  # one process signalled: all stop at the same step
            if scaler:
                scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm).item()
            if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm)):
                if rt.master:
                    print(f"error: step {step}: loss {loss_value}, gradient norm {norm}: training diverged. Stopping "
                          f"without writing a checkpoint; the last good one is {last_checkpoint or '(none)'}. "
                          f"Resume from it with a lower --max_lr or a longer --warmup_steps.", file=sys.stderr)
                return 1
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            synchronize(rt.device_type)
            dt = time.time() - t0
            step_times = (step_times + [dt])[-50:]
            log.write(step, "train", f"{loss_value:.6f}")
            if rt.master:
                tokens_per_sec = cfg.total_batch_size / dt
                mfu = f" mfu:{100 * flops_step / dt / (peak * rt.world_size):.1f}%" if peak else ""
                eta = format_duration(sum(step_times) / len(step_times) * (cfg.max_steps - step - 1))
                print(f"step:{step}/{cfg.max_steps} loss:{loss_value:.6f} lr:{lr:.4e} norm:{norm:.4f} "
                      f"dt:{dt * 1000:.1f}ms tok/s:{tokens_per_sec:,.0f}{mfu} eta:{eta}", flush=True)
    return 0


# -----------------------------------------------------------------------------
# entry point

def main(argv=None):
    cfg = parse_config(argv)
    try:
        if cfg.sample:
            sample_from_checkpoint(cfg)
            return 0
        return train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        end_distributed()


def end_distributed():
    """Destroy the process group while Python is fully alive. DDP keeps it in reference cycles, so collect them
    first: a gloo worker thread that lets go of its last tensors during interpreter shutdown aborts the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
