"""
ArcanaGPT benchmarks: each suite measures one thing and prints a table, with the goal and met/missed beside the
number it judges; --record appends the run to bench/RESULTS.md. `python bench.py SUITE --help` lists its flags.

    python bench.py [all] [--record]  # every suite in turn (the GPU suites skip without a GPU)
    python bench.py train             # whole optimizer steps: tokens/s, MFU, peak memory per kernels/compile choice
    python bench.py kernels           # LayerNorm / GELU kernels vs PyTorch eager and torch.compile, GB/s (GPU)
    python bench.py attention         # causal attention vs F.scaled_dot_product_attention's backends (GPU)
    python bench.py cross_entropy     # the fused cross-entropy kernel vs PyTorch eager and torch.compile (GPU)
    python bench.py hellaswag         # hellaswag.py: examples/s scoring the val split
    python bench.py tokenize          # prepare.py: tokens/s with N processes vs one process
    bench/gpu_check.sh OUTDIR         # on a GPU machine: build the kernels, run the GPU tests, record every suite
"""

import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import random
import statistics
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
from prepare import UserError

REPS, WARMUP = (
    20,
    3,
)  # timed runs of each measurement on a GPU (the median counts), after untimed ones

# -----------------------------------------------------------------------------
# what every suite shares (SUITES at the end): flags from its config dataclass, device, dtype, tables, the record


def run(name, argv):
    """One suite: flags, device, dtype, header; its setup and table, printed and, with --record, recorded."""
    fn, cls, device, flags = SUITES[name]
    parser = prepare.config_parser(cls, fn.__doc__, **flags)
    parser.prog = f"bench.py {name}"
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = vars(parser.parse_args(argv))
    record, cfg = args.pop("record"), cls(**args)
    for key, value in args.items():  # sizes, counts and repetitions; argparse checks the choices
        if "choices" not in flags.get(key, {}) and any(
            type(v) in (int, float) and v <= 0
            for v in (value if isinstance(value, list) else [value])
        ):
            raise UserError(f"--{key} {value} must be positive")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU; skipped")
        return
    rt = tg.setup_runtime(device)
    dtype = tg.resolve_dtype(
        "auto", rt.device_type
    )  # bfloat16 on CUDA (autocast in train and hellaswag)
    where, commit = tg.device_name(rt), (tg.git_commit() or "unknown")[:12]
    versions = (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}"
    )
    print(f"{name} on {where} ({rt.device}), {datetime.date.today()}, commit {commit}; {versions}")
    about, lines = fn(cfg, rt, dtype)
    print(about, "", *lines, sep="\n")
    if record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "RESULTS.md")
        entry = (
            f"\n## {name}: {where}, {datetime.date.today()}, commit {commit}\n\n`python bench.py "
            f"{' '.join([name, *argv])}`; {versions}; {about}\n\n```\n"
            + "\n".join(lines)
            + "\n```\n"
        )
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        prepare.atomic_write(
            path, lambda f: f.write((old + entry).encode())
        )  # a failure is one line
        print(f"recorded in {path}")


def table(header, rows):
    """Lines of a table: the first column left-aligned, the others right-aligned, each as wide as its widest cell."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in cells
    ]


def goal(target, ok):
    return f"goal {target}: {'met' if ok else 'missed'}"


# -----------------------------------------------------------------------------
# GPU timing: CUDA-event medians with the L2 cache flushed, the copy-bandwidth ceiling, kernel variants


def median_ms(fn):
    """Median ms of fn() over REPS runs after WARMUP, each after zeroing 4x the L2 cache, as training reads HBM."""
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
    """The arcana ops run variant v inside the block (0 plain, 1 fast, 2 cross-entropy re-reading rows from L2)."""
    torch.ops.arcana._set_variant(v)
    try:
        yield
    finally:
        torch.ops.arcana._set_variant(1)


def bandwidth(cases, variants):
    """(copy GB/s, table) of cases (name, goal as a share of copy or None, (arcana op, args), (torch fn, args)):
    GB/s of the bytes the op reads and writes, for each arcana variant and torch eager and compiled."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceiling = 2 * src.nbytes / median_ms(lambda: dst.copy_(src)) / 1e6
    rows = []
    for name, target, (op, args), (fn, inputs) in cases:
        out = op(*args)
        nbytes = sum(
            t.nbytes
            for t in [*args, *(out if isinstance(out, tuple) else [out])]
            if torch.is_tensor(t)
        )
        times = {}
        for v in variants:
            with kernel_variant(v):
                times[f"arcana v{v}"] = median_ms(lambda: op(*args))
        times["eager"] = median_ms(lambda: fn(*inputs))
        compiled = torch.compile(fn)
        try:
            times["compile"] = median_ms(lambda: compiled(*inputs))
        except Exception as e:
            print(f"{name}: torch.compile failed ({e!r:.160})")
        for impl, ms in times.items():
            gbs = nbytes / ms / 1e6
            met = (
                goal(f">= {target:.0%} of copy", gbs >= target * ceiling)
                if target and impl == "arcana v1"
                else ""
            )
            rows.append(
                [
                    name,
                    impl,
                    f"{ms * 1e3:.1f}",
                    f"{gbs:.0f}",
                    f"{gbs / ceiling:.0%}",
                    f"{times['eager'] / ms:.2f}x",
                    f"{times['compile'] / ms:.2f}x" if "compile" in times else "-",
                    met,
                ]
            )
    return ceiling, table(
        ["op", "implementation", "us", "GB/s", "of copy", "vs eager", "vs compile", "goal"], rows
    )


