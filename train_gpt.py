"""
ArcanaGPT: train GPT-2 (124M to 1.5B) from scratch on FineWeb-edu token shards.

One process (CPU, Apple MPS, or one GPU):
    python train_gpt.py
    python train_gpt.py --model tiny --device cpu --batch_size 8 --block_size 128 \\
        --total_batch_size 8192
Eight GPUs on one node:
    torchrun --standalone --nproc_per_node=8 train_gpt.py
Two nodes of eight GPUs (run on every node, same --rdzv_endpoint; --log_dir on storage both share):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=gpt2 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train_gpt.py --log_dir /shared/log
Continue the newest checkpoint in --log_dir, or sample from one:
    python train_gpt.py --resume auto
    python train_gpt.py --resume log/model_19073.pt --sample "Hello, I'm a language model,"
A resumed run continues that run: its data, batch, schedule and evaluation settings come from the
checkpoint, and flags given override them (one that changes the tokens read, --data_dir, --seed or
--shuffle, is refused); --sample and --export need no other flags.

The data comes from `python prepare.py`; every flag is in `python train_gpt.py --help`. This file
imports prepare.py (the token format and the helpers every tool shares) and hellaswag.py (the
evaluation); csrc/ holds the CUDA half of the model's ops.
"""

import argparse
import gc
import glob
import hashlib
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
import warnings
from collections import deque, namedtuple
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from prepare import (
    EOT_TOKEN,
    GPT2_VOCAB_SIZE,
    USER_ERROR_EXIT,
    Progress,
    UserError,
    atomic_write,
    config_parser,
    folder_lock,
    format_duration,
    gpt2_encoding,
    gpt2_files,
    one_line,
    read_manifest,
    sha256_of,
    warn,
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
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, by their hub names


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = "edu_fineweb10B"  # folder of *_train_*.npy / *_val_*.npy shards (prepare.py)
    log_dir: str = "log"  # log.txt, run.json and the model_*.pt checkpoints go here
    shuffle: bool = False  # permute the order of train shards each epoch (seeded, reproducible)
    # model
    model: Optional[str] = None  # preset: tiny, d12 (124M, default), d24, d36, d48 (1.5B)
    n_layer: Optional[int] = None  # override the preset's number of blocks
    n_head: Optional[int] = None  # override the preset's attention heads
    n_embd: Optional[int] = None  # override the preset's width
    block_size: Optional[int] = None  # sequence length T (default: the preset's context, 1024)
    vocab_size: Optional[int] = None  # override the embedding rows (default 50304)
    init_from: str = ""  # start from OpenAI's GPT-2 (gpt2 ... gpt2-xl) or a local HF folder
    # batch and schedule
    batch_size: int = 64  # micro-batch B, sequences per forward pass per process
    total_batch_size: int = 524288  # tokens per optimizer step, across processes and accumulation
    max_steps: int = 19073  # optimizer steps (19073 x 524288 tokens = one pass over 10B tokens)
    warmup_steps: int = 715  # linear learning-rate warmup steps
    max_lr: float = 6e-4  # AdamW's peak learning rate, reached after warmup
    min_lr: float = 6e-5  # AdamW's final learning rate; Muon's ends at muon_lr x min_lr / max_lr
    weight_decay: float = 0.1  # decoupled weight decay of the 2-D weights only (AdamW's and Muon's)
    optimizer: str = "adamw"  # adamw (GPT-2's) or muon (block matrices by Muon, the rest by AdamW)
    muon_lr: float = 0.01  # Muon's peak learning rate; the schedule scales it as it scales max_lr
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 turns clipping off)
    # evaluation, sampling, checkpoints
    val_every: int = 250  # validation loss every this many steps and after the last (0: last only)
    val_steps: int = 20  # validation batches of total_batch_size tokens (the same for any split)
    hellaswag_every: int = 250  # HellaSwag every this many steps and after the last (0: never)
    hellaswag_dir: str = ""  # folder of hellaswag_val.jsonl (default: hellaswag.py's cache)
    sample_every: int = 250  # print sample completions every this many steps (0: never)
    sample: str = ""  # with --resume: print completions of this prompt and exit
    num_samples: int = 4  # completions per sampling
    sample_length: int = 32  # new tokens per completion
    checkpoint_every: int = 5000  # checkpoint every this many steps and after the last (0: last)
    keep_checkpoints: int = 3  # keep the newest this many checkpoints (0: keep all)
    resume: str = ""  # 'auto': the newest valid checkpoint in log_dir; or a checkpoint path
    branch: bool = False  # continue a --resume PATH older than log_dir's newest (see README)
    export: str = ""  # with --resume: write the checkpoint as a Hugging Face GPT-2 folder, and exit
    # hardware
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32), float32, bfloat16 or float16
    compile: Optional[bool] = None  # torch.compile the model (default: on CUDA, off on CPU and MPS)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    kernels: str = "auto"  # auto, cuda (the arcana_kernels extension) or torch (PyTorch ops)
    seed: int = 1337  # seed for initialization, data shuffling and sampling


DTYPES = ["auto", "float32", "bfloat16", "float16"]  # --dtype, also of hellaswag.py and bench.py
KERNELS = ["auto", "cuda", "torch"]  # --kernels, likewise
OPTIMIZERS = ["adamw", "muon"]  # --optimizer

# torch.optim.Muon's update scale: 0.2 x sqrt(max(rows, columns)) x lr, the update RMS of AdamW
# (Moonshot's); it did better than Keller Jordan's "original" in the sweep in the README
MUON_ADJUST_LR = "match_rms_adamw"


# Resuming, these come from the checkpoint's config unless given on the command line: what the
# run trains on, how, and when it evaluates (the model's shape always comes with its weights).
RUN_SETTINGS = """
    data_dir shuffle seed batch_size total_batch_size max_steps warmup_steps max_lr min_lr
    weight_decay optimizer muon_lr muon_momentum grad_clip val_every val_steps hellaswag_every
    sample_every checkpoint_every keep_checkpoints dtype fsdp
""".split()
DATA_ORDER = ("shuffle", "seed")  # with --data_dir, the tokens a run reads: never changed on resume


def parse_config(argv=None):
    """(the TrainConfig of the command line, the names of the flags it gives)."""
    parser = config_parser(
        TrainConfig,
        __doc__,
        model=dict(choices=sorted(MODEL_PRESETS)),
        dtype=dict(choices=DTYPES),
        kernels=dict(choices=KERNELS),
        optimizer=dict(choices=OPTIMIZERS),
    )
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    for action in parser._actions:  # parsed again without defaults: only the flags given remain
        action.default = argparse.SUPPRESS
    return cfg, set(vars(parser.parse_args(argv)))


def model_config(cfg, base=None, source=None):
    """The model's shape: --model's preset with the shape flags over it, refusing shapes that cannot
    work. Resuming, or starting from pretrained weights, the shape is theirs (base, a dict, from
    source), and a flag may not differ from it."""
    flags = {}
    for name in GPTConfig.__annotations__:
        if getattr(cfg, name) is not None:
            flags[name] = getattr(cfg, name)
    if base is not None:
        check_shape_flags(cfg, flags, base, source)
        return GPTConfig(**base)
    preset = MODEL_PRESETS[cfg.model or "d12"]
    mc = GPTConfig(**{**preset, **flags})
    for name, value in asdict(mc).items():
        if value < 1:
            raise UserError(f"--{name} {value} must be at least 1")
    if mc.n_embd % mc.n_head:
        raise UserError(
            f"--n_embd {mc.n_embd} is not divisible by --n_head {mc.n_head}; pick values that "
            f"divide evenly (the head size is n_embd / n_head)"
        )
    if mc.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {mc.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens"
        )
    return mc


def check_shape_flags(cfg, flags, base, source):
    """Refuse a preset or shape flag that differs from the shape of the weights in source."""
    stated = dict(MODEL_PRESETS[cfg.model]) if cfg.model else {}
    stated.update(flags)
    differences = []
    for name, value in stated.items():
        if base[name] != value:
            differences.append(f"{name}={base[name]} (flags: {value})")
    if not differences:
        return
    hint = ""
    if cfg.resume == "auto":
        hint = ", or use another --log_dir for a new run"
    raise UserError(
        f"{source} has a different model: {', '.join(differences)}; leave out --model and the "
        f"shape flags (the shape comes with the weights){hint}"
    )


def check_flags(cfg):
    """Refuse sizes and counts that cannot work (every mode: training, --sample, --export)."""
    at_least_one = (
        "batch_size",
        "total_batch_size",
        "max_steps",
        "val_steps",
        "num_samples",
        "sample_length",
    )
    for name, kind in TrainConfig.__annotations__.items():
        if kind is float and not math.isfinite(getattr(cfg, name)):
            raise UserError(f"--{name} {getattr(cfg, name)} is not a finite number")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)} must be at least 1")
    not_negative = (
        "warmup_steps",
        "grad_clip",
        "min_lr",
        "weight_decay",
        "val_every",
        "hellaswag_every",
        "sample_every",
        "checkpoint_every",
        "keep_checkpoints",
    )
    for name in not_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)} must not be negative")
    for name in ("max_lr", "muon_lr"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} {getattr(cfg, name)} must be positive")
    if not 0 <= cfg.muon_momentum < 1:
        raise UserError(f"--muon_momentum {cfg.muon_momentum} must be at least 0 and below 1")
    if cfg.min_lr > cfg.max_lr:
        raise UserError(f"--min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}")
    if cfg.fsdp and cfg.dtype == "float16":
        raise UserError(
            "--fsdp with --dtype float16: its loss scaler does not take sharded gradients; use "
            "--dtype bfloat16"
        )
    if cfg.init_from and cfg.resume:
        raise UserError(
            "--init_from starts a run from pretrained weights and --resume continues one: "
            "pass one of them"
        )


