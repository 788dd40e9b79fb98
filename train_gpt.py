"""
ArcanaGPT: train GPT-2 (124M to 1.5B) from scratch on FineWeb-edu token shards.

One process (CPU, Apple MPS, or one GPU):
    python train_gpt.py
    python train_gpt.py --model tiny --device cpu --batch_size 8 --block_size 128 --total_batch_size 8192
Eight GPUs on one node:
    torchrun --standalone --nproc_per_node=8 train_gpt.py
Two nodes of eight GPUs (run on every node, same --rdzv_endpoint; --log_dir on storage both nodes share):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=gpt2 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train_gpt.py --log_dir /shared/log
Continue the newest checkpoint in --log_dir, or sample from one:
    python train_gpt.py --resume auto
    python train_gpt.py --resume log/model_19073.pt --sample "Hello, I'm a language model,"

The data comes from `python prepare.py`; every flag is in `python train_gpt.py --help`.
"""

import gc
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from prepare import (
    EOT_TOKEN,
    GPT2_VOCAB_SIZE,
    UserError,
    atomic_write,
    config_parser,
    format_duration,
    gpt2_encoding,
    gpt2_files,
    read_manifest,
)

# -----------------------------------------------------------------------------
# configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can see (learned position embeddings)
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 tokens padded to a multiple of 128
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width


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
    data_dir: str = (
        "edu_fineweb10B"  # folder of *_train_*.npy / *_val_*.npy token shards (prepare.py)
    )
    log_dir: str = "log"  # log.txt, run.json and the model_*.pt checkpoints go here
    shuffle: bool = False  # permute the order of train shards each epoch (seeded, reproducible)
    # model
    model: Optional[str] = (
        None  # model preset: tiny, d12 (124M, the default), d24 (350M), d36 (774M), d48 (1.5B)
    )
    n_layer: Optional[int] = None  # override the preset's number of blocks
    n_head: Optional[int] = None  # override the preset's attention heads
    n_embd: Optional[int] = None  # override the preset's width
    block_size: Optional[int] = (
        None  # sequence length T (default: the preset's context, 1024 for GPT-2)
    )
    vocab_size: Optional[int] = None  # override the embedding rows (default 50304)
    init_from: str = ""  # start from OpenAI's GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local HF folder
    # batch and schedule
    batch_size: int = 64  # micro-batch B, sequences per forward pass per process
    total_batch_size: int = (
        524288  # tokens per optimizer step, across processes and accumulation steps
    )
    max_steps: int = 19073  # optimizer steps (19073 x 524288 tokens = one pass over 10B tokens)
    warmup_steps: int = 715  # linear learning-rate warmup steps
    max_lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr: float = 6e-5  # learning rate at the end of the cosine decay
    weight_decay: float = 0.1  # AdamW weight decay, applied to 2-D weights only
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 turns clipping off)
    # evaluation, sampling, checkpoints
    val_every: int = (
        250  # validation loss every this many steps, and after the last step (0: last step only)
    )
    val_steps: int = (
        20  # validation batches of total_batch_size tokens (the same tokens however it is split)
    )
    hellaswag_every: int = (
        250  # HellaSwag accuracy every this many steps and after the last step (0: never)
    )
    hellaswag_dir: str = (
        ""  # folder holding hellaswag_val.jsonl (default: hellaswag.py's cache folder)
    )
    sample_every: int = 250  # print sample completions every this many steps (0: never)
    sample: str = ""  # with --resume: print completions of this prompt and exit instead of training
    num_samples: int = 4  # completions per sampling
    sample_length: int = 32  # new tokens per completion
    checkpoint_every: int = (
        5000  # checkpoint every this many steps, and after the last step (0: last step only)
    )
    keep_checkpoints: int = 3  # keep the newest this many checkpoints (0: keep all)
    resume: str = (
        ""  # 'auto' continues the newest valid checkpoint in log_dir; or a checkpoint path
    )
    branch: bool = False  # with --resume PATH older than log_dir's newest: continue it, moving the later ones aside
    export: str = (
        ""  # with --resume: write the checkpoint as a Hugging Face GPT-2 folder here, and exit
    )
    # hardware
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16
    compile: Optional[bool] = None  # torch.compile the model (default: on CUDA, off on CPU and MPS)
    kernels: str = "auto"  # auto, cuda (the arcana_kernels extension) or torch (PyTorch ops)
    seed: int = 1337  # seed for initialization, data shuffling and sampling


DTYPES = ["auto", "float32", "bfloat16", "float16"]  # --dtype, here and in hellaswag.py and bench.py
KERNELS = ["auto", "cuda", "torch"]  # --kernels, likewise


def parse_config(argv=None):
    parser = config_parser(
        TrainConfig,
        __doc__,
        model=dict(choices=sorted(MODEL_PRESETS)),
        dtype=dict(choices=DTYPES),
        kernels=dict(choices=KERNELS),
    )
    return TrainConfig(**vars(parser.parse_args(argv)))


