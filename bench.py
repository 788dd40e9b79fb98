"""
ArcanaGPT benchmarks: each suite measures one thing and prints a table, with the goal and met/missed
beside the number it judges; --record appends the run to bench/RESULTS.md. `python bench.py SUITE
--help` lists its flags.

    python bench.py [all] [--record]  # every suite in turn (the GPU suites skip without a GPU)
    python bench.py train             # optimizer steps: tokens/s, MFU, memory per kernels/compile
    python bench.py kernels           # LayerNorm / GELU kernels vs eager and compiled PyTorch, GB/s
    python bench.py attention         # causal attention kernels vs each SDPA backend
    python bench.py cross_entropy     # the fused cross-entropy kernel vs eager and compiled PyTorch
    python bench.py hellaswag         # hellaswag.py: examples/s scoring the val split
    python bench.py tokenize          # prepare.py: tokens/s with N processes vs one process
    python bench.py memory            # model state per process: DDP vs --fsdp, computed, measured
    python bench.py quality           # val loss per token of --optimizer adamw and muon
    bench/gpu_check.sh OUTDIR         # on a GPU machine: build, GPU tests, record every suite

kernels, attention and cross_entropy need a CUDA GPU. This file sits on top of the others: it
imports train_gpt.py, hellaswag.py, prepare.py and plot.py (for its table).
"""

import contextlib
import datetime
import functools
import gc
import io
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hellaswag
import prepare
import train_gpt as tg
from plot import table
from prepare import USER_ERROR_EXIT, UserError, one_line

# timed runs of each measurement on a GPU (the median counts), after untimed ones
REPS, WARMUP = 20, 3

# -----------------------------------------------------------------------------
# what every suite shares (SUITES at the end): flags from its config dataclass, device, dtype,
# tables, the record


def run(name, argv):
    """One suite: flags, device, dtype, header; its setup and table, printed and, with --record,
    recorded."""
    fn, cls, device, flags = SUITES[name]
    parser = prepare.config_parser(cls, fn.__doc__, **flags)
    parser.prog = f"bench.py {name}"
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = vars(parser.parse_args(argv))
    record = args.pop("record")
    check_positive(args, flags)
    cfg = cls(**args)
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU; skipped")
        return
    rt = tg.setup_runtime(device)
    dtype = tg.resolve_dtype("auto", rt.device_type)  # bfloat16 on CUDA, as train and hellaswag
    where, commit = tg.device_name(rt), (tg.git_commit() or "unknown")[:12]
    python = platform.python_version()
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {python}"
    print(f"{name} on {where} ({rt.device}), {datetime.date.today()}, commit {commit}; {versions}")
    result = fn(cfg, rt, dtype)
    if result is None:  # a suite's worker process
        return
    about, lines = result
    print(about, "", *lines, sep="\n")
    if record:
        command = " ".join([name, *argv])
        entry = (
            f"\n## {name}: {where}, {datetime.date.today()}, commit {commit}\n\n"
            f"`python bench.py {command}`; {versions}; {about}\n\n```\n"
        )
        entry += "\n".join(lines) + "\n```\n"
        append_record(entry)


def check_positive(args, flags):
    """Refuse a size, count or repetition of 0 or less (argparse checks the choices)."""
    for key, value in args.items():
        if "choices" in flags.get(key, {}):
            continue
        for v in value if isinstance(value, list) else [value]:
            if type(v) in (int, float) and v <= 0:
                raise UserError(f"--{key} {value} must be positive")


def append_record(entry):
    """Append a suite's entry to bench/RESULTS.md, atomically: a failure is one line."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "RESULTS.md")
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    prepare.atomic_write(path, lambda f: f.write((old + entry).encode()))
    print(f"recorded in {path}")


def goal(target, ok):
    return f"goal {target}: {'met' if ok else 'missed'}"


# -----------------------------------------------------------------------------
# GPU timing: CUDA-event medians with the L2 cache flushed, the copy-bandwidth ceiling, kernel
# variants


def median_ms(fn):
    """Median ms of fn() over REPS runs after WARMUP, each after zeroing 4x the L2 cache, as
    training reads HBM."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    flush = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device="cuda")
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@contextlib.contextmanager
def kernel_variant(v):
    """The arcana ops run variant v inside the block (0 plain, 1 fast, 2 cross-entropy re-reading
    rows from L2)."""
    torch.ops.arcana._set_variant(v)
    try:
        yield
    finally:
        torch.ops.arcana._set_variant(1)