# -----------------------------------------------------------------------------
# model


class TorchOps:
    """The hot ops the model calls, in PyTorch: the reference in tests, the fallback on CPU and
    MPS, the baseline in benchmarks. csrc.CudaOps runs the same ops on the project's kernels."""

    name = "torch"
    kernels = ()  # the ops run on the project's kernels: none here (see csrc.CudaOps)

    def layer_norm(self, x, ln):
        return F.layer_norm(x, (x.size(-1),), ln.weight, ln.bias, ln.eps)

    def add_layer_norm(self, x, y, ln):
        """The residual add x + y and the LayerNorm after it: (new stream, its normalization)."""
        r = x + y
        return r, self.layer_norm(r, ln)

    def linear_gelu(self, x, fc):
        return F.gelu(F.linear(x, fc.weight, fc.bias), approximate="tanh")  # GPT-2's tanh GELU

    def attention(self, qkv, n_head):
        """Causal self-attention from c_attn's packed output (B, T, 3C); returns (B, T, C)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.view(B, T, 3, n_head, C // n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)

    def lm_head_loss(self, h, weight, targets):
        """(logits h @ weight.T, their mean cross-entropy against targets; -1 = no target)."""
        logits = F.linear(h, weight)  # (B, T, vocab)
        flat_logits = logits.view(-1, logits.size(-1)).float()
        loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-1)
        return logits, loss


class CausalSelfAttention(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.n_head = config.n_head
        self.ops = ops

    def forward(self, x_norm):
        qkv = self.c_attn(x_norm)  # (B, T, 3C)
        return self.c_proj(self.ops.attention(qkv, self.n_head))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.ops = ops

    def forward(self, x_norm):
        return self.c_proj(self.ops.linear_gelu(x_norm, self.c_fc))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """GPT-2's pre-LayerNorm block:

        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))

    Each residual add is fused with the LayerNorm that follows it (ops.add_layer_norm returns the
    new stream and its normalization in one pass). So the MLP's output is added at the start of
    the next block, fused with that block's ln_1 (or after the last block with ln_f): a block
    takes and returns the residual stream x with one branch output not yet added to it (the first
    block, none). So every block applies only its own LayerNorms."""

    def __init__(self, config, ops):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config, ops)
        self.ops = ops

    def forward(self, x, branch=None):
        if branch is None:  # the first block: nothing to add to the embeddings
            x_norm = self.ops.layer_norm(x, self.ln_1)
        else:
            x, x_norm = self.ops.add_layer_norm(x, branch, self.ln_1)  # x += branch; ln_1(x)
        x, x_norm = self.ops.add_layer_norm(x, self.attn(x_norm), self.ln_2)  # x += attn; ln_2(x)
        return x, self.mlp(x_norm)  # the MLP's output is the next block's branch


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
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embedding
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two projections per block add to x
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # the tied wte/lm_head weight counts once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, vocab), loss). loss is None without targets; logits are
        None where the fused loss (CudaOps with targets) never makes them.

        x = wte(idx) + wpe(pos), the blocks, then ln_f(x); the last block's MLP output is added
        to x in the fused add before ln_f."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = x.float()  # the residual stream is float32, also where weights arrive in bf16 (--fsdp)
        branch = None  # the output of a block's MLP, not yet added to x
        for block in self.transformer.h:
            x, branch = block(x, branch)
        x, x_norm = self.ops.add_layer_norm(x, branch, self.transformer.ln_f)
        if targets is None:
            return self.lm_head(x_norm), None  # (B, T, vocab)
        return self.ops.lm_head_loss(x_norm, self.lm_head.weight, targets)

    def configure_optimizer(self, weight_decay, learning_rate, device_type, params=None):
        """AdamW over params (default: every parameter); weight decay on matrices and embeddings
        (>= 2-D), none on biases and gains."""
        if params is None:
            params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def configure_optimizers(self, cfg, device_type):
        """(AdamW, None) for --optimizer adamw; for muon (AdamW, Muon): torch.optim.Muon updates
        the 2-D weights inside the blocks (attention and MLP matrices), AdamW at --max_lr the
        rest (embeddings and so the tied head, biases, LayerNorm gains). Under DDP every process
        runs Muon's Newton-Schulz iteration on the same all-reduced gradients: redundant work,
        the same update everywhere (sharding it across processes is left for later)."""
        if cfg.optimizer == "adamw":
            return self.configure_optimizer(cfg.weight_decay, cfg.max_lr, device_type), None
        matrices = [p for p in self.transformer.h.parameters() if p.dim() == 2]
        in_muon = {id(p) for p in matrices}
        rest = [p for p in self.parameters() if id(p) not in in_muon]
        adamw = self.configure_optimizer(cfg.weight_decay, cfg.max_lr, device_type, rest)
        muon = torch.optim.Muon(
            matrices,
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.weight_decay,
            adjust_lr_fn=MUON_ADJUST_LR,
        )
        return adamw, muon

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, top_k=50, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens, each sampled from the top_k most likely."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :GPT2_VOCAB_SIZE]  # the padding rows are never tokens
            probs = F.softmax(logits.float(), dim=-1)
            topk_probs, topk_idx = torch.topk(probs, top_k, dim=-1)
            choice = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, torch.gather(topk_idx, -1, choice)), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir, ops=None):
        """OpenAI's GPT-2 from a local Hugging Face folder, or by name where the hub is
        reachable."""
        config, state = load_hf_weights(name_or_dir)
        model = cls(config, ops)
        load_weights(model, state, name_or_dir)
        return model


# Hugging Face stores these as Conv1D weights, (in, out); nn.Linear's are (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_weights(name_or_dir):
    """(GPTConfig, state dict in this file's names) of OpenAI's GPT-2 from a local Hugging Face
    folder (config.json and model.safetensors or pytorch_model.bin), or by name (gpt2 ... gpt2-xl)
    where the hub is reachable."""
    path = name_or_dir
    if not os.path.isdir(path):
        path = download_pretrained(name_or_dir)
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(
            hf["n_positions"], hf["vocab_size"], hf["n_layer"], hf["n_head"], hf["n_embd"]
        )
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            from safetensors.torch import load_file

            hf_state = load_file(os.path.join(path, "model.safetensors"))
        else:
            bin_path = os.path.join(path, "pytorch_model.bin")
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, a truncated one (SafetensorError), a bad config
        raise UserError(
            f"{path} is not a Hugging Face GPT-2 folder ({type(e).__name__}: {one_line(e)})"
        ) from None
    return config, state_from_hf(hf_state)


def download_pretrained(name):
    """The local folder of a hub model (config.json and model.safetensors), fetched if need be."""
    if name not in PRETRAINED:
        raise UserError(f"{name!r} is neither a folder nor one of {', '.join(PRETRAINED)}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise UserError(
            f"cannot fetch {name} from the Hugging Face hub ({type(e).__name__}); download it "
            f"where there is network and pass its folder instead"
        ) from None


def state_from_hf(hf_state):
    """A Hugging Face GPT-2 state dict in this file's names and layout."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model's keys, saved without the LM head
        if name.endswith(HF_CONV1D):
            tensor = tensor.t()
        state[name] = tensor
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))  # tied
    return state


def state_to_hf(state):
    """This file's state dict in Hugging Face GPT-2's names and layout, without the vocabulary's
    padding rows."""
    hf_state = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte (tied)
        if name == "transformer.wte.weight":
            tensor = tensor[:GPT2_VOCAB_SIZE]  # drop the padding rows
        if name.endswith(HF_CONV1D):
            tensor = tensor.t()
        hf_state[name] = tensor.contiguous()
    return hf_state


def load_weights(model, state, source):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{source}: the weights do not fit a GPT-2 model: {one_line(e)}") from None


def select_ops(kernels, device_type):
    """--kernels auto|cuda|torch on this device -> the ops object the model calls. The CUDA ops
    live beside their kernels: importing the csrc package loads the compiled extension and
    registers their Python half."""
    if kernels == "torch" or (kernels == "auto" and device_type != "cuda"):
        return TorchOps()
    if device_type != "cuda":
        raise UserError(
            f"--kernels cuda needs a CUDA device, but this run uses {device_type}; "
            f"use --kernels torch"
        )
    try:
        import csrc
    except ImportError as e:
        if kernels == "auto":
            return TorchOps()
        raise UserError(
            f"--kernels cuda: the arcana_kernels extension is not built ({e}); build it with "
            f"`python setup.py build_ext --inplace`, or use --kernels torch"
        ) from None
    return csrc.CudaOps(TorchOps())


def select_run_ops(kernels, device, dtype, mc, batch_size):
    """select_ops for a training run: on a GPU with the kernels, their start-of-run check at its
    shapes (checked_kernels) -> (ops, lines for the run summary, none for PyTorch's ops)."""
    ops = select_ops(kernels, torch.device(device).type)
    if ops.name == "torch":
        return ops, []
    return checked_kernels(kernels, ops.torch_ops, device, dtype, mc, batch_size)