# -----------------------------------------------------------------------------
# train: whole optimizer steps of train_gpt.py per kernels/compile configuration, on random tokens

CONFIGS = ["torch", "torch+compile", "cuda", "cuda+compile"]


@dataclass
class Train:
    model: str = "d12"  # model preset
    block_size: Optional[int] = None  # sequence length T; None: the preset's
    batch_size: Optional[int] = (
        None  # micro-batch B; None: the largest of 64, 32, ..., 1 that fits (4 off a GPU)
    )
    configs: Optional[list] = (
        None  # kernels[+compile] configurations; None: all four on CUDA, torch ones elsewhere
    )
    steps: int = (
        10  # timed optimizer steps per configuration, after 3 untimed ones; the median counts
    )


def bench_train(cfg, rt, dtype):
    """Whole optimizer steps on random tokens per configuration, at the largest micro-batch that fits: tokens/s,
    MFU, peak memory. Goals (d12): fastest cuda >= 1.1x fastest torch, MFU >= 45%, less memory at the same B."""
    mc = tg.model_config(tg.TrainConfig(model=cfg.model, block_size=cfg.block_size))
    sizes = (
        [cfg.batch_size]
        if cfg.batch_size
        else [64, 32, 16, 8, 4, 2, 1]
        if rt.device_type == "cuda"
        else [4]
    )
    results, notes = {}, []  # config -> (B, tokens/s, MFU, peak bytes, loss)
    for name in cfg.configs or (CONFIGS if rt.device_type == "cuda" else CONFIGS[:2]):
        ops = tg.select_ops(
            name.split("+")[0], rt.device_type
        )  # a UserError for cuda off a GPU or unbuilt
        for B in sizes:
            try:
                results[name] = (
                    B,
                    *time_steps(mc, ops, name.endswith("+compile"), B, cfg.steps, rt, dtype),
                )
                print(f"  {name} at B={B}: {results[name][1]:,.0f} tokens/s", flush=True)
            except (
                Exception
            ) as e:  # torch.compile can wrap an out-of-memory error in its own exception types
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                    continue
                notes.append(f"{name}: failed at B={B} ({e!r:.160})")
            break
        else:
            notes.append(f"{name}: no micro-batch of {sizes} fits in memory")
    rows = [
        [
            name,
            B,
            f"{tok_s:,.0f}",
            f"{mfu:.1%}" if mfu else "-",
            f"{mem / 2**30:.2f} GiB" if mem else "-",
            f"{loss:.4f}",
        ]
        for name, (B, tok_s, mfu, mem, loss) in results.items()
    ]
    lines = table(["config", "B", "tokens/s", "MFU", "peak mem", "loss"], rows) + notes
    runs = {k: {n: r for n, r in results.items() if n.startswith(k)} for k in ("torch", "cuda")}
    if runs["torch"] and runs["cuda"]:
        best_torch, best_cuda = (
            max(runs[k], key=lambda n: runs[k][n][1]) for k in ("torch", "cuda")
        )
        speedup, mfu = (
            runs["cuda"][best_cuda][1] / runs["torch"][best_torch][1],
            runs["cuda"][best_cuda][2],
        )
        lines += [
            "",
            f"{best_cuda} {speedup:.2f}x the tokens/s of {best_torch} ({goal('>= 1.10x', speedup >= 1.1)})",
        ]
        lines += [f"{best_cuda} MFU {mfu:.1%} ({goal('>= 45%', mfu >= 0.45)})"] if mfu else []
        for name, (B, _, _, memory, _) in runs["cuda"].items():
            twin = "torch" + name.removeprefix("cuda")
            if (
                twin in runs["torch"]
            ):  # each ran at the largest B that fits it: a twin at a smaller B did not fit B
                twin_B, _, _, twin_memory, _ = runs["torch"][twin]
                less = memory < twin_memory if B == twin_B else B > twin_B
                lines.append(
                    f"{name} at B={B} {memory / 2**30:.2f} GiB, {twin} at B={twin_B} "
                    f"{twin_memory / 2**30:.2f} GiB ({goal('less memory at the same B', less)})"
                )
    peak = tg.peak_flops(rt, dtype)
    return (
        f"{dtype}, model {cfg.model} (T={mc.block_size}), median of {cfg.steps} steps after 3; ceiling: "
        + (
            f"{peak / 1e12:.0f} TFLOP/s, the datasheet bf16 dense peak"
            if peak
            else "none known (no MFU)"
        )
    ), lines