def bandwidth(cases, variants):
    """(copy GB/s, table) of cases (name, goal as a share of copy or None, (arcana op, args),
    (torch fn, args)): GB/s of the bytes the op reads and writes, for each arcana variant and
    torch eager and compiled."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceiling = 2 * src.nbytes / median_ms(functools.partial(dst.copy_, src)) / 1e6
    rows = []
    for name, target, (op, args), (fn, inputs) in cases:
        out = op(*args)
        outs = out if isinstance(out, tuple) else (out,)
        nbytes = sum(t.nbytes for t in (*args, *outs) if torch.is_tensor(t))
        times = {}
        for v in variants:
            with kernel_variant(v):
                times[f"arcana v{v}"] = median_ms(functools.partial(op, *args))
        times["eager"] = median_ms(functools.partial(fn, *inputs))
        compiled = torch.compile(fn)
        try:
            times["compile"] = median_ms(functools.partial(compiled, *inputs))
        except Exception as e:
            print(f"{name}: torch.compile failed ({e!r:.160})")
        for impl, ms in times.items():
            gbs = nbytes / ms / 1e6
            vs_compile = f"{times['compile'] / ms:.2f}x" if "compile" in times else "-"
            met = ""
            if target and impl == "arcana v1":
                met = goal(f">= {target:.0%} of copy", gbs >= target * ceiling)
            rows.append(
                [
                    name,
                    impl,
                    f"{ms * 1e3:.1f}",
                    f"{gbs:.0f}",
                    f"{gbs / ceiling:.0%}",
                    f"{times['eager'] / ms:.2f}x",
                    vs_compile,
                    met,
                ]
            )
    header = ["op", "implementation", "us", "GB/s", "of copy", "vs eager", "vs compile", "goal"]
    return ceiling, table(header, rows)


# -----------------------------------------------------------------------------
# train: whole optimizer steps of train_gpt.py per kernels/compile configuration, on random tokens

# kernels[+compile]: each train_gpt.py --kernels choice but auto, with and without torch.compile
CONFIGS = []
for kernels in tg.KERNELS:
    if kernels != "auto":
        CONFIGS += [kernels, f"{kernels}+compile"]


@dataclass
class Train:
    model: str = "d12"  # model preset
    block_size: Optional[int] = None  # sequence length T; None: the preset's
    batch_size: Optional[int] = None  # micro-batch; None: largest of 64, 32, ..., 1 to fit; CPU: 4
    configs: Optional[list] = None  # kernels[+compile] setups; None: all four on CUDA, else torch's
    steps: int = 10  # timed optimizer steps per configuration, after 3 untimed; the median counts


def bench_train(cfg, rt, dtype):
    """Whole optimizer steps on random tokens per configuration, at the largest micro-batch that
    fits: tokens/s, MFU, peak memory. Goals (d12): fastest cuda >= 1.1x fastest torch, MFU >= 45%,
    less memory at the same B."""
    mc = tg.model_config(tg.TrainConfig(model=cfg.model, block_size=cfg.block_size))
    if cfg.batch_size:
        sizes = [cfg.batch_size]
    elif rt.device_type == "cuda":
        sizes = [64, 32, 16, 8, 4, 2, 1]
    else:
        sizes = [4]
    configs = cfg.configs
    if not configs and rt.device_type == "cuda":
        configs = CONFIGS
    elif not configs:
        configs = [c for c in CONFIGS if c.startswith("torch")]
    results, notes = {}, []  # config -> (B, tokens/s, MFU, peak bytes, loss)
    for name in configs:
        # a UserError for cuda off a GPU or unbuilt
        ops = tg.select_ops(name.split("+")[0], rt.device_type)
        for B in sizes:
            try:
                measured = time_steps(mc, ops, name.endswith("+compile"), B, cfg.steps, rt, dtype)
                results[name] = (B, *measured)
                print(f"  {name} at B={B}: {results[name][1]:,.0f} tokens/s", flush=True)
            except Exception as e:  # torch.compile can wrap an out-of-memory error in its own
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                    continue
                notes.append(f"{name}: failed at B={B} ({e!r:.160})")
            break
        else:
            notes.append(f"{name}: no micro-batch of {sizes} fits in memory")
    rows = []
    for name, (B, tok_s, mfu, mem, loss) in results.items():
        shown_mfu = f"{mfu:.1%}" if mfu else "-"
        shown_mem = f"{mem / 2**30:.2f} GiB" if mem else "-"
        rows.append([name, B, f"{tok_s:,.0f}", shown_mfu, shown_mem, f"{loss:.4f}"])
    lines = table(["config", "B", "tokens/s", "MFU", "peak mem", "loss"], rows) + notes
    lines += train_verdicts(results)
    peak = tg.peak_flops(rt, dtype)
    ceiling = f"{peak / 1e12:.0f} TFLOP/s, the datasheet bf16 dense peak" if peak else None
    about = (
        f"{dtype}, model {cfg.model} (T={mc.block_size}), median of {cfg.steps} steps after 3; "
        f"ceiling: {ceiling or 'none known (no MFU)'}"
    )
    return about, lines


def fastest(results):
    """The configuration of results with the most tokens/s."""
    return max(results, key=lambda name: results[name][1])


def train_verdicts(results):
    """Lines judging the cuda configurations against the torch ones: speed, MFU, memory."""
    torch_runs = {n: r for n, r in results.items() if n.startswith("torch")}
    cuda_runs = {n: r for n, r in results.items() if n.startswith("cuda")}
    if not torch_runs or not cuda_runs:
        return []
    best_torch, best_cuda = fastest(torch_runs), fastest(cuda_runs)
    speedup = cuda_runs[best_cuda][1] / torch_runs[best_torch][1]
    mfu = cuda_runs[best_cuda][2]
    lines = [
        "",
        f"{best_cuda} {speedup:.2f}x the tokens/s of {best_torch} "
        f"({goal('>= 1.10x', speedup >= 1.1)})",
    ]
    if mfu:
        lines.append(f"{best_cuda} MFU {mfu:.1%} ({goal('>= 45%', mfu >= 0.45)})")
    for name, (B, _, _, memory, _) in cuda_runs.items():
        twin = "torch" + name.removeprefix("cuda")
        if twin not in torch_runs:
            continue
        # each ran at the largest B that fits it: a twin at a smaller B did not fit B
        twin_B, _, _, twin_memory, _ = torch_runs[twin]
        less = memory < twin_memory if B == twin_B else B > twin_B
        lines.append(
            f"{name} at B={B} {memory / 2**30:.2f} GiB, {twin} at B={twin_B} "
            f"{twin_memory / 2**30:.2f} GiB ({goal('less memory at the same B', less)})"
        )
    return lines


def time_steps(mc, ops, compiled, B, steps, rt, dtype):
    """(tokens/s of the median step, MFU or None, peak bytes or None, loss) of whole optimizer
    steps."""
    T = mc.block_size
    torch._dynamo.reset()  # a fresh compilation per configuration and batch: no recompile limit
    gc.collect()  # what an attempt that ran out of memory left behind
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    torch.manual_seed(0)
    raw = tg.GPT(mc, ops).to(rt.device)
    model = torch.compile(raw) if compiled else raw
    optimizer = torch.optim.AdamW(
        raw.parameters(),
        lr=6e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=rt.device_type == "cuda",
    )
    # random windows already on the device: data loading is not timed
    windows = []
    for _ in range(4):
        windows.append(torch.randint(0, prepare.GPT2_VOCAB_SIZE, (B, T + 1), device=rt.device))
    amp, times = tg.autocast_context(rt.device_type, dtype), []
    for step in range(3 + steps):
        tg.synchronize(rt.device_type)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp:
            _, loss = model(windows[step % 4][:, :-1], windows[step % 4][:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        tg.synchronize(rt.device_type)
        times.append(time.perf_counter() - t0)
    tok_s = B * T / statistics.median(times[3:])
    peak = tg.peak_flops(rt, dtype)
    mfu = tg.flops_per_token(raw, T) * tok_s / peak if peak else None
    memory = torch.cuda.max_memory_allocated(rt.device) if rt.device_type == "cuda" else None
    return tok_s, mfu, memory, loss.item()


# -----------------------------------------------------------------------------
# kernels: the LayerNorm and GELU kernels (csrc/layernorm.cu, csrc/gelu.cu) vs PyTorch eager and
# torch.compile


@dataclass
class Kernels:
    rows: int = 65536  # rows B*T (GPT-2 124M's 64 x 1024)
    C: int = 768  # LayerNorm width n_embd; GELU runs on the 4C-wide MLP activation


def bench_kernels(cfg, rt, dtype):
    """LayerNorm, fused residual LayerNorm and GELU, forward and backward, vs PyTorch eager and
    torch.compile: GB/s and share of the copy bandwidth. Goals: LayerNorm >= 80% of copy forward,
    >= 65% backward; GELU >= 85%."""
    tg.select_ops("cuda", "cuda")  # loads the kernels, or says how to build them
    A, aten, N, C, eps = torch.ops.arcana, torch.ops.aten, cfg.rows, cfg.C, 1e-5
    x = torch.randn(N, C, device="cuda")  # the model's float32 residual stream
    dr = torch.randn(N, C, device="cuda")  # its gradient
    y = torch.randn(N, C, device="cuda", dtype=dtype)  # a branch's output
    dout = torch.randn(N, C, device="cuda", dtype=dtype)  # the LayerNorm output's gradient
    u, du = (torch.randn(N, 4 * C, device="cuda", dtype=dtype) for _ in range(2))
    w, b, fb = (torch.randn(n, device="cuda") for n in (C, C, 4 * C))
    _, mean, rstd = A.layer_norm_fwd(x, w, b, eps, dtype)  # (N,) float32 each
    r, _, mean_r, rstd_r = A.add_layer_norm_fwd(x, y, w, b, eps, dtype)
    fb_cast = fb.to(dtype)  # c_fc's bias, as autocast adds it

    def ln(x):  # PyTorch under autocast: LayerNorm in float32, then the next Linear's cast
        return F.layer_norm(x, (C,), w, b, eps).to(dtype)

    def add_ln(x, y):
        r = x + y
        return r, ln(r)

    def ln_bwd(dout, x, mean, rstd, dr=None):  # and back: dout cast up, the branch's cast down
        dx, dw, db = aten.native_layer_norm_backward(
            dout.float(), x, [C], mean[:, None], rstd[:, None], w, b, [True] * 3
        )
        if dr is None:
            return dx, dw, db
        return dx + dr, dw, db, (dx + dr).to(dtype)

    def gelu(u, bias):
        return F.gelu(u + bias, approximate="tanh")

    def gelu_bwd(du, u, bias):
        dx = aten.gelu_backward(du, u + bias, approximate="tanh")
        return dx, dx.float().sum(0)

    cases = [  # (name, goal, (kernel, its arguments), (PyTorch twin, its arguments))
        ("layer_norm fwd", 0.80, (A.layer_norm_fwd, (x, w, b, eps, dtype)), (ln, (x,))),
        (
            "layer_norm bwd",
            0.65,
            (A.layer_norm_bwd, (dout, x, w, mean, rstd)),
            (ln_bwd, (dout, x, mean, rstd)),
        ),
        (
            "add_layer_norm fwd",
            0.80,
            (A.add_layer_norm_fwd, (x, y, w, b, eps, dtype)),
            (add_ln, (x, y)),
        ),
        (
            "add_layer_norm bwd",
            0.65,
            (A.layer_norm_bwd, (dout, r, w, mean_r, rstd_r, dr, dtype)),
            (ln_bwd, (dout, r, mean_r, rstd_r, dr)),
        ),
        ("gelu fwd", 0.85, (A.gelu_fwd, (u, fb)), (gelu, (u, fb_cast))),
        ("gelu bwd", 0.85, (A.gelu_bwd, (du, u, fb)), (gelu_bwd, (du, u, fb_cast))),
    ]
    ceiling, lines = bandwidth(cases, variants=[1])
    about = (
        f"rows={N} C={C}, as in the model under {dtype} autocast (float32 residual stream and "
        f"weights, {dtype} branch outputs and LayerNorm outputs); {REPS} runs, L2 flushed; "
        f"ceiling: copy {ceiling:.0f} GB/s"
    )
    return about, lines


# -----------------------------------------------------------------------------
# attention: the causal attention kernels (csrc/attention.cu) against
# F.scaled_dot_product_attention's backends

SDPA_BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass
class Attention:
    B: int = 16  # batch
    H: int = 12  # heads
    D: int = 64  # head size
    T: tuple = (1024, 2048)  # sequence lengths


def attention_forward_backward(ops, qkv, n_head, grad):
    ops.attention(qkv.detach().requires_grad_(), n_head).backward(grad)


def time_attention(ops, qkv, n_head, grad):
    """(ms forward, backward, both; MiB of peak memory forward and backward) of one attention."""
    x = qkv.detach().requires_grad_()
    y = ops.attention(x, n_head)  # (B, T, C), kept for the backward-only runs
    both = functools.partial(attention_forward_backward, ops, qkv, n_head, grad)
    times = [
        median_ms(torch.no_grad()(functools.partial(ops.attention, qkv, n_head))),
        median_ms(functools.partial(torch.autograd.grad, y, x, grad, retain_graph=True)),
        median_ms(both),
    ]
    x = y = None  # the backward-only runs' graph, freed before measuring memory
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    both()
    return times, (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_attention(cfg, rt, dtype):
    """Causal attention through the model's ops, the arcana kernels (fast and plain) vs each SDPA
    backend: TFLOP/s forward, backward, both, and peak memory. Goal: arcana forward+backward >= 190
    TFLOP/s at T=1024, D=64."""
    arcana = tg.select_ops("cuda", "cuda")  # the kernels, or a message saying how to build them
    impls = []  # (name, ops, the context it runs in)
    for v in (1, 0):
        impls.append((f"arcana v{v}", arcana, functools.partial(kernel_variant, v)))
    for name, backend in SDPA_BACKENDS.items():
        context = contextlib.nullcontext
        if backend is not None:
            context = functools.partial(sdpa_kernel, backend)
        impls.append((f"sdpa {name}", tg.TorchOps(), context))
    rows, notes = [], []
    for T in cfg.T:
        flops = 4 * cfg.B * cfg.H * T * T * cfg.D / 2  # the causal forward's; backward: 2.5x
        qkv = torch.randn(cfg.B, T, 3 * cfg.H * cfg.D, device="cuda", dtype=dtype)
        grad = torch.randn(cfg.B, T, cfg.H * cfg.D, device="cuda", dtype=dtype)
        for name, ops, context in impls:
            try:
                with context():
                    times, mib = time_attention(ops, qkv, cfg.H, grad)
            except RuntimeError as e:  # a backend without a kernel for these shapes, or no memory
                notes.append(f"T={T} {name}: skipped ({e!r:.160})")
                continue
            tflops = [k * flops / ms / 1e9 for k, ms in zip((1, 2.5, 3.5), times)]
            judged = name == "arcana v1" and T == 1024 and cfg.D == 64
            verdict = goal(">= 190 TF/s f+b", tflops[2] >= 190) if judged else ""
            cells = itertools.chain(*((f"{ms:.3f}", f"{tf:.1f}") for ms, tf in zip(times, tflops)))
            rows.append([T, name, *cells, f"{mib:.0f}", verdict])
    peak = tg.peak_flops(rt, dtype)
    ceiling = f"{peak / 1e12:.0f} TFLOP/s, the datasheet dense bf16 peak" if peak else "none known"
    about = (
        f"B={cfg.B} H={cfg.H} D={cfg.D} {dtype}; median of {REPS} runs (CUDA events, L2 flushed "
        f"before each); ceiling: {ceiling}"
    )
    header = ["T", "impl", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "f+b ms", "f+b TF/s"]
    return about, table(header + ["f+b MiB", "goal"], rows) + notes


# -----------------------------------------------------------------------------
# cross_entropy: the fused softmax/cross-entropy/dlogits kernel (csrc/cross_entropy.cu) on one
# chunk of the loss


@dataclass
class CrossEntropy:
    rows: int = 8192  # rows per call (the chunked loss's chunk_rows)
    vocab: int = 50304  # logits per row (the model's padded vocabulary)


def bench_cross_entropy(cfg, rt, dtype):
    """The fused loss kernel on one chunk of logits (variants 1 fast, 2 re-reading rows from L2
    instead of keeping them in shared memory, 0 plain) vs its PyTorch twin, eager and compiled:
    GB/s, share of the copy bandwidth."""
    tg.select_ops("cuda", "cuda")  # loads the kernels, or says how to build them
    import csrc  # the kernels' package, beside them: there only where they are built

    logits = (2 * torch.randn(cfg.rows, cfg.vocab, device="cuda")).to(dtype)
    targets = torch.randint(0, cfg.vocab, (cfg.rows,), device="cuda")
    targets[::8] = -1  # rows without a target, as padding makes
    # a one-element GPU tensor, as the chunked loss passes it
    grad_scale = 1.0 / (targets != -1).sum().float()
    args = (logits, targets, grad_scale, True)
    kernel = (torch.ops.arcana.cross_entropy_fwd_bwd, args)
    ceiling, lines = bandwidth(
        [("cross_entropy", None, kernel, (csrc.cross_entropy_rows, args))], variants=[1, 2, 0]
    )
    about = (
        f"{cfg.rows} x {cfg.vocab} {dtype} logits; {REPS} runs, L2 flushed; ceiling: copy "
        f"{ceiling:.0f} GB/s"
    )
    return about, lines


# -----------------------------------------------------------------------------
# hellaswag: hellaswag.score's batched scoring, examples/s; text for the suites without data at hand

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can about out up what some time into only other new years could people also first "
    "after water energy history students research"
).split()
ZIPF = [1 / (rank + 1) for rank in range(len(WORDS))]  # generated text draws WORDS with these


def sentence(rng, lo, hi):
    """A capitalized, punctuated sentence of lo to hi words drawn from WORDS."""
    words = rng.choices(WORDS, ZIPF, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + rng.choice("...?!")


def write_synthetic_val(path):
    """10,042 examples shaped like HellaSwag's val split: contexts of 15-110 words, endings of
    3-39."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(10042):
            ctx = sentence(rng, 15, 110)
            endings = [sentence(rng, 3, 39) for _ in range(4)]
            example = {"ind": i, "ctx": ctx, "label": i % 4, "endings": endings}
            f.write(json.dumps(example) + "\n")