def checked_kernels(kernels, torch_ops, device, dtype, mc, batch_size, repeats=10):
    """Check each op's kernels against PyTorch's at the run's shapes, forward and backward, and
    time both (csrc.check_kernels). --kernels auto uses an op's kernels where they passed and are
    faster, PyTorch's op otherwise, with a warning line where they failed; --kernels cuda uses
    every kernel, and stops naming an op that failed. Every process of a run decides alike.
    -> (csrc.CudaOps, summary lines)."""
    import csrc

    start = time.perf_counter()
    shape = (batch_size, mc.block_size, mc.n_embd, mc.n_head, mc.vocab_size)
    try:
        verdicts = csrc.check_kernels(torch_ops, device, dtype, *shape, repeats)
    except csrc.KernelCrash as e:
        raise UserError(
            f"{e}; this process cannot go on: --kernels torch runs without the kernels"
        ) from None
    passed = agreed([v.passed for v in verdicts], device)
    faster = agreed([v.kernel_ms <= v.torch_ms for v in verdicts], device)
    lines = [
        f"kernels: checked against PyTorch in {time.perf_counter() - start:.1f} s at "
        f"B={batch_size}, T={mc.block_size}, C={mc.n_embd}, {mc.n_head} heads, "
        f"{dtype_name(dtype)} (forward + backward):"
    ]
    use = []
    for v, ok, fast in zip(verdicts, passed, faster):
        error = v.error or "it failed on another process"
        if not ok and kernels == "cuda":
            raise UserError(
                f"--kernels cuda: the {v.op} kernels failed their start-of-run check ({error}); "
                f"--kernels auto runs PyTorch's op instead, --kernels torch PyTorch's everywhere"
            )
        if not ok:
            lines.append(
                f"warning: the {v.op} kernels failed their start-of-run check ({error}); using "
                f"PyTorch's"
            )
            continue
        if kernels == "cuda" or fast:
            use.append(v.op)
        choice = "kernels" if v.op in use else "PyTorch (faster)"
        times = f"kernels {v.kernel_ms:8.3f} ms, PyTorch {v.torch_ms:8.3f} ms"
        lines.append(f"  {v.op:<15} {times}: {choice}")
    return csrc.CudaOps(torch_ops, use), lines


def agreed(flags, device=None):
    """flags, each true only where it is true on every process of the run (a no-op without
    torch.distributed). device: where the process group communicates (by default CUDA under
    NCCL, else the CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(f) for f in t.tolist()]


# -----------------------------------------------------------------------------
# data


def find_shards(data_dir, split):
    """The shards of split ('train' or 'val') in data_dir, in order: those its manifest.json
    lists, where prepare.py wrote it, else every *_{split}_*.npy file sorted by name."""
    if os.path.isfile(data_dir):
        raise UserError(
            f"--data_dir {data_dir} is a file; pass the folder of token shards prepare.py wrote"
        )
    manifest = read_manifest(data_dir) if os.path.isdir(data_dir) else None
    if manifest is None:
        shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    else:
        shards = []
        for shard in manifest["shards"]:
            if shard["split"] == split:
                shards.append(os.path.join(data_dir, shard["name"]))
    if not shards:
        raise UserError(
            f"--data_dir {data_dir} has no *_{split}_*.npy shards; run `python prepare.py "
            f"--out_dir {data_dir}` first (or point --data_dir at the folder it wrote)"
        )
    return shards


def unlisted_shards(data_dir, shards):
    """The *_train_* and *_val_* files in data_dir that a run does not read (not in shards)."""
    found = set()
    for split in ("train", "val"):
        found.update(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    return sorted(os.path.basename(path) for path in found - set(shards))


def data_identity(data_dir):
    """The shards a run reads, each as its size and a hash of its first and last 64 KiB: the same
    data in another folder matches, other data does not."""
    identity = {}
    for split in ("train", "val"):
        identity[split] = [shard_fingerprint(path) for path in find_shards(data_dir, split)]
    return identity


def shard_fingerprint(path, edge=1 << 16):
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        f.seek(max(0, size - edge))
        digest.update(f.read(edge))
    return [size, digest.hexdigest()]


def open_shard(path):
    """Memory-map one token shard (never loaded whole), checking that it is a 1-D array of
    integers."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(
            f"shard {path} is missing; run prepare.py again (the same command writes it again)"
        ) from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(
            f"shard {path} is corrupt or truncated ({e}); delete it and run prepare.py again"
        ) from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise UserError(
            f"shard {path} holds a {tokens.dtype} array of shape {tokens.shape}, not a 1-D "
            f"array of token ids; regenerate it with prepare.py"
        )
    return tokens


def checked_length(path, chunk=1 << 26):
    """A shard's length, after checking that GPT-2's tokenizer can make every id in it (at the
    start, not hours in)."""
    tokens = open_shard(path)
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        bad = np.flatnonzero((part < 0) | (part >= GPT2_VOCAB_SIZE))
        if bad.size:
            raise UserError(
                f"shard {path} holds token id {part[bad[0]]} at offset {start + bad[0]}, outside "
                f"GPT-2's 0..{GPT2_VOCAB_SIZE - 1}; it was not written by prepare.py's tokenizer: "
                f"regenerate it"
            )
    return len(tokens)


class ShardLoader:
    """(B, T) batches from a list of token shards, the same stream for any number of processes.

    The stream is a sequence of rows, each T + 1 contiguous tokens inside one shard: row k of a
    shard starts at its token k * T, so a shard of n tokens holds (n - 1) // T rows (the tokens
    after its last whole row are never read). Rows run through the shards in order, then through
    the next epoch's order (permuted per epoch when shuffling). Every micro-step takes the next
    B * world_size rows and rank r reads the B rows at r * B of them; a step of grad_accum
    micro-steps thus reads the next total_batch_size / T rows, whatever the process count and
    batch split, and a micro-batch may take rows from several shards. The position (epoch, index
    in the epoch's order, row in that shard) is the same on every rank, so a run resumes on the
    same stream with another number of processes."""

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        self.shards, self.B, self.T, self.rank, self.world_size = shards, B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        # every shard opened and checked up front; rows per shard in file order
        self.rows = [max(checked_length(path) - 1, 0) // T for path in shards]
        if not any(self.rows):
            raise UserError(
                f"every shard in {os.path.dirname(shards[0]) or '.'} is shorter than one row of "
                f"block_size + 1 = {T + 1} tokens; lower --block_size, or prepare more data"
            )
        self.capacity = sum(self.rows) * T  # tokens read in one pass
        self.path = self.tokens = None
        self.load_state_dict({"epoch": 0, "index": 0, "row": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "row": self.row}

    def load_state_dict(self, state):
        """Also reads the {"epoch", "index", "pos"} of older checkpoints: pos, a token offset,
        was always a multiple of T there, so it names the same place as row pos // T."""
        row = state["row"] if "row" in state else state["pos"] // self.T
        folder = os.path.dirname(self.shards[0]) or "."
        shard = state["index"] + 1
        if state["index"] >= len(self.shards):
            raise UserError(
                f"the checkpoint was reading shard {shard} of its data, but {folder} has "
                f"{len(self.shards)}; resume with the --data_dir it was trained on"
            )
        order = self.order(state["epoch"])
        rows = self.rows[order[state["index"]]]
        if row > rows:
            raise UserError(
                f"the checkpoint was reading row {row} of shard {shard} of its data, but that "
                f"shard of {folder} holds {rows} rows; resume with the --data_dir it was trained on"
            )
        self.epoch, self.index, self.epoch_order = state["epoch"], state["index"], order
        self.row = 0
        self.advance(row)  # onto the next shard where this one has no row left

    def order(self, epoch):
        if not self.shuffle:
            return list(range(len(self.shards)))
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in permutation]

    def advance(self, n):
        """Move n rows along the stream, onto a shard that has a row left."""
        self.row += n
        while self.row >= self.rows[self.epoch_order[self.index]]:
            self.row -= self.rows[self.epoch_order[self.index]]
            self.index += 1
            if self.index == len(self.shards):
                self.epoch, self.index = self.epoch + 1, 0
                self.epoch_order = self.order(self.epoch)

    def read(self, n):
        """The next n rows, (n, T + 1) int64, one strided view per shard they come from."""
        parts = []
        while n:
            path = self.shards[self.epoch_order[self.index]]
            if path != self.path:
                self.path, self.tokens = path, open_shard(path)
            take = min(n, self.rows[self.epoch_order[self.index]] - self.row)
            span = self.tokens[self.row * self.T : (self.row + take) * self.T + 1]
            parts.append(np.lib.stride_tricks.sliding_window_view(span, self.T + 1)[:: self.T])
            self.advance(take)
            n -= take
        return torch.from_numpy(np.concatenate(parts, dtype=np.int64))

    def next_batch(self):
        """This rank's B rows of the next B * world_size: (inputs, targets), each (B, T)."""
        self.advance(self.rank * self.B)
        rows = self.read(self.B)  # (B, T + 1)
        self.advance((self.world_size - 1 - self.rank) * self.B)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# -----------------------------------------------------------------------------
# runtime: device, processes, precision


# rank: this process among all; local_rank: on its node (its GPU); world_size: processes in all;
# device: e.g. cuda:3; device_type: cuda, cpu or mps; master: rank 0, the one that logs and
# checkpoints; ddp: launched by torchrun
Runtime = namedtuple("Runtime", "rank local_rank world_size device device_type master ddp")


def resolve_device(name, local_rank):
    """--device (auto, cpu, cuda, cuda:N, mps) -> (device, device type)."""
    mps = torch.backends.mps.is_available()
    if name == "auto" and torch.cuda.is_available():
        name = "cuda"
    elif name == "auto":
        name = "mps" if mps else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"  # each process of a node on its own GPU
    if not re.fullmatch(r"cpu|mps|cuda:\d+", name):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use --device cpu (or auto)"
        )
    if name == "mps" and not mps:
        raise UserError(
            "--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)"
        )
    return name, name.split(":")[0]