def time_steps(mc, ops, compiled, B, steps, rt, dtype):
    """(tokens/s of the median step, MFU or None, peak bytes or None, loss) of whole optimizer steps."""
    T = mc.block_size
    torch._dynamo.reset()  # a fresh compilation per configuration and micro-batch: no recompile limit
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
    windows = [
        torch.randint(0, prepare.GPT2_VOCAB_SIZE, (B, T + 1), device=rt.device) for _ in range(4)
    ]
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
    tok_s, peak = B * T / statistics.median(times[3:]), tg.peak_flops(rt, dtype)
    memory = torch.cuda.max_memory_allocated(rt.device) if rt.device_type == "cuda" else None
    return tok_s, tg.flops_per_token(raw, T) * tok_s / peak if peak else None, memory, loss.item()


# -----------------------------------------------------------------------------
# kernels: the LayerNorm and GELU kernels (csrc/layernorm.cu, csrc/gelu.cu) vs PyTorch eager and torch.compile


@dataclass
class Kernels:
    rows: int = 65536  # rows B*T (GPT-2 124M's 64 x 1024)
    C: int = 768  # LayerNorm width n_embd; GELU runs on the 4C-wide MLP activation


def bench_kernels(cfg, rt, dtype):
    """LayerNorm, fused residual LayerNorm and GELU, forward and backward, vs PyTorch eager and torch.compile:
    GB/s and share of the copy bandwidth. Goals: LayerNorm >= 80% of copy forward, >= 65% backward; GELU >= 85%."""
    tg.select_ops("cuda", "cuda")  # loads the kernels, or says how to build them
    A, aten, N, C, eps = torch.ops.arcana, torch.ops.aten, cfg.rows, cfg.C, 1e-5
    x, dr = (
        torch.randn(N, C, device="cuda") for _ in range(2)
    )  # the model's float32 residual stream, its gradient
    y, dout = (
        torch.randn(N, C, device="cuda", dtype=dtype) for _ in range(2)
    )  # a branch's output; out's gradient
    u, du = (torch.randn(N, 4 * C, device="cuda", dtype=dtype) for _ in range(2))
    w, b, fb = (torch.randn(n, device="cuda") for n in (C, C, 4 * C))
    _, mean, rstd = A.layer_norm_fwd(x, w, b, eps, dtype)  # (N,) float32 each
    r, _, mean_r, rstd_r = A.add_layer_norm_fwd(x, y, w, b, eps, dtype)

    def ln(x):  # PyTorch under autocast: LayerNorm in float32, then the next Linear's cast
        return F.layer_norm(x, (C,), w, b, eps).to(dtype)

    def add_ln(x, y):
        r = x + y
        return r, ln(r)

    def ln_bwd(
        dout, x, mean, rstd, dr=None
    ):  # and back: dout cast up, the branch's gradient cast down
        dx, dw, db = aten.native_layer_norm_backward(
            dout.float(), x, [C], mean[:, None], rstd[:, None], w, b, [True] * 3
        )
        return (dx, dw, db) if dr is None else (dx + dr, dw, db, (dx + dr).to(dtype))

    def gelu(u, bias):
        return F.gelu(u + bias, approximate="tanh")

    def gelu_bwd(du, u, bias):
        dx = aten.gelu_backward(du, u + bias, approximate="tanh")
        return dx, dx.float().sum(0)

    ceiling, lines = bandwidth(
        [
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
            (
                "gelu fwd",
                0.85,
                (A.gelu_fwd, (u, fb)),
                (gelu, (u, fb.to(dtype))),
            ),  # c_fc's bias, as autocast adds it
            ("gelu bwd", 0.85, (A.gelu_bwd, (du, u, fb)), (gelu_bwd, (du, u, fb.to(dtype)))),
        ],
        variants=[1],
    )
    return (
        f"rows={N} C={C}, as in the model under {dtype} autocast (float32 residual stream and weights, {dtype} "
        f"branch outputs and LayerNorm outputs); {REPS} runs, L2 flushed; ceiling: copy {ceiling:.0f} GB/s"
    ), lines