def model_config(cfg, base=None, source=None):
    """The model's shape: --model's preset with the shape flags over it, refusing shapes that cannot work. Resuming,
    or starting from pretrained weights, the shape is theirs (base, from source), and a flag may not differ."""
    flags = {
        k: v for k, v in asdict(cfg).items() if k in GPTConfig.__annotations__ and v is not None
    }
    if base is not None:
        stated = {**(MODEL_PRESETS[cfg.model] if cfg.model else {}), **flags}
        diff = ", ".join(f"{k}={base[k]} (flags: {v})" for k, v in stated.items() if base[k] != v)
        if diff:
            hint = ", or use another --log_dir for a new run" if cfg.resume == "auto" else ""
            raise UserError(
                f"{source} has a different model: {diff}; leave out --model and the shape flags (the "
                f"shape comes with the weights){hint}"
            )
        return GPTConfig(**base)
    mc = GPTConfig(**{**MODEL_PRESETS[cfg.model or "d12"], **flags})
    for name, value in asdict(mc).items():
        if value < 1:
            raise UserError(f"--{name} {value} must be at least 1")
    if mc.n_embd % mc.n_head:
        raise UserError(
            f"--n_embd {mc.n_embd} is not divisible by --n_head {mc.n_head}; pick values that divide "
            f"evenly (the head size is n_embd / n_head)"
        )
    if mc.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {mc.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens"
        )
    return mc


def check_flags(cfg):
    """Refuse sizes and counts that cannot work (every mode: training, --sample, --export)."""
    for name in (
        "batch_size",
        "total_batch_size",
        "max_steps",
        "val_steps",
        "num_samples",
        "sample_length",
    ):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)} must be at least 1")
    for name in (
        "warmup_steps",
        "grad_clip",
        "min_lr",
        "weight_decay",
        "val_every",
        "hellaswag_every",
        "sample_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)} must not be negative")
    if cfg.min_lr > cfg.max_lr:
        raise UserError(f"--min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}")
    if cfg.init_from and cfg.resume:
        raise UserError(
            "--init_from starts a run from pretrained weights and --resume continues one: pass one of them"
        )


# -----------------------------------------------------------------------------
# model


class TorchOps:
    """The hot ops the model calls, in PyTorch: the reference in tests, the fallback on CPU and MPS, the baseline
    in benchmarks. csrc.CudaOps runs the same ops on the project's kernels."""

    name = "torch"

    def layer_norm(self, x, ln):
        return F.layer_norm(x, (x.size(-1),), ln.weight, ln.bias, ln.eps)

    def add_layer_norm(self, x, y, ln):
        """The residual add x + y and the LayerNorm after it: (new residual stream, its normalization)."""
        r = x + y
        return r, self.layer_norm(r, ln)

    def linear_gelu(self, x, fc):
        return F.gelu(
            F.linear(x, fc.weight, fc.bias), approximate="tanh"
        )  # GPT-2's tanh approximation

    def attention(self, qkv, n_head):
        """Causal self-attention from c_attn's packed output (B, T, 3C); returns (B, T, C)."""
        B, T, C3 = qkv.shape
        q, k, v = (
            qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C3 // 3)

    def lm_head_loss(self, h, weight, targets):
        """(logits h @ weight.T, their mean cross-entropy against targets; -1 = no target)."""
        logits = F.linear(h, weight)  # (B, T, vocab)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss


HF_CONV1D = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)  # (in, out) there


class CausalSelfAttention(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.n_head, self.ops = config.n_head, ops

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
        self.ln_1 = nn.LayerNorm(
            config.n_embd
        )  # applied before the block: by GPT.forward or the block before
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config, ops)
        self.ops = ops

    def forward(self, x, h, ln_next):
        """GPT-2's block, x + attn(ln_1(x)) then x + mlp(ln_2(x)), with each residual add fused with the LayerNorm
        after it: h = ln_1(x) comes from the caller, and the result is (x, ln_next(x)) for the next block."""
        x, h = self.ops.add_layer_norm(x, self.attn(h), self.ln_2)
        return self.ops.add_layer_norm(x, self.mlp(h), ln_next)