def setup_runtime(device_name):
    ddp = "RANK" in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
    """Destroy the process group while Python is fully alive. DDP keeps it in reference cycles,
    so collect them first: a gloo worker thread that lets go of its last tensors during
    interpreter shutdown aborts the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def resolve_dtype(name, device_type):
    if name != "auto":
        return getattr(torch, name)
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_context(device_type, dtype):
    """Mixed precision for the matmuls when dtype is 16-bit; weights and optimizer state stay
    float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def device_name(rt):
    if rt.device_type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    return platform.processor() or platform.machine()


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
    name = device_name(rt)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(model, T):
    """Training FLOPs per token: 6 per weight that multiplies (all but the position embedding),
    plus causal attention's 6 * n_layer * n_embd * T (half of the full T x T score and value
    matmuls)."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 6 * c.n_layer * c.n_embd * T


# -----------------------------------------------------------------------------
# evaluation and sampling


def batch_to_device(x, y, device):
    """A loader batch on the run's device. A CPU batch bound for a GPU is pinned first: a copy
    from pinned memory is queued behind the GPU's work, where one from pageable memory may wait
    for it."""
    if not device.startswith("cuda"):
        return x.to(device), y.to(device)
    return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
        device, non_blocking=True
    )


@torch.no_grad()
def evaluate_val(model, loader, micro_batches, rt, amp):
    """Mean loss over the first micro_batches windows of each rank in the val shards (always the
    same tokens)."""
    model.eval()
    loader.load_state_dict({"epoch": 0, "index": 0, "row": 0})
    total = torch.zeros((), device=rt.device)
    progress = Progress("validation batches", micro_batches, rt.master)
    for i in range(micro_batches):
        progress.update(i)
        x, y = batch_to_device(*loader.next_batch(), rt.device)
        with amp:
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    if rt.ddp:
        dist.all_reduce(total)
    return total.item() / (micro_batches * rt.world_size)


def print_samples(model, prompt, num_samples, length, rt, amp, seed):
    """Completions of prompt, printed by the first process. Every process of a run generates the
    same ones: under --fsdp every forward pass is a collective."""
    enc = gpt2_encoding()
    tokens = enc.encode_ordinary(prompt) or [EOT_TOKEN]
    idx = torch.tensor(tokens, device=rt.device).repeat(num_samples, 1)
    generator = torch.Generator(device=rt.device)  # its own stream: the training RNG is untouched
    generator.manual_seed(seed)
    model.eval()
    with amp:
        out = model.generate(idx, length, generator=generator)
    model.train()
    if not rt.master:
        return
    for i, row in enumerate(out.tolist()):
        print(f"sample {i}: {enc.decode(row)!r}")


def set_up_hellaswag(cfg, rt, T):
    """The HellaSwag file every process evaluates on, or None when it is off for this run. It is
    downloaded once per node where missing; every process must have it, or none uses it."""
    if cfg.hellaswag_every == 0:
        return None
    notice = "a process of this run has no copy"
    path = None
    try:
        path = hellaswag.ensure_data("val", cfg.hellaswag_dir or None, rt.local_rank == 0, rt.ddp)
    except UserError as e:
        notice = e
    if not agreed([path is not None], rt.device)[0]:
        if rt.master:
            print(f"notice: HellaSwag is off for this run: {notice}")
        return None
    hellaswag.render_file(path, T)  # a bad file is refused now, not at the first evaluation
    return path


def sampling_every(cfg, rt):
    """--sample_every, or 0 when a process has no tokenizer: sampling is a nicety, so the run goes
    on without it, and says so now, not at step 250."""
    if cfg.sample_every == 0:
        return 0
    error = None
    try:
        gpt2_encoding()
    except UserError as e:
        error = e
    if agreed([error is None], rt.device)[0]:
        return cfg.sample_every
    if rt.master:
        warn(f"{error or 'a process has no GPT-2 tokenizer'}; sampling is off for this run")
    return 0


# -----------------------------------------------------------------------------
# checkpoints


def list_checkpoints(log_dir):
    """(step, path) of every checkpoint in log_dir, newest first: model_NNNNN.pt files and the
    model_NNNNN folders of sharded runs. Temp files and folders are not listed."""
    found = []
    for path in glob.glob(os.path.join(log_dir, "model_*")):
        name = os.path.basename(path)
        as_file = re.fullmatch(r"model_(\d+)\.pt", name)
        as_folder = re.fullmatch(r"model_(\d+)", name)
        if as_file and os.path.isfile(path):
            found.append((int(as_file[1]), path))
        elif as_folder and os.path.isdir(path):
            found.append((int(as_folder[1]), path))
    return sorted(found, reverse=True)


def load_checkpoint(path):
    """A checkpoint's dict, or a UserError saying why it does not load. A sharded checkpoint (a
    folder) gives everything but its tensors, with "sharded": True; load_sharded_state reads
    those into a model."""
    if os.path.isdir(path):
        return load_sharded_meta(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist or is not a file")
    verify_checksum(path)
    try:  # memory-mapped: the processes of a node share one copy
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, unpickling errors, random bytes: one message
        raise UserError(
            f"checkpoint {path} does not load ({type(e).__name__}: {one_line(e)[:300]}); "
            f"it may be truncated or not an ArcanaGPT checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= set(ckpt):
        raise UserError(
            f"checkpoint {path} is not an ArcanaGPT checkpoint (no model, model_config and step)"
        )
    return ckpt


def resolve_resume(cfg, needed_by=None, master=True):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run, which needed_by (a flag
    that reads a checkpoint: --sample, --export) refuses."""
    if cfg.resume not in ("", "auto"):
        return cfg.resume, load_checkpoint(cfg.resume)
    if cfg.resume == "auto":
        for _, path in list_checkpoints(cfg.log_dir):
            try:
                return path, load_checkpoint(path)
            except UserError as e:
                if master:
                    warn(f"skipping {e}")
    if needed_by:
        raise UserError(
            f"{needed_by} needs a checkpoint: pass --resume PATH, or --resume auto with a "
            f"--log_dir holding one"
        )
    if cfg.resume and master:
        print(f"--resume auto: no valid checkpoint in {cfg.log_dir}; starting from scratch")
    return None, None


def checkpoint_weights(path, ckpt):
    """The model state dict of a checkpoint, sharded or not, as plain tensors in this process."""
    if not ckpt.get("sharded"):
        return ckpt["model"]
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_sharded_state(path, model)
    return model.state_dict()


def model_from_checkpoint(path, device="cpu", ops=None):
    """(GPT with the checkpoint's weights on device, the checkpoint dict): for sampling and
    evaluation."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]), ops)
    model.load_state_dict(checkpoint_weights(path, ckpt))
    return model.to(device), ckpt


class HashingWriter:
    """A file for writing that also feeds every byte written to a hash."""

    def __init__(self, file, digest):
        self.file = file
        self.digest = digest

    def write(self, data):
        self.digest.update(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def checksum_record(path):
    """Where a checkpoint's sha256 record is: beside a file (path.sha256), inside a folder."""
    if os.path.isdir(path):
        return os.path.join(path, "SHA256SUMS")
    return path + ".sha256"


def verify_checksum(path):
    """Refuse a checkpoint whose bytes differ from the sha256 recorded when it was written (in
    sha256sum's format: a line per file). The processes of a run share the files out; a
    checkpoint without the record is taken as it is."""
    record = checksum_record(path)
    try:
        with open(record) as f:
            entries = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return
    rank, world = process_rank()
    folder = os.path.dirname(record)
    ok = True
    for entry in entries[rank::world]:
        file = os.path.join(folder, entry[-1])
        ok = ok and len(entry) == 2 and os.path.isfile(file) and sha256_of(file) == entry[0]
    if not agreed([ok])[0]:
        raise UserError(
            f"checkpoint {path} does not match the sha256 recorded when it was written "
            f"({record}): it has been damaged since"
        )


def process_rank():
    """(this process's rank, the number of processes): (0, 1) without torch.distributed."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path, state):
    """torch.save(state) to path atomically, with the sha256 of its bytes recorded in
    path.sha256 before the checkpoint takes its name."""

    def write(f):
        digest = hashlib.sha256()
        torch.save(state, HashingWriter(f, digest))
        line = f"{digest.hexdigest()}  {os.path.basename(path)}\n".encode()
        atomic_write(path + ".sha256", lambda g: g.write(line))

    try:
        atomic_write(path, write)
    except (UserError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise UserError(
            f"cannot write checkpoint {path} ({one_line(e)[:200]}); free some disk space, "
            f"then continue with --resume auto"
        ) from None


# -----------------------------------------------------------------------------
# sharded checkpoints: torch.distributed.checkpoint folders, any process count

# lm_head.weight is transformer.wte.weight, one tensor under two names: a sharded checkpoint,
# whose tensors are stored by name, holds it once, as wte
TIED, TIED_TO = "lm_head.weight", "transformer.wte.weight"


def save_sharded_checkpoint(path, model, optimizers, meta):
    """Every process writes its shards of the model and optimizers into path.tmp/ (a file each,
    then the first process's .metadata), and the sha256 of its files; the first process records
    them in SHA256SUMS and renames the folder to path, so the name only ever appears on a
    complete checkpoint. meta (step, config, loader position) travels inside as one JSON string."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, _ = process_rank()
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):  # left by a save a kill interrupted
        shutil.rmtree(tmp)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizers)  # this process's shards
    model_state = without_tied(model_state)
    state = {"model": model_state, "optimizer": optimizer_state, "meta": json.dumps(meta)}
    try:
        dcp.save(state, checkpoint_id=tmp)  # returns on every process once .metadata is written
        mine = sorted(glob.glob(os.path.join(tmp, f"__{rank}_*.distcp")))
        if rank == 0:
            mine.append(os.path.join(tmp, ".metadata"))
        lines = [f"{sha256_of(file)}  {os.path.basename(file)}\n" for file in mine]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, lines)
        if rank == 0:
            record = "".join(sum(everyone, [])).encode()
            atomic_write(os.path.join(tmp, "SHA256SUMS"), lambda f: f.write(record))
            os.replace(tmp, path)  # a folder's rename is atomic
    except (OSError, CheckpointException) as e:
        raise UserError(
            f"cannot write checkpoint {path} ({one_line(e)[:200]}); free some disk space, "
            f"then continue with --resume auto"
        ) from None
    dist.barrier()