# -----------------------------------------------------------------------------
# attention: the causal attention kernels (csrc/attention.cu) against F.scaled_dot_product_attention's backends

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


def bench_attention(cfg, rt, dtype):
    """Causal attention through the model's ops, the arcana kernels (fast and plain) vs each SDPA backend: TFLOP/s
    forward, backward, both, and peak memory. Goal: arcana forward+backward >= 190 TFLOP/s at T=1024, D=64."""
    arcana = tg.select_ops("cuda", "cuda")  # the kernels, or a message saying how to build them
    impls = [(f"arcana v{v}", arcana, lambda v=v: kernel_variant(v)) for v in (1, 0)]
    impls += [
        (
            f"sdpa {b}",
            tg.TorchOps(),
            lambda b=b: (
                sdpa_kernel(SDPA_BACKENDS[b]) if SDPA_BACKENDS[b] else contextlib.nullcontext()
            ),
        )
        for b in SDPA_BACKENDS
    ]
    rows, notes = [], []
    for T in cfg.T:
        flops = (
            4 * cfg.B * cfg.H * T * T * cfg.D / 2
        )  # the causal forward's; the backward's is 2.5 times that
        qkv = torch.randn(cfg.B, T, 3 * cfg.H * cfg.D, device="cuda", dtype=dtype)
        grad = torch.randn(cfg.B, T, cfg.H * cfg.D, device="cuda", dtype=dtype)
        for name, ops, context in impls:

            def forward_backward():
                ops.attention(qkv.detach().requires_grad_(), cfg.H).backward(grad)

            try:
                with context():
                    x = qkv.detach().requires_grad_()
                    y = ops.attention(x, cfg.H)  # (B, T, C), kept for the backward-only runs
                    times = [
                        median_ms(torch.no_grad()(lambda: ops.attention(qkv, cfg.H))),
                        median_ms(lambda: torch.autograd.grad(y, x, grad, retain_graph=True)),
                        median_ms(forward_backward),
                    ]  # forward, backward, both
                    x = y = None  # the backward-only runs' graph, freed before measuring memory
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    forward_backward()
                    mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            except (
                RuntimeError
            ) as e:  # a backend without a kernel for these shapes, or out of memory
                notes.append(f"T={T} {name}: skipped ({e!r:.160})")
                continue
            tflops = [k * flops / ms / 1e9 for k, ms in zip((1, 2.5, 3.5), times)]
            judged = name == "arcana v1" and T == 1024 and cfg.D == 64
            rows.append(
                [
                    T,
                    name,
                    *itertools.chain(
                        *((f"{ms:.3f}", f"{tf:.1f}") for ms, tf in zip(times, tflops))
                    ),
                    f"{mib:.0f}",
                    goal(">= 190 TF/s f+b", tflops[2] >= 190) if judged else "",
                ]
            )
    peak = tg.peak_flops(rt, dtype)
    return (
        f"B={cfg.B} H={cfg.H} D={cfg.D} {dtype}; median of {REPS} runs (CUDA events, L2 flushed before each); "
        f"ceiling: "
        + (f"{peak / 1e12:.0f} TFLOP/s, the datasheet dense bf16 peak" if peak else "none known"),
        table(
            [
                "T",
                "impl",
                "fwd ms",
                "fwd TF/s",
                "bwd ms",
                "bwd TF/s",
                "f+b ms",
                "f+b TF/s",
                "f+b MiB",
                "goal",
            ],
            rows,
        )
        + notes,
    )