class GPT(nn.Module):
    def __init__(self, config, ops=None):
        super().__init__()
        self.config = config
        self.ops = ops or TorchOps()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = (
            self.lm_head.weight
        )  # tied input and output embedding, as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (
                    2 * self.config.n_layer
                ) ** -0.5  # each block adds two projections to the residual stream
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # the tied wte/lm_head weight counts once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, vocab), loss). loss is None without targets; logits are None where the
        fused loss (CudaOps with targets) never makes them."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        blocks = self.transformer.h
        h = self.ops.layer_norm(x, blocks[0].ln_1)
        for i, block in enumerate(blocks):
            x, h = block(x, h, blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f)
        if targets is None:
            return self.lm_head(h), None  # (B, T, vocab)
        return self.ops.lm_head_loss(h, self.lm_head.weight, targets)

    def configure_optimizer(self, weight_decay, learning_rate, device_type):
        """AdamW; weight decay on matrices and embeddings (>= 2-D), none on biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda"
        )

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, top_k=50, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens, each sampled from the top_k most likely."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            probs = F.softmax(
                logits[:, -1, :GPT2_VOCAB_SIZE].float(), dim=-1
            )  # padding rows are never tokens
            topk_probs, topk_idx = torch.topk(probs, top_k, dim=-1)
            choice = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, torch.gather(topk_idx, -1, choice)), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir, ops=None):
        """OpenAI's GPT-2 from a local Hugging Face directory (config.json and model.safetensors or
        pytorch_model.bin), or by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) where the hub is reachable."""
        path = name_or_dir
        if not os.path.isdir(path):
            if name_or_dir not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
                raise UserError(
                    f"{name_or_dir!r} is neither a folder nor one of gpt2, gpt2-medium, gpt2-large, "
                    f"gpt2-xl"
                )
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(
                    name_or_dir, allow_patterns=["config.json", "model.safetensors"]
                )
            except Exception as e:
                raise UserError(
                    f"cannot fetch {name_or_dir} from the Hugging Face hub ({type(e).__name__}); download "
                    f"it where there is network and pass its folder instead"
                ) from None
        try:
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
            config = GPTConfig(
                hf["n_positions"], hf["vocab_size"], hf["n_layer"], hf["n_head"], hf["n_embd"]
            )
            if os.path.isfile(os.path.join(path, "model.safetensors")):
                from safetensors.torch import load_file

                sd = load_file(os.path.join(path, "model.safetensors"))
            else:
                sd = torch.load(
                    os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True
                )
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"{path} is not a Hugging Face GPT-2 folder ({type(e).__name__}: {e})"
            ) from None
        sd = {
            k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v.t()
            if k.endswith(HF_CONV1D)
            else v
            for k, v in sd.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }  # mask buffers
        sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight"))  # tied
        model = cls(config, ops)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(
                f"{path}: the weights do not fit a GPT-2 model: {' '.join(str(e).split())}"
            ) from None
        return model


def select_ops(kernels, device_type):
    """--kernels auto|cuda|torch on this device -> the ops object the model calls. The CUDA ops live beside their
    kernels: importing the csrc package loads the compiled extension and registers their Python half."""
    if kernels == "torch" or (kernels == "auto" and device_type != "cuda"):
        return TorchOps()
    if device_type != "cuda":
        raise UserError(
            f"--kernels cuda needs a CUDA device, but this run uses {device_type}; use --kernels torch"
        )
    try:
        import csrc
    except ImportError as e:
        if kernels == "auto":
            return TorchOps()
        raise UserError(
            f"--kernels cuda: the arcana_kernels extension is not built ({e}); build it with `python "
            f"setup.py build_ext --inplace`, or use --kernels torch"
        ) from None
    return csrc.CudaOps(TorchOps())


def select_run_ops(kernels, device, dtype, mc, batch_size):
    """select_ops for a training run: on a GPU with the kernels, their start-of-run check at its shapes
    (checked_kernels) -> (ops, lines for the run summary, none for PyTorch's ops)."""
    ops = select_ops(kernels, torch.device(device).type)
    if ops.name == "torch":
        return ops, []
    return checked_kernels(kernels, ops.torch_ops, device, dtype, mc, batch_size)


def checked_kernels(kernels, torch_ops, device, dtype, mc, batch_size, repeats=10):
    """Check each op's kernels against PyTorch's at the run's shapes, forward and backward, and time both
    (csrc.check_kernels). --kernels auto uses an op's kernels where they passed and are faster, PyTorch's op
    otherwise, with a warning line where they failed; --kernels cuda uses every kernel, and stops naming an op that
    failed. Every process of a run decides alike. -> (csrc.CudaOps, summary lines)."""
    import csrc

    start = time.perf_counter()
    try:
        verdicts = csrc.check_kernels(
            torch_ops,
            device,
            dtype,
            batch_size,
            mc.block_size,
            mc.n_embd,
            mc.n_head,
            mc.vocab_size,
            repeats,
        )
    except csrc.KernelCrash as e:
        raise UserError(
            f"{e}; this process cannot go on: --kernels torch runs without the kernels"
        ) from None
    passed = agreed([v.passed for v in verdicts], device)
    faster = agreed([v.kernel_ms <= v.torch_ms for v in verdicts], device)
    lines = [
        f"kernels: checked against PyTorch in {time.perf_counter() - start:.1f} s at B={batch_size}, "
        f"T={mc.block_size}, C={mc.n_embd}, {mc.n_head} heads, {str(dtype)[6:]} (forward + backward):"
    ]
    use = []
    for v, ok, fast in zip(verdicts, passed, faster):
        error = v.error or "it failed on another process"
        if not ok and kernels == "cuda":
            raise UserError(
                f"--kernels cuda: the {v.op} kernels failed their start-of-run check ({error}); --kernels auto "
                f"runs PyTorch's op instead, --kernels torch PyTorch's ops everywhere"
            )
        if not ok:
            lines.append(
                f"warning: the {v.op} kernels failed their start-of-run check ({error}); using PyTorch's"
            )
            continue
        if kernels == "cuda" or fast:
            use.append(v.op)
        choice = "kernels" if v.op in use else "PyTorch (faster)"
        lines.append(
            f"  {v.op:<15} kernels {v.kernel_ms:8.3f} ms, PyTorch {v.torch_ms:8.3f} ms: {choice}"
        )
    return csrc.CudaOps(torch_ops, use), lines


def agreed(flags, device):
    """flags, each true only where it is true on every process of the run (a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(f) for f in t.tolist()]


# -----------------------------------------------------------------------------
# data


def find_shards(data_dir, split):
    """The sorted *.npy shards in data_dir whose names contain split ('train' or 'val')."""
    shards = sorted(glob.glob(os.path.join(data_dir, f"*{split}*.npy")))
    if not shards:
        raise UserError(
            f"--data_dir {data_dir} has no *_{split}_*.npy shards; run `python prepare.py --out_dir "
            f"{data_dir}` first (or point --data_dir at the folder it wrote)"
        )
    return shards


def open_shard(path):
    """Memory-map one token shard (never loaded whole), checking that it is a 1-D array of integers."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(
            f"shard {path} is corrupt or truncated ({e}); delete it and run prepare.py again"
        ) from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise UserError(
            f"shard {path} holds a {tokens.dtype} array of shape {tokens.shape}, not a 1-D array of "
            f"token ids; regenerate it with prepare.py"
        )
    return tokens


def checked_length(path, chunk=1 << 26):
    """A shard's length, after checking that GPT-2's tokenizer can make every id in it (at start, not hours in)."""
    tokens = open_shard(path)
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        bad = np.flatnonzero((part < 0) | (part >= GPT2_VOCAB_SIZE))
        if bad.size:
            raise UserError(
                f"shard {path} holds token id {part[bad[0]]} at offset {start + bad[0]}, outside GPT-2's "
                f"0..{GPT2_VOCAB_SIZE - 1}; it was not written by prepare.py's tokenizer: regenerate it"
            )
    return len(tokens)