def dcp_load(state, path):
    """torch.distributed.checkpoint.load of state's keys from path, filling its tensors in place;
    in one process where there is no process group (which DCP announces with a warning)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_sharded_meta(path):
    """A sharded checkpoint's dict without its tensors (see load_checkpoint)."""

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(
            f"checkpoint {path} is a folder but not a sharded checkpoint (it has no .metadata)"
        )
    verify_checksum(path)
    state = {"meta": ""}
    try:  # only the meta: DCP reads the keys asked for
        dcp_load(state, path)
        meta = json.loads(state["meta"])
    except Exception as e:  # a damaged .metadata, a missing shard: many types, one message
        raise UserError(
            f"checkpoint {path} does not load ({type(e).__name__}: {one_line(e)[:300]})"
        ) from None
    return {**meta, "sharded": True}


def load_sharded_state(path, model, optimizers=()):
    """A sharded checkpoint's tensors into model (and its optimizers), sharded over this run's
    processes or not, whatever the number of processes that wrote it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not optimizers:
        dcp_load({"model": without_tied(model.state_dict())}, path)  # filled in place
        return
    model_state, optimizer_state = get_state_dict(model, optimizers)  # the layout to read into
    dcp_load({"model": without_tied(model_state), "optimizer": optimizer_state}, path)
    model_state[TIED] = model_state[TIED_TO]  # what was read, under both names
    set_state_dict(
        model, optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state
    )


def without_tied(model_state):
    """model_state's tensors but lm_head's, the same tensor as wte, which is saved once."""
    return {name: tensor for name, tensor in model_state.items() if name != TIED}


def load_full_state(model, pairs, ckpt):
    """A single-file checkpoint's whole tensors into a sharded model and its optimizers, pairs of
    (optimizer, the state it saved): each process keeps its shards. An optimizer's state, saved
    by parameter index, is named by parameter first (the same code builds the optimizer with its
    parameters in the same order)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=options)
    names = {id(p): name for name, p in model.named_parameters()}
    named = {"state": {}, "param_groups": []}
    for optimizer, saved in pairs:
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        for index, value in saved["state"].items():
            named["state"][order[index]] = value
        for group in saved["param_groups"]:
            params = [order[index] for index in group["params"]]
            named["param_groups"].append({**group, "params": params})
    optimizers = [optimizer for optimizer, _ in pairs]
    set_optimizer_state_dict(model, optimizers, named, options=options)


def sample_from_checkpoint(cfg):
    """`--sample PROMPT --resume PATH|auto`: print completions and return."""
    path, ckpt = resolve_resume(cfg, "--sample")
    rt = setup_runtime(cfg.device)
    mc = model_config(cfg, ckpt["model_config"], path)
    model = GPT(mc, select_ops(cfg.kernels, rt.device_type))
    model.load_state_dict(checkpoint_weights(path, ckpt))
    print(f"{path}: step {ckpt['step']}, val loss {ckpt.get('val_loss')}")
    amp = autocast_context(rt.device_type, resolve_dtype(cfg.dtype, rt.device_type))
    model.to(rt.device)
    print_samples(model, cfg.sample, cfg.num_samples, cfg.sample_length, rt, amp, cfg.seed)


def hf_config(mc):
    """The config.json of a Hugging Face GPT-2 with this shape (GPT-2's own vocabulary)."""
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=mc.block_size,
        n_ctx=mc.block_size,
        n_embd=mc.n_embd,
        n_layer=mc.n_layer,
        n_head=mc.n_head,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOT_TOKEN,
        eos_token_id=EOT_TOKEN,
        tie_word_embeddings=True,
    )


EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def check_export_folder(folder):
    """Refuse an --export folder that holds anything but an earlier export of ours (config.json
    marked "arcanagpt"): writing there would pair our weights with another model's files."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise UserError(f"--export {folder} is a file; choose a new or empty folder")
    names = set(os.listdir(folder))
    ours = set(EXPORT_FILES) | {name + ".tmp" for name in EXPORT_FILES}  # with interrupted writes
    others = sorted(names - ours)
    if not names:
        return
    if not others and "config.json" in names:
        try:
            with open(os.path.join(folder, "config.json")) as f:
                if "arcanagpt" in json.load(f):
                    return
        except (OSError, ValueError):
            pass  # not readable as ours
    shown = ", ".join((others or sorted(names))[:3])
    raise UserError(
        f"--export {folder} holds files of another model ({shown}); export into a new or empty "
        f"folder, or one holding an earlier --export"
    )


def export_hf(cfg):
    """`--export DIR --resume PATH|auto`: the checkpoint as a Hugging Face GPT-2 folder
    (config.json, model.safetensors, GPT-2's tokenizer files), which transformers,
    lm-evaluation-harness and GPT.from_pretrained read."""
    from safetensors.torch import save

    folder = cfg.export
    check_export_folder(folder)
    path, ckpt = resolve_resume(cfg, "--export")
    config = hf_config(GPTConfig(**ckpt["model_config"]))
    config["arcanagpt"] = {"checkpoint": os.path.abspath(path), "step": ckpt["step"]}
    weights = save(state_to_hf(checkpoint_weights(path, ckpt)), {"format": "pt"})
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--export {folder}: cannot make that folder ({e.strerror}); choose another"
        ) from None
    config_json = json.dumps(config, indent=2).encode()
    atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(config_json))
    atomic_write(os.path.join(folder, "model.safetensors"), lambda f: f.write(weights))
    if gpt2_files():  # GPT-2's tokenizer under the names transformers reads: no network needed
        for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copyfile(os.path.join(gpt2_files(), ours), os.path.join(folder, theirs))
    print(
        f"wrote {path} (step {ckpt['step']}) to {os.path.join(folder, '')} as a Hugging Face "
        f"GPT-2 model; evaluate it with lm_eval --model hf --model_args pretrained={folder} "
        f"--tasks hellaswag"
    )


# -----------------------------------------------------------------------------
# the log folder: one history per folder, run metadata, the summary before step 0


def holds_a_run(log_dir):
    """Whether log_dir holds checkpoints or a non-empty log.txt."""
    log_txt = os.path.join(log_dir, "log.txt")
    has_log = os.path.isfile(log_txt) and os.path.getsize(log_txt) > 0
    return has_log or bool(list_checkpoints(log_dir))


def check_log_dir(cfg, resume_path, ckpt):
    """Refuse a run that would mix with another history in --log_dir (on every process, before
    any work). Returns the checkpoints newer than the one resumed (damaged ones --resume auto
    skipped, or those --branch leaves)."""
    if ckpt is None:
        if cfg.resume != "auto" and holds_a_run(cfg.log_dir):
            raise UserError(
                f"--log_dir {cfg.log_dir} already holds a run (log.txt or model_*.pt); pass "
                f"--resume auto to continue it, or choose another --log_dir"
            )
        return [path for _, path in list_checkpoints(cfg.log_dir)]
    resume_dir = os.path.dirname(os.path.abspath(resume_path))
    if resume_dir != os.path.abspath(cfg.log_dir):
        if holds_a_run(cfg.log_dir):
            raise UserError(
                f"--log_dir {cfg.log_dir} holds another run; continue {resume_path} in its own "
                f"folder or in an empty --log_dir"
            )
        return []
    later = [path for step, path in list_checkpoints(cfg.log_dir) if step > ckpt["step"]]
    if later and cfg.resume != "auto" and not cfg.branch:
        names = ", ".join(os.path.basename(p) for p in later)
        raise UserError(
            f"{resume_path} is at step {ckpt['step']}, but {cfg.log_dir} holds later "
            f"checkpoints ({names}); pass --branch to continue it as a second history (the "
            f"later checkpoints move aside), or --resume auto to continue the newest"
        )
    return later


LOG_DIR_LOCK = ".train_gpt.lock"  # held by a run's master process while it runs
# The temporary files of this file's atomic writes into --log_dir (prepare.atomic_write's names).
OUR_TEMP_FILES = re.compile(
    r"(model_\d+|model_\d+\.pt|model_\d+\.pt\.sha256|log\.txt|run\.json)\.tmp"
)


def set_up_log_dir(cfg, resume_path, ckpt, later):
    """The master's side of check_log_dir: later checkpoints (and the log of the history they
    belong to) are moved into a set_aside_* folder, never deleted; the log keeps what the
    resumed checkpoint had logged."""
    try:
        os.makedirs(cfg.log_dir, exist_ok=True)
        for name in os.listdir(cfg.log_dir):
            if OUR_TEMP_FILES.fullmatch(name):  # left by writes a kill interrupted
                delete(os.path.join(cfg.log_dir, name))
    except OSError as e:
        raise UserError(
            f"--log_dir {cfg.log_dir}: cannot write there ({e.strerror}); choose a folder you "
            f"can write to"
        ) from None
    log = os.path.join(cfg.log_dir, "log.txt")
    old_log = ckpt is None and os.path.isfile(log) and os.path.getsize(log) > 0
    if later or old_log:
        set_aside(cfg.log_dir, later, ckpt)
    if ckpt is not None:
        keep_log_until(os.path.join(os.path.dirname(resume_path), "log.txt"), log, ckpt["step"])


def set_aside(log_dir, later, ckpt):
    """Move the checkpoints in later, the log and run.json (copies of them when a checkpoint is
    resumed) into a new set_aside_* folder."""
    aside = os.path.join(log_dir, time.strftime("set_aside_%Y%m%d_%H%M%S"))
    os.makedirs(aside)
    for path in later:
        for name in (path, path + ".sha256"):
            if os.path.exists(name):
                os.replace(name, os.path.join(aside, os.path.basename(name)))
    for name in ("log.txt", "run.json"):
        source = os.path.join(log_dir, name)
        if not os.path.exists(source):
            continue
        if ckpt is None:
            os.replace(source, os.path.join(aside, name))  # a new run starts a new log
        else:
            shutil.copy2(source, os.path.join(aside, name))  # the log goes on from the checkpoint
    if ckpt is not None:
        what = f"the checkpoints after step {ckpt['step']} and a copy of the log"
    elif later:
        what = "the old log and the checkpoints that do not load"
    else:
        what = "the old log"
    print(f"moved {what} to {aside}")


def keep_log_until(source, log, step):
    """Write to log the lines of source that belong to the first `step` steps: the train lines
    before step, and the evaluations of the model after step steps."""
    if not os.path.exists(source):
        return
    kept = []
    with open(source) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit():
                continue
            line_step, stream = int(parts[0]), parts[1]
            if line_step < step or (line_step == step and stream != "train"):
                kept.append(line)
    atomic_write(log, lambda f: f.write("".join(kept).encode()))


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


def write_run_json(run):
    """log_dir/run.json: the config, model, hardware, versions and commit of this run; a resumed
    run keeps what the run.json before it held under "earlier"."""
    rt = run.rt
    path = os.path.join(run.cfg.log_dir, "run.json")
    meta = {
        "config": asdict(run.cfg),
        "model_config": asdict(run.mc),
        "resumed_from": run.resume_path,
        "start_step": run.start_step,
        "tokens_per_step": run.cfg.total_batch_size,
        "grad_accum_steps": run.grad_accum,
        "world_size": rt.world_size,
        "device": rt.device,
        "device_name": device_name(rt),
        "dtype": dtype_name(run.dtype),
        "kernels": run.raw_model.ops.name,
        "kernel_ops": list(run.raw_model.ops.kernels),  # the ops that run on the kernels
        "compile": run.compiled,
        "parameters": run.raw_model.num_params(),
        "git_commit": git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cuda": torch.version.cuda,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if run.resume_path and os.path.exists(path):
        with open(path) as f:
            meta["earlier"] = json.load(f)
    data = json.dumps(meta, indent=2).encode()
    atomic_write(path, lambda f: f.write(data))


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def print_summary(run):
    """What the run will do, printed before step 0, with warnings about its data."""
    cfg, rt, mc = run.cfg, run.rt, run.mc
    B, T = cfg.batch_size, mc.block_size
    source = f"{cfg.init_from}, " if cfg.init_from else ""
    print(
        f"model: {source}{run.raw_model.num_params():,} parameters ({mc.n_layer} layers, "
        f"{mc.n_head} heads, width {mc.n_embd}, context {T}, vocabulary {mc.vocab_size})"
    )
    if run.resume_path:
        print(f"settings: data, batch, schedule and evaluations as in {run.resume_path}")
    if run.changed:
        print(f"settings given anew: {', '.join(run.changed)}")
    print(
        f"steps: {cfg.max_steps:,} of {cfg.total_batch_size:,} tokens = {B} x {T} x "
        f"{rt.world_size} process(es) x {run.grad_accum} accumulation steps; "
        f"{cfg.max_steps * cfg.total_batch_size:,} tokens in all"
    )
    print(f"optimizer: {optimizer_summary(run)}")
    print(
        f"device: {rt.world_size} process(es) on {rt.device} ({device_name(rt)}), "
        f"{dtype_name(run.dtype)}, kernels {run.raw_model.ops.name}, "
        f"compile {'on' if run.compiled else 'off'}"
    )
    print_memory(run)
    for line in run.kernel_lines:
        if line.startswith("warning: "):
            warn(line.removeprefix("warning: "))
        else:
            print(line)
    print(
        f"data: {cfg.data_dir}: {len(run.train_loader.shards)} train shard(s), "
        f"{run.train_loader.capacity:,} tokens per pass; val {run.val_loader.capacity:,} tokens"
    )
    every = cfg.checkpoint_every or cfg.max_steps
    checkpoints = "folders model_NNNNN (sharded)" if run.sharded else "model_NNNNN.pt"
    resuming = ""
    if run.resume_path:
        resuming = f"; resuming {run.resume_path} after step {run.start_step}"
    print(
        f"out: {os.path.join(cfg.log_dir, 'log.txt')} and checkpoints {checkpoints} there, "
        f"every {every} steps and after the last{resuming}"
    )
    if run.start_step >= cfg.max_steps:
        print(
            f"notice: the checkpoint is at step {run.start_step}, --max_steps {cfg.max_steps}: "
            f"nothing to train"
        )
    warn_about_data(run)


def print_memory(run):
    """The bytes of model state each process holds: float32 weights, their float32 gradients and
    the optimizers' state (AdamW: two moments a weight; Muon: one), of this process's shards
    under --fsdp."""
    weights = 4 * local_numel(run.raw_model.parameters())
    state = 2 * 4 * local_numel(optimized(run.optimizer))
    if run.muon is not None:
        state += 4 * local_numel(optimized(run.muon))
    line = (
        f"memory: {format_bytes(weights)} weights, {format_bytes(weights)} gradients, "
        f"{format_bytes(state)} optimizer state per process"
    )
    if run.sharded:
        line += f", sharded over {run.rt.world_size} processes"
        if run.grad_accum > 1:
            whole = format_bytes(4 * run.raw_model.num_params())
            line += f" (+{whole} of unsharded gradients while accumulating a step)"
    elif run.cfg.fsdp:
        line += " (--fsdp without torchrun: nothing to shard)"
    print(line)


def local_numel(params):
    """The elements of params on this process."""
    return sum(local_part(p).numel() for p in params)


def optimized(optimizer):
    """The parameters an optimizer updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def format_bytes(n):
    """1234567 -> 1.2 MiB, 3e9 -> 2.79 GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def optimizer_summary(run):
    cfg = run.cfg
    adamw = f"AdamW, lr {cfg.max_lr:g}, weight decay {cfg.weight_decay:g}"
    if run.muon is None:
        return adamw
    matrices = run.muon.param_groups[0]["params"]
    size = sum(p.numel() for p in matrices)
    return (
        f"Muon, lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum:g}, for the blocks' "
        f"{len(matrices)} matrices ({size:,} parameters); {adamw} for the rest"
    )


def warn_about_data(run):
    """Warnings about the shards: unfinished, left out, or read more than once."""
    cfg = run.cfg
    manifest = read_manifest(cfg.data_dir)  # None for shards another tool wrote
    if manifest and not manifest["complete"]:
        warn(
            f"{cfg.data_dir}/manifest.json says prepare.py has not finished: the run trains on "
            f"the shards written so far (the same prepare.py command finishes them)"
        )
    if manifest:
        unlisted = unlisted_shards(cfg.data_dir, run.train_loader.shards + run.val_loader.shards)
        if unlisted:
            warn(
                f"{cfg.data_dir} holds {len(unlisted)} shard file(s) its manifest.json does not "
                f"list, which the run leaves out: {', '.join(unlisted)}"
            )
    tokens, capacity = cfg.max_steps * cfg.total_batch_size, run.train_loader.capacity
    if tokens > capacity:
        warn(
            f"the run reads {tokens:,} tokens and the train shards hold {capacity:,}: it wraps "
            f"around the data {tokens / capacity:.1f} times"
        )
    tokens, capacity = cfg.val_steps * cfg.total_batch_size, run.val_loader.capacity
    if tokens > capacity:
        warn(
            f"each validation reads {tokens:,} tokens (--val_steps {cfg.val_steps}) and the val "
            f"shards hold {capacity:,}: it reads them {tokens / capacity:.1f} times; lower "
            f"--val_steps to {max(1, capacity // cfg.total_batch_size)}"
        )


def log(run, step, stream, value, extra=""):
    """A line of log.txt in build-nanogpt's `{step} {stream} {value}` format, and for people on
    stdout (the master process only)."""
    if not run.rt.master:
        return
    with open(os.path.join(run.cfg.log_dir, "log.txt"), "a") as f:
        f.write(f"{step} {stream} {value}\n")
    print(f"step:{step}/{run.cfg.max_steps} {stream}:{value}{extra}", flush=True)


# -----------------------------------------------------------------------------
# training


def learning_rate(step, cfg):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    decay_ratio = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 down to 0
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


def forward_backward(model, wrapper, loader, grad_accum, device, amp, scaler=None):
    """Gradients of one optimizer step's mean loss over grad_accum micro-batches, accumulated in
    .grad; with several processes (wrapper: the DDP or FSDP model) they are synchronized on the
    last micro-batch only. Returns the mean loss."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = batch_to_device(*loader.next_batch(), device)
        with gradient_sync(wrapper, last=micro_step == grad_accum - 1):
            with amp:
                _, loss = model(x, y)
            loss = loss.float() / grad_accum  # the mean over the step, not a sum of means
            loss_accum += loss.detach()
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()
    return loss_accum


def gradient_sync(wrapper, last):
    """The context of a micro-batch whose gradients are synchronized across processes only if it
    is the last of its step: DDP's no_sync(), FSDP's set_requires_gradient_sync (which keeps the
    whole gradient unsharded, in float32, until the last micro-batch reduce-scatters it)."""
    if wrapper is None or (last and isinstance(wrapper, DDP)):
        return nullcontext()
    if isinstance(wrapper, DDP):
        return wrapper.no_sync()
    wrapper.set_requires_gradient_sync(last)
    return nullcontext()