# -----------------------------------------------------------------------------
# cross_entropy: the fused softmax/cross-entropy/dlogits kernel (csrc/cross_entropy.cu) on one chunk of the loss


@dataclass
class CrossEntropy:
    rows: int = 8192  # rows per call (the chunked loss's chunk_rows)
    vocab: int = 50304  # logits per row (the model's padded vocabulary)


def bench_cross_entropy(cfg, rt, dtype):
    """The fused loss kernel on one chunk of logits (variants 1 fast, 2 re-reading rows from L2 instead of keeping
    them in shared memory, 0 plain) vs its PyTorch twin, eager and compiled: GB/s, share of the copy bandwidth."""
    tg.select_ops("cuda", "cuda")  # loads the kernels, or says how to build them
    import csrc  # the kernels' package, beside them: there only where they are built

    logits = (2 * torch.randn(cfg.rows, cfg.vocab, device="cuda")).to(dtype)
    targets = torch.randint(0, cfg.vocab, (cfg.rows,), device="cuda")
    targets[::8] = -1  # rows without a target, as padding makes
    grad_scale = (
        1.0 / (targets != -1).sum().float()
    )  # a one-element GPU tensor, as the chunked loss passes it
    args = (logits, targets, grad_scale, True)
    ceiling, lines = bandwidth(
        [
            (
                "cross_entropy",
                None,
                (torch.ops.arcana.cross_entropy_fwd_bwd, args),
                (csrc.cross_entropy_rows, args),
            )
        ],
        variants=[1, 2, 0],
    )
    return (
        f"{cfg.rows} x {cfg.vocab} {dtype} logits; {REPS} runs, L2 flushed; ceiling: copy {ceiling:.0f} GB/s",
        lines,
    )


# -----------------------------------------------------------------------------
# hellaswag: hellaswag.score's batched scoring, examples/s; text for the suites without data at hand

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can about out up what some "
    "time into only other new years could people also first after water energy history students research"
).split()
ZIPF = [
    1 / (rank + 1) for rank in range(len(WORDS))
]  # generated text draws WORDS with these weights


def sentence(rng, lo, hi):
    return " ".join(rng.choices(WORDS, ZIPF, k=rng.randint(lo, hi))).capitalize() + rng.choice(
        "...?!"
    )


@dataclass
class HellaSwag:
    model: str = (
        "d12"  # model preset, randomly initialized: the speed does not depend on the weights
    )
    limit: Optional[int] = None  # examples to score; None: all of them on CUDA, 8 elsewhere
    batch_size: Optional[int] = (
        None  # examples per forward pass; None: hellaswag.py's for the device
    )
    compile: bool = False  # torch.compile the model


def bench_hellaswag(cfg, rt, dtype):
    """hellaswag.score's examples/s (median of 3 calls) on the cached val split, or synthetic examples whose token
    counts spread like its, after a call that tokenizes (and compiles). Goal: the 10,042 in < 10 s (d12, H100)."""
    ops = tg.select_ops("auto", rt.device_type)  # the kernels where they are built
    model = tg.GPT(tg.model_config(tg.TrainConfig(model=cfg.model)), ops).to(rt.device).eval()
    scored = torch.compile(model) if cfg.compile else model
    times = []
    with tempfile.TemporaryDirectory() as tmp, tg.autocast_context(rt.device_type, dtype):
        data = hellaswag.find_data("val")
        path = data or os.path.join(tmp, "synthetic_val.jsonl")
        if data is None:
            rng = random.Random(0)
            with open(
                path, "w"
            ) as f:  # contexts of 15-110 words, endings of 3-39, as in the val split
                f.writelines(
                    json.dumps(
                        {
                            "ind": i,
                            "ctx": sentence(rng, 15, 110),
                            "label": i % 4,
                            "endings": [sentence(rng, 3, 39) for _ in range(4)],
                        }
                    )
                    + "\n"
                    for i in range(10042)
                )
        for _ in range(1 + 3):  # score() ends copying the losses to the host: the device is done
            t0 = time.perf_counter()
            s = hellaswag.score(
                scored,
                path=path,
                block_size=model.config.block_size,
                device=rt.device,
                batch_size=cfg.batch_size,
                limit=cfg.limit or (None if rt.device_type == "cuda" else 8),
            )
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:])
    rate, val_s = s.total / dt, 10042 * dt / s.total
    lines = [
        f"first call {times[0]:.2f} s (tokenizing{' and compiling' if cfg.compile else ''}); then {dt:.3f} s "
        f"for {s.total} examples = {rate:,.{1 if rate >= 10 else 3}f} examples/s: the 10,042-example val split "
        f"would take {val_s:,.1f} s"
        + (f" ({goal('< 10 s', val_s < 10)})" if rt.device_type == "cuda" else "")
    ]
    return (
        f"model {cfg.model} on {data or 'synthetic (val-shaped)'}, {dtype}, kernels {ops.name}, compile "
        f"{cfg.compile}, batch_size {cfg.batch_size or 'hellaswag.py default'}"
    ), lines