class ShardLoader:
    """Contiguous (B, T) windows from a list of token shards. Each micro-step takes one span of B*T*world_size
    tokens and rank r reads window r of it, so the tokens of a step do not depend on how it is split across
    processes. At the end of a shard the loader moves to the next (dropping the tail that does not fill a span),
    and wraps around after the last."""

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        self.shards, self.B, self.T, self.rank = shards, B, T, rank
        self.shuffle, self.seed = shuffle, seed
        self.span = B * T * world_size
        lengths = [
            checked_length(path) for path in shards
        ]  # every shard opened and checked up front
        if max(lengths) < self.span + 1:
            raise UserError(
                f"every shard in {os.path.dirname(shards[0]) or '.'} is shorter than one batch of "
                f"batch_size * block_size * processes + 1 = {self.span + 1} tokens; lower --batch_size "
                f"or --block_size, or prepare more data"
            )
        self.capacity = sum(
            (n - 1) // self.span * self.span for n in lengths
        )  # tokens read in one pass
        self.load_state_dict({"epoch": 0, "index": 0, "pos": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "pos": self.pos}

    def load_state_dict(self, state):
        if state["index"] >= len(self.shards):
            raise UserError(
                f"the checkpoint was reading shard {state['index'] + 1} of its data, but "
                f"{os.path.dirname(self.shards[0]) or '.'} has {len(self.shards)}; resume with the "
                f"--data_dir it was trained on"
            )
        self.epoch, self.index, self.pos = state["epoch"], state["index"], state["pos"]
        self.tokens = open_shard(self.shards[self.order(self.epoch)[self.index]])
        if self.pos + self.span + 1 > len(self.tokens):  # no window left in this shard
            self._next_shard()

    def order(self, epoch):
        if not self.shuffle:
            return list(range(len(self.shards)))
        return [
            int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        ]

    def _next_shard(self):
        while True:
            self.index, self.pos = self.index + 1, 0
            if self.index == len(self.shards):
                self.epoch, self.index = self.epoch + 1, 0
            self.tokens = open_shard(self.shards[self.order(self.epoch)[self.index]])
            if len(self.tokens) >= self.span + 1:
                return

    def next_batch(self):
        start = self.pos + self.rank * self.B * self.T
        buf = torch.from_numpy(
            np.asarray(self.tokens[start : start + self.B * self.T + 1], dtype=np.int64)
        )
        self.pos += self.span
        if self.pos + self.span + 1 > len(self.tokens):
            self._next_shard()
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


# -----------------------------------------------------------------------------
# runtime: device, processes, precision


# rank: this process among all; local_rank: on its node (its GPU); world_size: processes in all; device: e.g. cuda:3;
# device_type: cuda, cpu or mps; master: rank 0, the one that logs and checkpoints; ddp: launched by torchrun
Runtime = namedtuple("Runtime", "rank local_rank world_size device device_type master ddp")


def resolve_device(name, local_rank):
    """--device (auto, cpu, cuda, cuda:N, mps) -> (device, device type)."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    name = f"cuda:{local_rank}" if name == "cuda" else name
    if not re.fullmatch(r"cpu|mps|cuda:\d+", name):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
            f"--device cpu (or auto)"
        )
    if name == "mps" and not mps:
        raise UserError(
            "--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)"
        )
    return name, name.split(":")[0]


def setup_runtime(device_name):
    ddp = "RANK" in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device, device_type = resolve_device(device_name, local_rank)
    if ddp:
        if device_type == "mps":
            raise UserError(
                "several processes on MPS are not supported; run one with python train_gpt.py"
            )
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device, device_type, rank == 0, ddp)


def end_distributed():
    """Destroy the process group while Python is fully alive. DDP keeps it in reference cycles, so collect them
    first: a gloo worker thread that lets go of its last tensors during interpreter shutdown aborts the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def resolve_dtype(name, device_type):
    if name == "auto":
        return (
            torch.bfloat16
            if device_type == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    return getattr(torch, name)


def autocast_context(device_type, dtype):
    """Mixed precision for the matmuls when dtype is 16-bit; weights and optimizer state stay float32."""
    return (
        nullcontext()
        if dtype == torch.float32
        else torch.autocast(device_type=device_type, dtype=dtype)
    )


def device_name(rt):
    return (
        torch.cuda.get_device_name(rt.device)
        if rt.device_type == "cuda"
        else platform.processor() or platform.machine()
    )


def synchronize(device_type):
    if device_type in ("cuda", "mps"):
        getattr(torch, device_type).synchronize()


# bf16 dense tensor-core peak FLOP/s by device name (vendor datasheets); the first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("3090", 71e12),
]


def peak_flops(rt, dtype):
    """The device's bf16/fp16 dense peak, or None where unknown (no MFU is shown then)."""
    if rt.device_type != "cuda" or dtype == torch.float32:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name(rt)), None)