@contextmanager
def stop_requests():
    """SIGINT/SIGTERM ask the run to finish its step, checkpoint and exit 0; a second signal
    aborts. Yields the list of signals received."""
    requested = []

    def handle(signum, frame):
        requested.append(signum)
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            f"(a second SIGINT or SIGTERM aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def accumulation_steps(cfg, T, world_size):
    """Micro-batches per process and step: --total_batch_size in batch_size x T x world_size."""
    micro = cfg.batch_size * T * world_size
    if cfg.total_batch_size % micro:
        suggestion = micro * max(1, round(cfg.total_batch_size / micro))
        raise UserError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * "
            f"block_size * processes = {cfg.batch_size} * {T} * {world_size} = {micro}; "
            f"use e.g. {suggestion}"
        )
    return cfg.total_batch_size // micro


def resumed_config(cfg, given, ckpt, path):
    """The config of a resumed run: the checkpoint's run settings (RUN_SETTINGS), with those
    given on the command line over them. Returns (config, the changed ones as `--flag new (was
    old)`)."""
    saved = {"optimizer": "adamw", **ckpt["config"]}  # checkpoints before --optimizer: AdamW's
    restored, changed = {}, []
    for name in RUN_SETTINGS:
        if name not in saved:
            continue  # a setting newer than the checkpoint
        old, new = saved[name], getattr(cfg, name)
        if name not in given:
            restored[name] = old
        elif new != old:
            check_resume_change(name, old, new, ckpt, path)
            changed.append(f"--{name} {new} (was {old})")
    cfg = replace(cfg, **restored)
    check_flags(cfg)
    return cfg, changed


def check_resume_change(name, old, new, ckpt, path):
    """Refuse a flag that would make a resumed run read other tokens than the run it continues, or
    change its optimizer."""
    if name == "optimizer":
        raise UserError(
            f"--optimizer {new} differs from {old} in {path}: a run keeps its optimizer (its "
            f"state is in the checkpoint); leave --optimizer out to continue it, or start a new run"
        )
    other_data = name == "data_dir" and ckpt.get("data") != data_identity(new)
    if name in DATA_ORDER or other_data:
        raise UserError(
            f"--{name} {new} differs from {old} in {path}: the run would read other tokens "
            f"from here on; leave --{name} out to continue it, or start a new run"
        )


def initial_weights(cfg, ckpt, resume_path):
    """(the model's shape, OpenAI's weights to start from or None): the checkpoint's shape (its
    weights load with its optimizer, load_training_state), OpenAI's GPT-2 (--init_from, its
    position embeddings cropped to a shorter --block_size), or a new model's."""
    if ckpt is not None:
        return model_config(cfg, ckpt["model_config"], resume_path), None
    if not cfg.init_from:
        return model_config(cfg), None
    config, state = load_hf_weights(cfg.init_from)
    if cfg.block_size:
        if cfg.block_size > config.block_size:
            raise UserError(
                f"--block_size {cfg.block_size} is longer than {cfg.init_from}'s context "
                f"{config.block_size}"
            )
        config.block_size = cfg.block_size
        wpe = state["transformer.wpe.weight"]
        state["transformer.wpe.weight"] = wpe[: cfg.block_size].clone()  # the first positions
    return model_config(cfg, asdict(config), cfg.init_from), state


def shard_model(raw_model, rt, dtype, compile_model):
    """FSDP2: each Block, then the root (wte = lm_head, wpe, ln_f), fully_shard'ed over the
    processes. A unit's weights are all-gathered for its forward and backward only (one or two
    blocks at a time), in the autocast dtype on CUDA, while the shards the optimizer updates
    stay float32 and gradients are reduce-scattered in float32. Each block compiles alone: FSDP's
    hooks break a whole-model graph."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # a block returns its MLP's output, a view, which the next block adds out of place: safe
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    param_dtype = None  # float32: the CPU's LayerNorm takes no 16-bit weights with float32 inputs
    if rt.device_type == "cuda" and dtype != torch.float32:
        param_dtype = dtype
    # the residual stream stays float32 (GPT.forward), as with DDP: no cast of block inputs
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in raw_model.transformer.h:
        if compile_model:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(raw_model, mesh=mesh, mp_policy=policy)


def wrap_model(raw_model, rt, compile_model):
    """(the model the steps call, the DDP wrapper or None): DDP under torchrun, then
    torch.compile (compiling the DDP wrapper lets it overlap gradient sync with backward)."""
    ddp_model = None
    model = raw_model
    if rt.ddp:
        # gradient_as_bucket_view: after the all-reduce .grad is a view into DDP's bucket, not a
        # copy. Safe here: grads are set to None (never detach_()ed), and clipping and AdamW only
        # read or scale .grad in place.
        device_ids = [rt.local_rank] if rt.device_type == "cuda" else None
        ddp_model = DDP(raw_model, device_ids=device_ids, gradient_as_bucket_view=True)
        model = ddp_model
    if compile_model:
        model = torch.compile(model)
    return model, ddp_model


def load_training_state(model, optimizers, ckpt, path, sharded):
    """A checkpoint's weights and optimizer state into this run's model and its optimizers
    [AdamW, Muon or None]: a sharded checkpoint into any run (DCP), a single file into an
    unsharded run or, by its whole tensors, into a sharded one."""
    adamw, muon = optimizers
    pairs = [(adamw, ckpt.get("optimizer"))]
    if muon is not None:
        pairs.append((muon, ckpt.get("muon")))
    if ckpt.get("sharded"):
        load_sharded_state(path, model, [optimizer for optimizer, _ in pairs])
    elif sharded:
        load_full_state(model, pairs, ckpt)
    else:
        load_weights(model, ckpt["model"], path)
        for optimizer, saved in pairs:
            optimizer.load_state_dict(saved)


def apply_given_settings(cfg, adamw, muon):
    """Loading an optimizer's state restores its settings too: those of this run, which may be
    given anew on resuming, replace them (the learning rates are set at every step)."""
    adamw.param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group
    if muon is not None:
        muon.param_groups[0].update(momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)


@dataclass
class Run:
    """What a training run works with, built once before step 0."""

    cfg: TrainConfig
    rt: Runtime
    mc: GPTConfig
    raw_model: GPT  # the weights (sharded with --fsdp): sampling, checkpoints, the gradient norm
    model: nn.Module  # what the steps call: raw_model, or its DDP and torch.compile wrappers
    wrapper: Optional[nn.Module]  # what synchronizes gradients: DDP, the sharded model, or None
    sharded: bool  # --fsdp under torchrun
    compiled: bool
    optimizer: torch.optim.AdamW  # every parameter, or with --optimizer muon those Muon leaves
    muon: Optional[torch.optim.Muon]  # the blocks' matrices with --optimizer muon, else None
    scaler: torch.amp.GradScaler  # float16 loss scaling; a no-op for other dtypes
    train_loader: ShardLoader
    val_loader: ShardLoader
    dtype: torch.dtype
    amp: object  # the autocast context of the forward passes
    grad_accum: int
    hellaswag_path: Optional[str]
    sample_every: int
    data: dict  # the shards it reads, by name and size (data_identity)
    start_step: int  # steps done before this process started: the checkpoint's step, or 0
    resume_path: Optional[str]  # the checkpoint it continues
    changed: list  # the run settings given anew on resuming, as `--flag new (was old)`
    kernel_lines: list  # the start-of-run check of the kernels, for the summary

    def optimizers(self):
        return [o for o in (self.optimizer, self.muon) if o is not None]


def start_run(cfg, rt, mc, pretrained, ckpt, resume_path, changed):
    """The model, optimizer, loaders and evaluations of a run, on this process."""
    T = mc.block_size
    grad_accum = accumulation_steps(cfg, T, rt.world_size)
    dtype = resolve_dtype(cfg.dtype, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves
    train_shards = find_shards(cfg.data_dir, "train")
    val_shards = find_shards(cfg.data_dir, "val")
    B, rank, world = cfg.batch_size, rt.rank, rt.world_size
    train_loader = ShardLoader(train_shards, B, T, rank, world, cfg.shuffle, cfg.seed)
    val_loader = ShardLoader(val_shards, B, T, rank, world)

    ops, kernel_lines = select_run_ops(cfg.kernels, rt.device, dtype, mc, cfg.batch_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    raw_model = GPT(mc, ops)
    if pretrained is not None:
        load_weights(raw_model, pretrained, cfg.init_from)
    raw_model.to(rt.device)
    compiled = rt.device_type == "cuda" if cfg.compile is None else cfg.compile
    sharded = cfg.fsdp and rt.ddp  # under torchrun, also over one process
    if sharded:
        shard_model(raw_model, rt, dtype, compiled)  # before the optimizers: they hold the shards
    optimizer, muon = raw_model.configure_optimizers(cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=dtype == torch.float16)
    if ckpt is not None:
        load_training_state(raw_model, [optimizer, muon], ckpt, resume_path, sharded)
        apply_given_settings(cfg, optimizer, muon)
        train_loader.load_state_dict(ckpt["train_loader"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    if sharded:
        model, wrapper = raw_model, raw_model
    else:
        model, wrapper = wrap_model(raw_model, rt, compiled)
    return Run(
        cfg=cfg,
        rt=rt,
        mc=mc,
        raw_model=raw_model,
        model=model,
        wrapper=wrapper,
        sharded=sharded,
        compiled=compiled,
        optimizer=optimizer,
        muon=muon,
        scaler=scaler,
        train_loader=train_loader,
        val_loader=val_loader,
        dtype=dtype,
        amp=autocast_context(rt.device_type, dtype),
        grad_accum=grad_accum,
        hellaswag_path=set_up_hellaswag(cfg, rt, T),
        sample_every=sampling_every(cfg, rt),
        data=data_identity(cfg.data_dir),
        start_step=ckpt["step"] if ckpt else 0,
        resume_path=resume_path,
        changed=changed,
        kernel_lines=kernel_lines,
    )


def due(run, step, every):
    return step == run.cfg.max_steps or (every > 0 and step % every == 0)


def evaluate(run, step):
    """The evaluations due for the model after `step` steps; returns the val loss, if measured."""
    cfg, rt = run.cfg, run.rt
    val_loss = None
    if due(run, step, cfg.val_every):
        micro_batches = cfg.val_steps * run.grad_accum
        val_loss = evaluate_val(run.model, run.val_loader, micro_batches, rt, run.amp)
        log(run, step, "val", f"{val_loss:.4f}")
    if run.hellaswag_path and due(run, step, cfg.hellaswag_every):
        run.model.eval()
        with run.amp:
            s = hellaswag.score(
                run.model, run.hellaswag_path, run.mc.block_size, rt.device, rt.rank, rt.world_size
            )
        run.model.train()
        acc = f" acc:{s.correct / s.total:.4f} ({s.total} examples)"
        log(run, step, "hella", f"{s.correct_norm / s.total:.4f}", acc)
    if run.sample_every > 0 and step > 0 and due(run, step, run.sample_every):
        prompt = "Hello, I'm a language model,"
        print_samples(
            run.raw_model, prompt, cfg.num_samples, cfg.sample_length, rt, run.amp, cfg.seed + step
        )
    return val_loss


def checkpoint(run, step, val_loss):
    """Save the run after `step` steps in log_dir, as model_{step}.pt, or as the folder
    model_{step} that every process of a sharded run writes its part of; keep the newest
    --keep_checkpoints. Returns the checkpoint's path."""
    cfg, rt = run.cfg, run.rt
    meta = {
        "config": asdict(cfg),
        "model_config": asdict(run.mc),
        "step": step,
        "val_loss": val_loss,
        "train_loader": run.train_loader.state_dict(),
        "scaler": run.scaler.state_dict(),
        "world_size": rt.world_size,
        "data": run.data,
    }
    path = os.path.join(cfg.log_dir, f"model_{step:05d}")
    if run.sharded:
        save_sharded_checkpoint(path, run.raw_model, run.optimizers(), meta)
    else:
        path += ".pt"
    if not rt.master:
        return path
    if not run.sharded:
        state = {**meta, "model": run.raw_model.state_dict()}
        state["optimizer"] = run.optimizer.state_dict()  # AdamW's
        if run.muon is not None:
            state["muon"] = run.muon.state_dict()
        save_checkpoint(path, state)
    print(f"saved {path}")
    if cfg.keep_checkpoints:
        for _, old in list_checkpoints(cfg.log_dir)[cfg.keep_checkpoints :]:
            delete(old)
    return path