# -----------------------------------------------------------------------------
# tokenize: prepare.py's multi-process pipeline against single-process tiktoken


@dataclass
class Tokenize:
    mb: Optional[float] = (
        None  # MB of text to tokenize; None: 32, or 8 per process when that is more
    )
    num_proc: Optional[list] = (
        None  # worker process counts to measure; None: 1 and all cores but one
    )


def bench_tokenize(cfg, rt, dtype):
    """prepare.py's pipeline (reader, worker processes, shard writer) vs single-process tiktoken encode_ordinary on
    the same documents of generated English-like text. Goal: pipeline >= 0.8 x processes x single-process."""
    cores = len(os.sched_getaffinity(0))
    counts = cfg.num_proc or sorted({1, max(1, cores - 1)})
    rng = random.Random(0)
    text = "".join(
        sentence(rng, 6, 30) + ("\n\n" if rng.random() < 0.15 else " ") for _ in range(40_000)
    )  # ~4 MB
    target = int((cfg.mb or max(32.0, 8.0 * max(counts))) * 1e6)
    text = (text * (target // len(text) + 1))[:target]
    docs = [
        text[i : i + 4500] for i in range(0, len(text), 4500)
    ]  # FineWeb-edu's average document length
    sample = docs[:2000]  # 9 MB at most: enough for a steady single-process rate
    load, enc, rows = os.getloadavg()[0], prepare.gpt2_encoding(), []

    def single():  # tokens/s of one process on the sample; +1 for the <|endoftext|> before each document
        t0 = time.perf_counter()
        return sum(len(enc.encode_ordinary(d)) + 1 for d in sample) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        source = os.path.join(tmp, "docs.jsonl")
        with open(source, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        for n in counts:
            one = pipeline = 0.0
            for r in range(
                3
            ):  # the best of 3; single-process and pipeline runs alternate, to see the same load
                one = max(one, single())
                pcfg = prepare.parse_args(
                    [
                        "--input",
                        source,
                        "--out_dir",
                        os.path.join(tmp, f"out{n}_{r}"),
                        "--num_proc",
                        str(n),
                        "--shard_size",
                        "1000000",
                        "--cache_dir",
                        os.path.join(tmp, "hf_cache"),
                    ]
                )
                with (
                    contextlib.redirect_stdout(null),
                    contextlib.redirect_stderr(null),
                ):  # no progress bar
                    pipeline = max(pipeline, prepare.prepare(pcfg)["tokens_per_s"])
            ratio = pipeline / (n * one)
            rows.append(
                [
                    n,
                    f"{one:,.0f}",
                    f"{pipeline:,.0f}",
                    f"{n * one:,.0f}",
                    f"{ratio:.2f}",
                    goal(">= 0.8", ratio >= 0.8),
                ]
            )
    return (
        f"{cores} cores, load average {load:.1f} at the start; {len(docs):,} documents, {target / 1e6:.1f} MB, "
        f"shards of 1M tokens; best of 3; ceiling: processes x the single-process rate (on 9 MB at most)"
    ), table(["procs", "single tok/s", "pipeline tok/s", "procs x single", "ratio", "goal"], rows)


# -----------------------------------------------------------------------------
# entry point

SUITES = {  # name -> (function, config dataclass, device: cuda, cpu or auto, argparse settings per field)
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
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("all", argv)
    if name != "all" and name not in SUITES:
        print(
            f"error: unknown suite {name!r}; choose from: {', '.join(SUITES)} (or all)",
            file=sys.stderr,
        )
        return 2
    status = 0
    for n in SUITES if name == "all" else [name]:
        try:
            run(n, rest)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