def flops_per_token(model, T):
    """Training FLOPs per token: 6 per weight that multiplies (all but the position embedding), plus causal
    attention's 6 * n_layer * n_embd * T (half of the full T x T score and value matmuls)."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 6 * c.n_layer * c.n_embd * T


# -----------------------------------------------------------------------------
# evaluation and sampling


def batch_to_device(x, y, device):
    """A loader batch on the run's device. A CPU batch bound for a GPU is pinned first: a copy from pinned memory
    is queued behind the GPU's work, where one from pageable memory may wait for it."""
    pin = device.startswith("cuda")
    return [(t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in (x, y)]


@torch.no_grad()
def evaluate_val(model, loader, micro_batches, rt, amp):
    """Mean loss over the first micro_batches windows of each rank in the val shards (always the same tokens)."""
    model.eval()
    loader.load_state_dict({"epoch": 0, "index": 0, "pos": 0})
    total = torch.zeros((), device=rt.device)
    for _ in range(micro_batches):
        x, y = batch_to_device(*loader.next_batch(), rt.device)
        with amp:
            total += model(x, y)[1].float()
    model.train()
    if rt.ddp:
        dist.all_reduce(total)
    return total.item() / (micro_batches * rt.world_size)


def print_samples(model, prompt, num_samples, length, rt, amp, seed):
    enc = gpt2_encoding()
    idx = torch.tensor(enc.encode_ordinary(prompt) or [EOT_TOKEN], device=rt.device).repeat(
        num_samples, 1
    )
    generator = torch.Generator(device=rt.device).manual_seed(
        seed
    )  # its own stream: training RNG untouched
    model.eval()
    with amp:
        out = model.generate(idx, length, generator=generator)
    model.train()
    for i, row in enumerate(out.tolist()):
        print(f"sample {i}: {enc.decode(row)!r}")


# -----------------------------------------------------------------------------
# checkpoints


def list_checkpoints(log_dir):
    """(step, path) of every model_NNNNN.pt in log_dir, newest first; temp files are not listed."""
    found = [
        re.fullmatch(r".*model_(\d+)\.pt", p)
        for p in glob.glob(os.path.join(log_dir, "model_*.pt"))
    ]
    return sorted(((int(m[1]), m[0]) for m in found if m), reverse=True)


def load_checkpoint(path):
    """A checkpoint dict, or a UserError saying why it does not load."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist or is not a file")
    try:
        ckpt = torch.load(
            path, map_location="cpu", weights_only=True, mmap=True
        )  # a node's processes share it
    except (
        Exception
    ) as e:  # a truncated zip, unpickling errors, random bytes: many types, one message
        raise UserError(
            f"checkpoint {path} does not load ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            f"it may be truncated or not an ArcanaGPT checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= set(ckpt):
        raise UserError(
            f"checkpoint {path} is not an ArcanaGPT checkpoint (no model, model_config and step)"
        )
    return ckpt


def resolve_resume(cfg, needed_by=None, master=True):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run, which needed_by (a flag that reads a
    checkpoint: --sample, --export) refuses."""
    if cfg.resume not in ("", "auto"):
        return cfg.resume, load_checkpoint(cfg.resume)
    for _, path in list_checkpoints(cfg.log_dir) if cfg.resume else []:
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            if master:
                print(f"warning: skipping {e}", file=sys.stderr)
    if needed_by:
        raise UserError(
            f"{needed_by} needs a checkpoint: pass --resume PATH, or --resume auto with a --log_dir "
            f"holding one"
        )
    if cfg.resume and master:
        print(f"--resume auto: no valid checkpoint in {cfg.log_dir}; starting from scratch")
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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# training


def learning_rate(step, cfg):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    decay_ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (cfg.max_lr - cfg.min_lr)


def forward_backward(model, ddp_model, loader, grad_accum, device, amp, scaler=None):
    """Gradients of one optimizer step's mean loss over grad_accum micro-batches, accumulated in .grad; under DDP
    (ddp_model given) they are synchronized on the last micro-batch only. Returns the mean loss."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = batch_to_device(*loader.next_batch(), device)
        sync = ddp_model is None or micro_step == grad_accum - 1
        with nullcontext() if sync else ddp_model.no_sync():
            with amp:
                loss = (
                    model(x, y)[1].float() / grad_accum
                )  # the mean over the step, not a sum of means
            loss_accum += loss.detach()
            (scaler.scale(loss) if scaler else loss).backward()
    return loss_accum


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM ask the run to finish its step, checkpoint and exit 0; a second signal aborts. Yields the list
    of signals received."""
    requested = []

    def handle(signum, frame):
        requested.append(signum)
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint (a second SIGINT "
            f"or SIGTERM aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sample_from_checkpoint(cfg):
    """`--sample PROMPT --resume PATH|auto`: print completions and return."""
    path, ckpt = resolve_resume(cfg, "--sample")
    rt = setup_runtime(cfg.device)
    model = GPT(
        model_config(cfg, ckpt["model_config"], path), select_ops(cfg.kernels, rt.device_type)
    )
    model.load_state_dict(ckpt["model"])
    print(f"{path}: step {ckpt['step']}, val loss {ckpt.get('val_loss')}")
    print_samples(
        model.to(rt.device),
        cfg.sample,
        cfg.num_samples,
        cfg.sample_length,
        rt,
        autocast_context(rt.device_type, resolve_dtype(cfg.dtype, rt.device_type)),
        cfg.seed,
    )


def export_hf(cfg):
    """`--export DIR --resume PATH|auto`: the checkpoint as a Hugging Face GPT-2 folder (config.json,
    model.safetensors, GPT-2's tokenizer files), which transformers, lm-evaluation-harness and
    GPT.from_pretrained read. The padding rows of the vocabulary are dropped."""
    from safetensors.torch import save

    path, ckpt = resolve_resume(cfg, "--export")
    c = GPTConfig(**ckpt["model_config"])
    sd = {
        k: (
            v[:GPT2_VOCAB_SIZE]
            if k == "transformer.wte.weight"
            else v.t()
            if k.endswith(HF_CONV1D)
            else v
        ).contiguous()
        for k, v in ckpt["model"].items()
        if k != "lm_head.weight"
    }  # lm_head is wte, tied
    config = dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=c.block_size,
        n_ctx=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOT_TOKEN,
        eos_token_id=EOT_TOKEN,
        tie_word_embeddings=True,
    )
    try:
        os.makedirs(cfg.export, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--export {cfg.export}: cannot make that folder ({e.strerror}); choose another"
        ) from None
    atomic_write(
        os.path.join(cfg.export, "config.json"),
        lambda f: f.write(json.dumps(config, indent=2).encode()),
    )
    atomic_write(
        os.path.join(cfg.export, "model.safetensors"), lambda f: f.write(save(sd, {"format": "pt"}))
    )
    if (
        gpt2_files()
    ):  # GPT-2's tokenizer under the names transformers reads, so the folder needs no network
        for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copyfile(os.path.join(gpt2_files(), ours), os.path.join(cfg.export, theirs))
    print(
        f"wrote {path} (step {ckpt['step']}) to {cfg.export}/ as a Hugging Face GPT-2 model; evaluate it with "
        f"lm_eval --model hf --model_args pretrained={cfg.export} --tasks hellaswag"
    )


def check_log_dir(cfg, resume_path, ckpt):
    """Refuse a run that would mix with another history in --log_dir (on every process, before any work). Returns
    the checkpoints newer than the one resumed (damaged ones --resume auto skipped, or those --branch leaves)."""
    if os.path.exists(cfg.log_dir) and not os.path.isdir(cfg.log_dir):
        raise UserError(
            f"--log_dir {cfg.log_dir} is a file, not a folder; choose another --log_dir"
        )
    log_txt = os.path.join(cfg.log_dir, "log.txt")
    holds_run = (
        list_checkpoints(cfg.log_dir) or os.path.isfile(log_txt) and os.path.getsize(log_txt) > 0
    )
    if ckpt is None:
        if holds_run and cfg.resume != "auto":
            raise UserError(
                f"--log_dir {cfg.log_dir} already holds a run (log.txt or model_*.pt); pass --resume auto "
                f"to continue it, or choose another --log_dir"
            )
        return [path for _, path in list_checkpoints(cfg.log_dir)]
    if os.path.dirname(os.path.abspath(resume_path)) != os.path.abspath(cfg.log_dir):
        if holds_run:
            raise UserError(
                f"--log_dir {cfg.log_dir} holds another run; continue {resume_path} in its own folder or "
                f"in an empty --log_dir"
            )
        return []
    later = [path for step, path in list_checkpoints(cfg.log_dir) if step > ckpt["step"]]
    if later and cfg.resume != "auto" and not cfg.branch:
        raise UserError(
            f"{resume_path} is at step {ckpt['step']}, but {cfg.log_dir} holds later checkpoints "
            f"({', '.join(os.path.basename(p) for p in later)}): continuing it starts a second history. "
            f"Pass --branch to do that (the later checkpoints and the old log.txt move into a folder "
            f"beside them), or --resume auto to continue the newest"
        )
    return later


def set_up_log_dir(cfg, resume_path, ckpt, later):
    """The master's side of check_log_dir: later checkpoints (and the log of the history they belong to) are moved
    into a set_aside_* folder, never deleted; the log keeps what the resumed checkpoint had logged."""
    os.makedirs(cfg.log_dir, exist_ok=True)
    for tmp in glob.glob(
        os.path.join(cfg.log_dir, "*.tmp")
    ):  # left by checkpoint writes a kill interrupted
        os.remove(tmp)
    log = os.path.join(cfg.log_dir, "log.txt")
    if later or (ckpt is None and os.path.isfile(log) and os.path.getsize(log) > 0):
        aside = os.path.join(cfg.log_dir, time.strftime("set_aside_%Y%m%d_%H%M%S"))
        os.makedirs(aside)
        for path in later:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
        if os.path.exists(log):
            (os.replace if ckpt is None else shutil.copy2)(log, os.path.join(aside, "log.txt"))
        what = (
            ("the old log" + (" and the checkpoints that do not load" if later else ""))
            if ckpt is None
            else f"the checkpoints after step {ckpt['step']} and a copy of the log"
        )
        print(f"moved {what} to {aside}")
    source = os.path.join(os.path.dirname(resume_path or ""), "log.txt")
    if ckpt is not None and os.path.exists(
        source
    ):  # keep the train lines before the checkpoint, evaluations at it
        with open(source) as f:
            kept = [
                line
                for line in f
                if len(parts := line.split()) == 3
                and parts[0].isdigit()
                and (
                    int(parts[0]) < ckpt["step"]
                    or int(parts[0]) == ckpt["step"]
                    and parts[1] != "train"
                )
            ]
        atomic_write(log, lambda f: f.write("".join(kept).encode()))


def save_checkpoint(path, state):
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (UserError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise UserError(
            f"cannot write checkpoint {path} ({' '.join(str(e).split())[:200]}); free some disk space, "
            f"then continue with --resume auto"
        ) from None


def train(cfg):
    """Run training as configured; returns the process exit code."""
    rt = setup_runtime(cfg.device)
    ops = select_ops(cfg.kernels, rt.device_type)
    resume_path, ckpt = resolve_resume(cfg, master=rt.master)
    pretrained = GPT.from_pretrained(cfg.init_from, ops) if cfg.init_from else None
    if pretrained and cfg.block_size:  # a shorter context: keep the first position embeddings
        if cfg.block_size > pretrained.config.block_size:
            raise UserError(
                f"--block_size {cfg.block_size} is longer than {cfg.init_from}'s context "
                f"{pretrained.config.block_size}"
            )
        pretrained.config.block_size = cfg.block_size
        wpe = pretrained.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[: cfg.block_size].detach().clone())
    base = ckpt["model_config"] if ckpt else asdict(pretrained.config) if pretrained else None
    mc = model_config(cfg, base, resume_path or cfg.init_from)
    B, T = cfg.batch_size, mc.block_size
    micro = B * T * rt.world_size
    if cfg.total_batch_size % micro:
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * block_size * "
            f"processes = {B} * {T} * {rt.world_size} = {micro}; use e.g. "
            f"{micro * max(1, round(cfg.total_batch_size / micro))}"
        )
    grad_accum = cfg.total_batch_size // micro
    dtype = resolve_dtype(cfg.dtype, rt.device_type)
    amp = autocast_context(rt.device_type, dtype)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves
    later = check_log_dir(cfg, resume_path, ckpt)
    manifest = read_manifest(cfg.data_dir)  # None for shards another tool wrote
    train_loader = ShardLoader(
        find_shards(cfg.data_dir, "train"), B, T, rt.rank, rt.world_size, cfg.shuffle, cfg.seed
    )
    val_loader = ShardLoader(find_shards(cfg.data_dir, "val"), B, T, rt.rank, rt.world_size)

    torch.manual_seed(cfg.seed)
    raw_model = (pretrained or GPT(mc, ops)).to(rt.device)
    optimizer = raw_model.configure_optimizer(cfg.weight_decay, cfg.max_lr, rt.device_type)
    scaler = torch.amp.GradScaler(
        rt.device_type, enabled=dtype == torch.float16
    )  # a no-op unless float16
    start_step = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["train_loader"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        if ckpt["world_size"] != rt.world_size and rt.master:
            print(
                f"warning: {resume_path} was written by {ckpt['world_size']} processes, this run has "
                f"{rt.world_size}: the data order from here on differs from the original run",
                file=sys.stderr,
            )
    # gradient_as_bucket_view: after the all-reduce .grad is a view into DDP's bucket rather than a copy of it. Safe
    # here: grads are set to None (never detach_()ed), and clipping and AdamW only read or scale .grad in place.
    ddp_model = (
        DDP(
            raw_model,
            device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        if rt.ddp
        else None
    )
    model = ddp_model or raw_model
    compile_model = rt.device_type == "cuda" if cfg.compile is None else cfg.compile
    if compile_model:
        model = torch.compile(
            model
        )  # compiling the DDP wrapper lets it overlap gradient sync with backward

    log_txt = os.path.join(cfg.log_dir, "log.txt")

    def log(step, stream, value, extra=""):
        """A line of log.txt in build-nanogpt's `{step} {stream} {value}` format, and for people on stdout."""
        if rt.master:
            with open(log_txt, "a") as f:
                f.write(f"{step} {stream} {value}\n")
            print(f"step:{step}/{cfg.max_steps} {stream}:{value}{extra}", flush=True)

    if rt.master:
        set_up_log_dir(cfg, resume_path, ckpt, later)
        run = {
            "config": asdict(cfg),
            "model_config": asdict(mc),
            "resumed_from": resume_path,
            "start_step": start_step,
            "tokens_per_step": cfg.total_batch_size,
            "grad_accum_steps": grad_accum,
            "world_size": rt.world_size,
            "device": rt.device,
            "device_name": device_name(rt),
            "dtype": str(dtype)[6:],
            "kernels": ops.name,
            "compile": compile_model,
            "parameters": raw_model.num_params(),
            "git_commit": git_commit(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "cuda": torch.version.cuda,
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write(
            os.path.join(cfg.log_dir, "run.json"),
            lambda f: f.write(json.dumps(run, indent=2).encode()),
        )
        total = cfg.max_steps * cfg.total_batch_size
        print(
            f"model: {cfg.init_from + ', ' if cfg.init_from else ''}{raw_model.num_params():,} parameters "
            f"({mc.n_layer} layers, {mc.n_head} heads, width {mc.n_embd}, context {T}, vocabulary {mc.vocab_size})"
        )
        print(
            f"steps: {cfg.max_steps:,} of {cfg.total_batch_size:,} tokens = {B} x {T} x {rt.world_size} process(es) "
            f"x {grad_accum} accumulation steps; {total:,} tokens in all"
        )
        print(
            f"device: {rt.world_size} process(es) on {rt.device} ({device_name(rt)}), {str(dtype)[6:]}, kernels "
            f"{ops.name}, compile {'on' if compile_model else 'off'}"
        )
        print(
            f"data: {cfg.data_dir}: {len(train_loader.shards)} train shard(s), {train_loader.capacity:,} tokens per "
            f"pass; val {val_loader.capacity:,} tokens"
        )
        print(
            f"out: {log_txt} and checkpoints model_NNNNN.pt there, every {cfg.checkpoint_every or cfg.max_steps} "
            f"steps and after the last"
            + (f"; resuming {resume_path} after step {start_step}" if ckpt else "")
        )
        if manifest and not manifest["complete"]:
            print(
                f"warning: {cfg.data_dir}/manifest.json says prepare.py has not finished: the run trains on the "
                f"shards written so far (the same prepare.py command finishes them)",
                file=sys.stderr,
            )
        if start_step >= cfg.max_steps:
            print(
                f"notice: the checkpoint is at step {start_step}, --max_steps {cfg.max_steps}: nothing to train"
            )
        if total > train_loader.capacity:
            print(
                f"warning: the run reads {total:,} tokens and the train shards hold {train_loader.capacity:,}: it "
                f"wraps around the data {total / train_loader.capacity:.1f} times",
                file=sys.stderr,
            )

    hellaswag_path = None
    if cfg.hellaswag_every > 0:
        import hellaswag

        notice = "a process of this run has no copy"
        try:  # downloaded once per node where it is missing; every process must have it, or none uses it
            hellaswag_path = hellaswag.ensure_data(
                "val", cfg.hellaswag_dir or None, rt.local_rank == 0, rt.ddp
            )
        except UserError as e:
            notice = e
        everyone = torch.tensor(float(hellaswag_path is not None), device=rt.device)
        if rt.ddp:
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        if everyone.item():
            hellaswag.render_file(
                hellaswag_path, T
            )  # a bad file is refused now, not at the first evaluation
        else:
            hellaswag_path = None
            if rt.master:
                print(f"notice: HellaSwag is off for this run: {notice}")
    sample_every = cfg.sample_every
    if rt.master and sample_every > 0:
        try:  # sampling is a nicety: without a tokenizer the run goes on, and says so now, not at step 250
            gpt2_encoding()
        except UserError as e:
            print(f"warning: {e}; sampling is off for this run", file=sys.stderr)
            sample_every = 0

    def due(step, every):
        return step == cfg.max_steps or (every > 0 and step % every == 0)

    def evaluate(step):
        """The evaluations due for the model after `step` steps; returns the val loss, if measured."""
        val_loss = None
        if due(step, cfg.val_every):
            val_loss = evaluate_val(model, val_loader, cfg.val_steps * grad_accum, rt, amp)
            log(step, "val", f"{val_loss:.4f}")
        if hellaswag_path and due(step, cfg.hellaswag_every):
            model.eval()
            with amp:
                s = hellaswag.score(model, hellaswag_path, T, rt.device, rt.rank, rt.world_size)
            model.train()
            log(
                step,
                "hella",
                f"{s.correct_norm / s.total:.4f}",
                f" acc:{s.correct / s.total:.4f} ({s.total} examples)",
            )
        if rt.master and sample_every > 0 and step > 0 and due(step, sample_every):
            print_samples(
                raw_model,
                "Hello, I'm a language model,",
                cfg.num_samples,
                cfg.sample_length,
                rt,
                amp,
                cfg.seed + step,
            )
        return val_loss

    if ckpt is None:
        evaluate(
            0
        )  # the model before training (a resumed run has these of its checkpoint's step already)
    peak = peak_flops(rt, dtype)
    flops_step = flops_per_token(raw_model, T) * cfg.total_batch_size
    step_times, last_checkpoint = [], resume_path
    with stop_requests() as stop:
        for step in range(start_step, cfg.max_steps):
            synchronize(rt.device_type)
            t0 = time.time()
            optimizer.zero_grad(set_to_none=True)
            loss_accum = forward_backward(
                model, ddp_model, train_loader, grad_accum, rt.device, amp, scaler
            )
            stats = torch.stack([loss_accum, torch.tensor(float(len(stop) > 0), device=rt.device)])
            if rt.ddp:
                dist.all_reduce(
                    stats
                )  # the mean loss, and whether any process was asked to stop: all stop together
            loss_value, stopping = stats[0].item() / rt.world_size, stats[1].item() > 0
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip or float("inf")
            ).item()
            if not math.isfinite(loss_value) or (
                not scaler.is_enabled() and not math.isfinite(norm)
            ):
                if rt.master:
                    print(
                        f"error: step {step}: loss {loss_value}, gradient norm {norm}: training diverged. Stopping "
                        f"without a checkpoint; the last good one is {last_checkpoint or '(none)'}: resume from it "
                        f"with a lower --max_lr or a longer --warmup_steps",
                        file=sys.stderr,
                    )
                return 1
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)  # skipped by a float16 scaler when a gradient is not finite
            scaler.update()
            synchronize(rt.device_type)
            dt = time.time() - t0
            step_times = (step_times + [dt])[-50:]
            mfu = f" mfu:{100 * flops_step / dt / (peak * rt.world_size):.1f}%" if peak else ""
            eta = format_duration(sum(step_times) / len(step_times) * (cfg.max_steps - step - 1))
            log(
                step,
                "train",
                f"{loss_value:.6f}",
                f" lr:{lr:.4e} norm:{norm:.4f} dt:{dt * 1000:.1f}ms "
                f"tok/s:{cfg.total_batch_size / dt:,.0f}{mfu} eta:{eta}",
            )

            step += 1  # evaluations and checkpoints belong to the model after this many steps
            val_loss = evaluate(step)
            if rt.master and (stopping or due(step, cfg.checkpoint_every)):
                last_checkpoint = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
                save_checkpoint(
                    last_checkpoint,
                    {
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "config": asdict(cfg),
                        "model_config": asdict(mc),
                        "step": step,
                        "val_loss": val_loss,
                        "train_loader": train_loader.state_dict(),
                        "scaler": scaler.state_dict(),
                        "world_size": rt.world_size,
                    },
                )
                print(f"saved {last_checkpoint}")
                for _, old in (
                    list_checkpoints(cfg.log_dir)[cfg.keep_checkpoints :]
                    if cfg.keep_checkpoints
                    else []
                ):
                    os.remove(old)
            if stopping:
                break
    return 0


# -----------------------------------------------------------------------------
# entry point


def main(argv=None):
    cfg = parse_config(argv)
    try:
        check_flags(cfg)
        if cfg.sample or cfg.export:
            (sample_from_checkpoint if cfg.sample else export_hf)(cfg)
            return 0
        return train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        end_distributed()


if __name__ == "__main__":
    sys.exit(main())