@dataclass
class HellaSwag:
    model: str = "d12"  # model preset, randomly initialized: the speed does not need the weights
    limit: Optional[int] = None  # examples to score; None: all of them on CUDA, 8 elsewhere
    batch_size: Optional[int] = None  # examples per forward pass; None: hellaswag.py's default
    compile: bool = False  # torch.compile the model


def bench_hellaswag(cfg, rt, dtype):
    """hellaswag.score's examples/s (median of 3 calls) on the cached val split, or synthetic
    examples whose token counts spread like its, after a call that tokenizes (and compiles). Goal:
    the 10,042 in < 10 s (d12, H100)."""
    ops = tg.select_ops("auto", rt.device_type)  # the kernels where they are built
    model = tg.GPT(tg.model_config(tg.TrainConfig(model=cfg.model)), ops).to(rt.device).eval()
    scored = torch.compile(model) if cfg.compile else model
    limit = cfg.limit
    if limit is None and rt.device_type != "cuda":
        limit = 8
    times = []
    with tempfile.TemporaryDirectory() as tmp, tg.autocast_context(rt.device_type, dtype):
        data = hellaswag.find_data("val")
        path = data or os.path.join(tmp, "synthetic_val.jsonl")
        if data is None:
            write_synthetic_val(path)
        for _ in range(1 + 3):  # score() ends copying the losses to the host: the device is done
            t0 = time.perf_counter()
            s = hellaswag.score(
                scored,
                path=path,
                block_size=model.config.block_size,
                device=rt.device,
                batch_size=cfg.batch_size,
                limit=limit,
            )
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:])
    rate, val_s = s.total / dt, 10042 * dt / s.total
    first = "tokenizing and compiling" if cfg.compile else "tokenizing"
    digits = 1 if rate >= 10 else 3
    line = (
        f"first call {times[0]:.2f} s ({first}); then {dt:.3f} s for {s.total} examples = "
        f"{rate:,.{digits}f} examples/s: the 10,042-example val split would take {val_s:,.1f} s"
    )
    if rt.device_type == "cuda":
        line += f" ({goal('< 10 s', val_s < 10)})"
    about = (
        f"model {cfg.model} on {data or 'synthetic (val-shaped)'}, {dtype}, kernels {ops.name}, "
        f"compile {cfg.compile}, batch_size {cfg.batch_size or 'hellaswag.py default'}"
    )
    return about, [line]