def delete(path):
    """Delete a file, with the sha256 record beside it, or a folder (a sharded checkpoint)."""
    if os.path.isdir(path):
        shutil.rmtree(path)  # a sharded checkpoint, its SHA256SUMS inside
        return
    os.remove(path)
    if os.path.exists(path + ".sha256"):
        os.remove(path + ".sha256")


def compute_gradients(run, stop):
    """The clipped gradients of one step: (the mean loss over all processes, the gradient norm,
    whether any process was asked to stop; all stop together)."""
    rt = run.rt
    for optimizer in run.optimizers():
        optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(
        run.model, run.wrapper, run.train_loader, run.grad_accum, rt.device, run.amp, run.scaler
    )
    stats = torch.stack([loss, torch.tensor(float(len(stop) > 0), device=rt.device)])
    if rt.ddp:
        dist.all_reduce(stats)
    for optimizer in run.optimizers():
        run.scaler.unscale_(optimizer)
    max_norm = run.cfg.grad_clip or float("inf")
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), max_norm)
    return stats[0].item() / rt.world_size, norm.item(), stats[1].item() > 0


def diverged(run, loss, norm):
    """A non-finite loss, or gradient norm (with float16 the scaler skips such a step instead)."""
    return not math.isfinite(loss) or (not run.scaler.is_enabled() and not math.isfinite(norm))


def update(run, step):
    """The optimizer steps at this step's learning rates; returns AdamW's. Muon's follows the same
    warmup and decay from --muon_lr."""
    cfg = run.cfg
    lr = learning_rate(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.muon is not None:
        for group in run.muon.param_groups:
            group["lr"] = lr / cfg.max_lr * cfg.muon_lr
    for optimizer in run.optimizers():
        run.scaler.step(optimizer)  # skipped by a float16 scaler when a gradient is not finite
    run.scaler.update()
    return lr


def weights_finite(run):
    """Whether every weight is finite, on every process (checked before each checkpoint)."""
    finite = [torch.isfinite(local_part(p.detach())).all() for p in run.raw_model.parameters()]
    return agreed([torch.stack(finite).all().item()], run.rt.device)[0]


def local_part(tensor):
    """This process's part of a tensor: a DTensor's shard (--fsdp), else the tensor itself."""
    if hasattr(tensor, "to_local"):  # a DTensor (importing the class costs every start 0.5 s)
        return tensor.to_local()
    return tensor


@contextmanager
def log_dir_lock(log_dir, rt):
    """The master process holds --log_dir's lock while the run lasts (prepare.folder_lock): one
    run at a time writes into a folder, and a second one is refused, naming the first."""
    if os.path.isfile(log_dir):
        raise UserError(f"--log_dir {log_dir} is a file, not a folder; choose another --log_dir")
    with ExitStack() as stack:
        refusal = None
        if rt.master:
            try:
                stack.enter_context(folder_lock(log_dir, LOG_DIR_LOCK, "--log_dir", "train_gpt.py"))
            except UserError as e:
                refusal = e
        if not agreed([refusal is None], rt.device)[0]:
            raise refusal or UserError(
                f"--log_dir {log_dir} is being written by another train_gpt.py (see process 0)"
            )
        yield


def train(cfg, given=()):
    """Run training as configured (given: the flags the command line gave); returns the process
    exit code."""
    rt = setup_runtime(cfg.device)
    resume_path, ckpt = resolve_resume(cfg, master=rt.master)
    changed = []
    if ckpt is not None:
        cfg, changed = resumed_config(cfg, given, ckpt, resume_path)
    mc, pretrained = initial_weights(cfg, ckpt, resume_path)
    with log_dir_lock(cfg.log_dir, rt):
        later = check_log_dir(cfg, resume_path, ckpt)
        run = start_run(cfg, rt, mc, pretrained, ckpt, resume_path, changed)
        if rt.master:
            set_up_log_dir(cfg, resume_path, ckpt, later)
            write_run_json(run)
            print_summary(run)
        if ckpt is None:
            evaluate(run, 0)  # the model before training (a resumed run has its checkpoint's)
        return train_loop(run)


def train_loop(run):
    """Train from run.start_step to --max_steps, evaluating and checkpointing as due; returns
    the process exit code."""
    cfg, rt = run.cfg, run.rt
    peak = peak_flops(rt, run.dtype)
    flops_step = flops_per_token(run.raw_model, run.mc.block_size) * cfg.total_batch_size
    step_times = deque(maxlen=50)  # for the time left
    last_checkpoint = run.resume_path
    with stop_requests() as stop:
        for step in range(run.start_step, cfg.max_steps):
            synchronize(rt.device_type)
            t0 = time.time()
            loss, norm, stopping = compute_gradients(run, stop)
            if diverged(run, loss, norm):
                report_divergence(
                    rt, f"step {step}: loss {loss}, gradient norm {norm}", last_checkpoint
                )
                return 1
            lr = update(run, step)
            synchronize(rt.device_type)
            dt = time.time() - t0

            step_times.append(dt)
            eta = sum(step_times) / len(step_times) * (cfg.max_steps - step - 1)
            extra = f" lr:{lr:.4e} norm:{norm:.4f} dt:{dt * 1000:.1f}ms"
            extra += f" tok/s:{cfg.total_batch_size / dt:,.0f}"
            if peak:
                extra += f" mfu:{100 * flops_step / dt / (peak * rt.world_size):.1f}%"
            extra += f" eta:{format_duration(eta)}"
            log(run, step, "train", f"{loss:.6f}", extra)

            trained = step + 1  # evaluations and checkpoints belong to the model after this step
            val_loss = evaluate(run, trained)
            if stopping or due(run, trained, cfg.checkpoint_every):
                if not weights_finite(run):  # a checkpoint is never written of broken weights
                    report_divergence(
                        rt, f"step {step}: the updated weights are not finite", last_checkpoint
                    )
                    return 1
                last_checkpoint = checkpoint(run, trained, val_loss)
            if stopping:
                break
    return 0


def report_divergence(rt, what, last_checkpoint):
    if rt.master:
        print(
            f"error: {what}: training diverged. Stopping without a checkpoint; the last good one "
            f"is {last_checkpoint or '(none)'}: resume from it with a lower --max_lr or a longer "
            f"--warmup_steps",
            file=sys.stderr,
        )


# -----------------------------------------------------------------------------
# entry point


def main(argv=None):
    cfg, given = parse_config(argv)
    try:
        check_flags(cfg)
        if cfg.sample:
            sample_from_checkpoint(cfg)
            return 0
        if cfg.export:
            export_hf(cfg)
            return 0
        return train(cfg, given)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except RuntimeError as e:
        if not lost_a_process(e):
            raise
        print(
            f"error: process {dist.get_rank()}: another process of this run stopped "
            f"({one_line(e)[:150]}); torchrun names it above; continue with --resume auto",
            file=sys.stderr,
        )
        return 1
    finally:
        end_distributed()


def lost_a_process(error):
    """Whether a RuntimeError under torchrun is a collective that lost its peer process."""
    if not dist.is_initialized():
        return False
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(error, dist.DistError) or any(words in str(error) for words in lost)


if __name__ == "__main__":
    sys.exit(main())