# -----------------------------------------------------------------------------
# tokenize: prepare.py's multi-process pipeline against single-process tiktoken


@dataclass
class Tokenize:
    mb: Optional[float] = None  # MB of text to tokenize; None: 32, or 8 per process when more
    num_proc: Optional[list] = None  # worker process counts to try; None: 1 and all cores but one


def single_process_rate(enc, docs):
    """Tokens/s of encode_ordinary in this process; +1 for each document's <|endoftext|>."""
    t0 = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    return tokens / (time.perf_counter() - t0)


def pipeline_rate(source, out_dir, cache_dir, num_proc):
    """Tokens/s of prepare.py's whole pipeline on the JSON-lines file source, quietly."""
    argv = ["--input", source, "--out_dir", out_dir, "--num_proc", str(num_proc)]
    argv += ["--shard_size", "1000000", "--cache_dir", cache_dir]
    with open(os.devnull, "w") as null:  # no progress bar
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return prepare.prepare(prepare.parse_args(argv))["tokens_per_s"]


def bench_tokenize(cfg, rt, dtype):
    """prepare.py's pipeline (reader, worker processes, shard writer) vs single-process tiktoken
    encode_ordinary on the same documents of generated English-like text. Goal: pipeline >= 0.8 x
    processes x single-process."""
    cores = len(os.sched_getaffinity(0))
    counts = cfg.num_proc or sorted({1, max(1, cores - 1)})
    rng = random.Random(0)
    paragraphs = []  # ~4 MB
    for _ in range(40_000):
        paragraphs.append(sentence(rng, 6, 30) + ("\n\n" if rng.random() < 0.15 else " "))
    text = "".join(paragraphs)
    target = int((cfg.mb or max(32.0, 8.0 * max(counts))) * 1e6)
    text = (text * (target // len(text) + 1))[:target]
    # FineWeb-edu's average document length
    docs = [text[i : i + 4500] for i in range(0, len(text), 4500)]
    sample = docs[:2000]  # 9 MB at most: enough for a steady single-process rate
    load, enc, rows = os.getloadavg()[0], prepare.gpt2_encoding(), []
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "docs.jsonl")
        with open(source, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        for n in counts:
            one = pipeline = 0.0
            # the best of 3; single-process and pipeline runs alternate, to see the same load
            for r in range(3):
                one = max(one, single_process_rate(enc, sample))
                out_dir = os.path.join(tmp, f"out{n}_{r}")
                rate = pipeline_rate(source, out_dir, os.path.join(tmp, "hf_cache"), n)
                pipeline = max(pipeline, rate)
            ratio = pipeline / (n * one)
            verdict = goal(">= 0.8", ratio >= 0.8)
            rows.append(
                [n, f"{one:,.0f}", f"{pipeline:,.0f}", f"{n * one:,.0f}", f"{ratio:.2f}", verdict]
            )
    about = (
        f"{cores} cores, load average {load:.1f} at the start; {len(docs):,} documents, "
        f"{target / 1e6:.1f} MB, shards of 1M tokens; best of 3; ceiling: processes x the "
        f"single-process rate (on 9 MB at most)"
    )
    header = ["procs", "single tok/s", "pipeline tok/s", "procs x single", "ratio", "goal"]
    return about, table(header, rows)


# -----------------------------------------------------------------------------
# quality: the val loss per token of train_gpt.py's --optimizer adamw and muon on the same run

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Quality:
    model: str = "tiny"  # model preset
    text: str = os.path.join(ROOT, "data", "tinyshakespeare.txt")  # a .txt file, tokenized first
    shard_size: int = 32768  # tokens per shard of the text; the first shard is the val split
    tokens: int = 65536  # training tokens per optimizer
    batch_size: int = 16  # micro-batch B
    block_size: int = 128  # sequence length T
    total_batch_size: int = 2048  # tokens per optimizer step
    evals: int = 8  # val-loss evaluations after step 0, evenly spaced
    val_steps: int = 2  # val batches of total_batch_size tokens per evaluation
    max_lr: float = 3e-3  # AdamW's peak learning rate, in both runs
    muon_lr: float = tg.TrainConfig.muon_lr  # Muon's peak learning rate


def bench_quality(cfg, rt, dtype):
    """train_gpt.py on the tokenized text with --optimizer adamw, then muon (same seed, data and
    schedule): the val loss at each evaluation, and the tokens Muon needs to reach AdamW's final
    val loss. Goal: at most 75% of AdamW's tokens."""
    steps = cfg.tokens // cfg.total_batch_size
    if steps < 1:
        raise UserError(f"--tokens {cfg.tokens} is less than one step of --total_batch_size")
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        text_tokens = tokenize_text(cfg, data_dir)
        for optimizer in tg.OPTIMIZERS:
            curves[optimizer] = quality_run(
                cfg, rt, data_dir, optimizer, os.path.join(tmp, optimizer)
            )
    adamw, muon = curves["adamw"], curves["muon"]
    rows = []
    for (tokens, a), (_, m) in zip(adamw, muon):
        rows.append([f"{tokens:,}", f"{a:.4f}", f"{m:.4f}"])
    lines = table(["tokens", "adamw val", "muon val"], rows)
    lines += ["", f"final val loss: adamw {adamw[-1][1]:.4f}, muon {muon[-1][1]:.4f}"]
    lines.append(tokens_to_reach(muon, adamw[-1][1], adamw[-1][0]))
    warmup = prepare.counted(max(1, steps // 10), "warmup step")
    about = (
        f"model {cfg.model}, {tg.dtype_name(dtype)}, {steps} steps of {cfg.total_batch_size:,} "
        f"tokens (B={cfg.batch_size}, T={cfg.block_size}), {warmup}, cosine to a tenth; AdamW lr "
        f"{cfg.max_lr:g}, Muon lr {cfg.muon_lr:g}; {os.path.basename(cfg.text)}: "
        f"{text_tokens:,} tokens, val {cfg.val_steps * cfg.total_batch_size:,} of them; seed "
        f"{tg.TrainConfig.seed} for both"
    )
    return about, lines


def tokenize_text(cfg, data_dir):
    """cfg.text as GPT-2 token shards in data_dir (one document per paragraph), quietly; returns
    its token count."""
    argv = ["--input", cfg.text, "--txt_document", "paragraph", "--out_dir", data_dir]
    argv += ["--shard_size", str(cfg.shard_size), "--num_proc", "1"]
    with open(os.devnull, "w") as null:
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return prepare.prepare(prepare.parse_args(argv))["tokens"]


def quality_run(cfg, rt, data_dir, optimizer, log_dir):
    """[(tokens trained, val loss)] of one train_gpt.py run with this --optimizer."""
    steps = cfg.tokens // cfg.total_batch_size
    settings = dict(
        model=cfg.model,
        device=rt.device,
        data_dir=data_dir,
        log_dir=log_dir,
        optimizer=optimizer,
        batch_size=cfg.batch_size,
        block_size=cfg.block_size,
        total_batch_size=cfg.total_batch_size,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        max_lr=cfg.max_lr,
        min_lr=cfg.max_lr / 10,
        muon_lr=cfg.muon_lr,
        val_every=max(1, steps // cfg.evals),
        val_steps=cfg.val_steps,
        hellaswag_every=0,
        sample_every=0,
        checkpoint_every=0,
    )
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    out = io.StringIO()
    print(f"  training with --optimizer {optimizer} ...", flush=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = tg.main(argv)
    if code != 0:
        last = out.getvalue().strip().splitlines()[-1:]
        raise UserError(f"train_gpt.py --optimizer {optimizer} failed: {''.join(last)}")
    curve = []
    with open(os.path.join(log_dir, "log.txt")) as f:
        for step, stream, value in (line.split() for line in f):
            if stream == "val":
                curve.append((int(step) * cfg.total_batch_size, float(value)))
    return curve


def tokens_to_reach(curve, target, budget):
    """The line judging when curve [(tokens, val loss)] first reaches target: linearly
    interpolated between the evaluations around it, as a share of budget."""
    goal_text = "<= 75% of adamw's tokens"
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            tokens = t1
            if v0 > target:
                tokens = t0 + (t1 - t0) * (v0 - target) / (v0 - v1)
            share = tokens / budget
            return (
                f"muon reaches adamw's final val loss {target:.4f} at {tokens:,.0f} tokens, "
                f"{share:.0%} of adamw's {budget:,} ({goal(goal_text, share <= 0.75)})"
            )
    return (
        f"muon does not reach adamw's final val loss {target:.4f} in {budget:,} tokens "
        f"({goal(goal_text, False)})"
    )


# -----------------------------------------------------------------------------
# memory: the model state each process holds, DDP against --fsdp


@dataclass
class Memory:
    measure: Optional[list] = None  # MODEL:MODE:N runs to measure (mode ddp or fsdp); see below
    one: str = ""  # MODEL:MODE: measure this in the running torchrun group (the suite's own use)


SCRIPT = os.path.abspath(__file__)  # this file, which the measured runs start again
# measured by default where they fit: a 2-core, 24 GB CPU machine; a GPU machine's GPUs
CPU_RUNS = ["tiny:ddp:1", "tiny:ddp:2", "tiny:fsdp:2", "d12:ddp:1", "d12:fsdp:2", "d12:fsdp:4"]


def model_bytes(mc):
    """(parameters, the root unit's, one block's) of a GPT of this shape (see train_gpt.GPT)."""
    C, L = mc.n_embd, mc.n_layer
    block = 12 * C * C + 13 * C  # c_attn, attn c_proj, c_fc, mlp c_proj with biases, 2 LayerNorms
    root = mc.vocab_size * C + mc.block_size * C + 2 * C  # wte (= lm_head), wpe, ln_f
    return root + L * block, root, block


def computed_rows():
    """Per process: float32 weights, gradients and AdamW's two moments (16 bytes a weight), all
    of them with DDP, 1/N of them with --fsdp; plus what --fsdp gathers at once (bf16 on a GPU:
    the root unit and two blocks, the next one prefetched) and the whole float32 gradient it holds
    while a step accumulates micro-batches."""
    rows = []
    for name in ("d12", "d24", "d36", "d48"):
        params, root, block = model_bytes(tg.model_config(tg.TrainConfig(model=name)))
        state = [16 * params] + [16 * params / n for n in (2, 4, 8)]
        gathered = 2 * (root + 2 * block)
        cells = [tg.format_bytes(b) for b in state]
        rows.append([name, f"{params / 1e6:.1f}M", *cells, tg.format_bytes(gathered)])
        rows[-1].append(tg.format_bytes(4 * params))
    return rows


def measure_one(spec, rt, dtype):
    """In a torchrun group: one optimizer step of MODEL (a tiny batch) under MODE, then the bytes
    this process holds of weights, gradients and optimizer state, and on a GPU the peak
    allocated; the first process prints them as one JSON line."""
    name, mode = spec.split(":")
    mc = tg.model_config(tg.TrainConfig(model=name, block_size=64))
    torch.manual_seed(0)
    model = tg.GPT(mc).to(rt.device)
    wrapper = model
    if mode == "fsdp":
        tg.shard_model(model, rt, dtype, compile_model=False)
    else:
        wrapper, _ = tg.wrap_model(model, rt, compile_model=False)
    optimizer = model.configure_optimizer(0.1, 6e-4, rt.device_type)
    idx = torch.randint(0, prepare.GPT2_VOCAB_SIZE, (1, 65), device=rt.device)
    with tg.autocast_context(rt.device_type, dtype):
        _, loss = wrapper(idx[:, :-1], idx[:, 1:])
    loss.backward()
    optimizer.step()
    local = tg.local_part
    sizes = {
        "weights": sum(local(p).nbytes for p in model.parameters()),
        "gradients": sum(local(p.grad).nbytes for p in model.parameters()),
        "optimizer": sum(
            local(t).nbytes for s in optimizer.state.values() for t in s.values() if t.dim()
        ),
    }
    if rt.device_type == "cuda":
        sizes["peak"] = torch.cuda.max_memory_allocated(rt.device)
    if rt.master:
        print(json.dumps(sizes))
    tg.end_distributed()


def measured_rows(runs):
    """Each MODEL:MODE:N of runs measured in its own torchrun group: rows of the table."""
    rows = []
    for run in runs:
        name, mode, n = run.split(":")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={n}", SCRIPT, "memory", "--one"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd + [f"{name}:{mode}"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            failed = f"failed: {one_line(done.stderr)[-100:]}"
            rows.append([name, mode, n, failed, "", "", "", ""])
            continue
        printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
        sizes = json.loads(printed[-1])
        cells = [tg.format_bytes(sizes[k]) for k in ("weights", "gradients", "optimizer")]
        state = sizes["weights"] + sizes["gradients"] + sizes["optimizer"]
        params, _, _ = model_bytes(tg.model_config(tg.TrainConfig(model=name, block_size=64)))
        expected = 16 * params / (int(n) if mode == "fsdp" else 1)
        peak = tg.format_bytes(sizes["peak"]) if "peak" in sizes else "-"
        rows.append([name, mode, n, *cells, f"{state / expected:.3f}", peak])
    return rows


def bench_memory(cfg, rt, dtype):
    """The model state per process (weights, gradients, AdamW state) for d12-d48 with DDP and
    with --fsdp at 1, 2, 4 and 8 processes, computed from the model; and measured (torchrun, one
    optimizer step) where it fits: on the CPU with gloo, on a GPU also the peak allocated. Goal:
    the state falls as 1/N with --fsdp, so that d48 trains on 8 x 24 GB."""
    if cfg.one:
        measure_one(cfg.one, rt, dtype)
        return None
    runs = cfg.measure or CPU_RUNS
    if rt.device_type == "cuda" and not cfg.measure:
        counts = sorted({1, torch.cuda.device_count()})
        runs = [f"d12:{mode}:{n}" for mode in ("ddp", "fsdp") for n in counts]
    header = ["model", "params", "DDP", "fsdp N=2", "N=4", "N=8", "gathered", "accumulating"]
    lines = ["computed per process:"] + table(header, computed_rows())
    params, root, block = model_bytes(tg.model_config(tg.TrainConfig(model="d48")))
    need = 16 * params / 8 + 2 * (root + 2 * block) + 4 * params
    verdict = goal("d48 on 8 x 24 GB", need < 24 * 2**30)
    lines.append(
        f"d48 with --fsdp on 8 processes: {tg.format_bytes(need)} of model state, gathered weights "
        f"and accumulated gradients per process ({verdict}), the rest for activations"
    )
    measured = measured_rows(runs)
    header = ["model", "mode", "N", "weights", "gradients", "optimizer", "of 16P/N", "peak"]
    lines += ["", "measured per process (one optimizer step, T=64):"] + table(header, measured)
    about = (
        "float32 weights, gradients and AdamW state; --fsdp gathers bfloat16 weights on a GPU; "
        "activations excluded"
    )
    return about, lines


# -----------------------------------------------------------------------------
# entry point

SUITES = {  # name -> (function, config dataclass, device: cuda, cpu or auto, argparse settings)
    "train": (
        bench_train,
        Train,
        "auto",
        dict(
            model=dict(choices=sorted(tg.MODEL_PRESETS)),
            configs=dict(nargs="+", type=str, choices=CONFIGS),
        ),
    ),
    "kernels": (bench_kernels, Kernels, "cuda", {}),
    "attention": (
        bench_attention,
        Attention,
        "cuda",
        dict(D=dict(choices=[64, 128]), T=dict(nargs="+", type=int)),
    ),
    "cross_entropy": (bench_cross_entropy, CrossEntropy, "cuda", {}),
    "hellaswag": (
        bench_hellaswag,
        HellaSwag,
        "auto",
        dict(model=dict(choices=sorted(tg.MODEL_PRESETS))),
    ),
    "tokenize": (bench_tokenize, Tokenize, "cpu", dict(num_proc=dict(nargs="+", type=int))),
    "memory": (bench_memory, Memory, "auto", dict(measure=dict(nargs="+", type=str))),
    "quality": (bench_quality, Quality, "auto", dict(model=dict(choices=sorted(tg.MODEL_PRESETS)))),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    name, rest = "all", argv
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
    if name != "all" and name not in SUITES:
        print(
            f"error: unknown suite {name!r}; choose from: {', '.join(SUITES)} (or all)",
            file=sys.stderr,
        )
        return 2
    status = 0
    for suite in SUITES if name == "all" else [name]:
        try:
            run(suite, rest)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            status = USER_ERROR_EXIT
    return status


if __name__ == "__main__":
    sys.exit(main())
