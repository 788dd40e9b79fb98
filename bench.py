"""
ArcanaGPT benchmarks: scripts that measure, with their output recorded in bench/RESULTS.md.

    python bench.py                 # every suite that applies to this machine
    python bench.py tokenize ...    # prepare.py: tokens/s with N processes vs one process
    python bench.py kernels ...     # LayerNorm / GELU kernels vs PyTorch eager and torch.compile (GPU)
    python bench.py attention ...   # causal attention vs F.scaled_dot_product_attention backends (GPU)
    python bench.py cross_entropy   # the fused cross-entropy kernel vs PyTorch eager and torch.compile (GPU)
    python bench.py train ...       # whole training steps: tokens/s, MFU, peak memory per configuration
    python bench.py hellaswag ...   # hellaswag.py: examples/s scoring the val split (10,042 in < 10 s on an H100)

Each suite parses its own flags: `python bench.py SUITE --help`.
"""

import sys

SUITES = {}  # name -> (function taking argv, one-line description)


def suite(name, description):
    def register(fn):
        SUITES[name] = (fn, description)
        return fn
    return register


# -----------------------------------------------------------------------------
# tokenize: prepare.py's multi-process pipeline against single-process tiktoken

def _words_text(n_chars, seed=0):
    """English-like filler text (Zipf-distributed words, sentences, paragraphs) for when no --input is given."""
    import random

    rng = random.Random(seed)
    vocab = ("the of and to a in is that for it as was with be by on not he this are or his from at which but "
             "have an they you were her she there been one all we their has would when if so no will more can "
             "about out up what some time into only other new years could people also first after water cells "
             "energy history students learning research children health system important different example "
             "because through however between development environment information understanding").split()
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    parts, size = [], 0
    while size < n_chars:
        words = rng.choices(vocab, weights, k=rng.randint(6, 30))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])
        if rng.random() < 0.15:
            sentence += "\n\n"
        else:
            sentence += " "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _split_documents(text, doc_chars):
    """Cut text into documents of about doc_chars characters, at spaces."""
    docs, i = [], 0
    while i < len(text):
        j = text.find(" ", i + doc_chars)
        j = len(text) if j < 0 else j
        docs.append(text[i:j].strip())
        i = j
    return [d for d in docs if d]


@suite("tokenize", "prepare.py: tokens/s with N processes vs one process")
def bench_tokenize(argv):
    import argparse
    import contextlib
    import io
    import math
    import os
    import platform
    import resource
    import tempfile
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    import prepare

    parser = argparse.ArgumentParser(
        prog="bench.py tokenize",
        description="Tokenization throughput: prepare.py's pipeline (reader, worker processes, shard writer) "
                    "against single-process tiktoken encode_ordinary on the same documents. The goal is "
                    "pipeline >= 0.8 x processes x single-process rate, with the writer never the bottleneck.")
    parser.add_argument("--input", help="a text file to cut into documents (default: generated English-like text)")
    parser.add_argument("--doc_chars", type=int, default=4500,
                        help="document length in characters (FineWeb-edu averages about 4.5K, ~1K tokens)")
    parser.add_argument("--mb", type=float, default=None,
                        help="MB of text to tokenize, the input repeated as needed (default: 32, or 8 per "
                             "process when more, so that every worker gets several of prepare.py's ~2 MB tasks)")
    parser.add_argument("--num_proc", type=int, nargs="+", default=None,
                        help="worker process counts to measure (default: 1 and prepare.py's default, all cores "
                             "but one)")
    parser.add_argument("--shard_size", type=prepare._count, default=1_000_000,
                        help="tokens per shard, small enough that the writer writes several")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measure each configuration this many times and keep the best (shared machines)")
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)

    text = open(args.input, encoding="utf-8").read() if args.input else _words_text(4_000_000)
    docs = _split_documents(text, args.doc_chars)
    counts = args.num_proc or sorted({1, prepare._default_num_proc()})
    target = int((args.mb or max(32.0, 8.0 * max(counts))) * 1e6)
    docs = (docs * (target // max(1, sum(map(len, docs))) + 1))
    total, keep = 0, 0
    while keep < len(docs) and total < target:
        total += len(docs[keep])
        keep += 1
    docs = docs[:keep]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    enc = prepare.gpt2_encoding()

    def single_rate():
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)  # +1: the <|endoftext|> before each
        return n, n / (time.perf_counter() - t0), time.process_time() - c0

    def cpu_seconds(who):
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    n_tokens, _, single_cpu = single_rate()
    setup = (f"{cores} cores usable ({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the start; "
             f"text: {args.input or 'generated'}, {len(docs):,} documents of ~{args.doc_chars} characters, "
             f"{total / 1e6:.1f} MB, {n_tokens:,} tokens ({total / n_tokens:.2f} chars/token); shard_size "
             f"{args.shard_size:,}; best of {args.repeat}, single-process and pipeline runs alternating")
    print(setup)
    # Wall-clock rates depend on what else the machine runs; CPU seconds much less. "worker cpu" is tiktoken's
    # CPU time for these tokens in one process over the workers' CPU time for them (1.00: no overhead);
    # "main cpu" is the main process's CPU time while tokenizing (reading, handing out tasks, collecting
    # results, writing shards; all its threads) over the workers': it keeps up with about 1 / that workers.
    # "writer busy" and "main waits" are shares of the pipeline's wall time; the main process mostly waiting
    # for tokens means the workers set the pace, not the reader or the writer.
    header = ["procs", "single tok/s", "pipeline tok/s", "procs x single", "ratio", "worker cpu", "main cpu",
              "writer busy", "main waits"]
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "docs.parquet")
        pq.write_table(pa.table({"text": docs}), source)
        for n in counts:
            single, best, worker_cpu, main_cpu = 0.0, None, math.inf, math.inf
            for r in range(args.repeat):
                _, rate, cpu = single_rate()
                single, single_cpu = max(single, rate), min(single_cpu, cpu)
                out = os.path.join(tmp, f"out{n}_{r}")
                cfg = prepare.parse_args(["--input", source, "--out_dir", out, "--num_proc", str(n), "--shard_size",
                                          str(args.shard_size), "--cache_dir", os.path.join(tmp, "hf_cache")])
                children = cpu_seconds(resource.RUSAGE_CHILDREN)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    s = prepare.prepare(cfg)  # its progress bar and summary would break up the table
                # the pool's workers have exited and been reaped, so their CPU time is in RUSAGE_CHILDREN
                worker_cpu = min(worker_cpu, cpu_seconds(resource.RUSAGE_CHILDREN) - children)
                main_cpu = min(main_cpu, s["main_cpu_seconds"])
                if best is None or s["tokens_per_s"] > best["tokens_per_s"]:
                    best = s
            s, ideal = best, n * single
            ratio, waits, writer = s["tokens_per_s"] / ideal, s["wait_seconds"] / s["seconds"], \
                s["write_seconds"] / s["seconds"]
            rows.append([n, f"{single:,.0f}", f"{s['tokens_per_s']:,.0f}", f"{ideal:,.0f}", f"{ratio:.2f}",
                         f"{single_cpu / worker_cpu:.2f}", f"{main_cpu / worker_cpu:.0%}", f"{writer:.0%}",
                         f"{waits:.0%}"])
            verdicts.append(f"{n} procs: ratio {ratio:.2f} >= 0.8: {'yes' if ratio >= 0.8 else 'NO'}; writer not the "
                            f"bottleneck (main waits for workers > 50%): {'yes' if waits > 0.5 else 'NO'}")
    lines = print_table(header, rows) + print_goals(verdicts)
    if args.record:
        record("tokenize", f"{platform.processor() or platform.machine()}, {cores} cores", argv,
               f"tiktoken {_version('tiktoken')}, python {platform.python_version()}; {setup}. Ceiling: processes "
               f"x single-process tiktoken encode_ordinary on the same documents.", lines)
    return 0


# -----------------------------------------------------------------------------
# train: whole optimizer steps of train_gpt.py, per kernels/compile configuration, on synthetic tokens

class _RandomTokens:
    """Stands in for ShardLoader: random token windows already on the device, so data loading is not timed."""

    def __init__(self, B, T, device, seed=0):
        import torch
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.batches = [torch.randint(0, 50257, (B, T + 1), generator=gen).to(device) for _ in range(4)]
        self.i = 0

    def next_batch(self):
        buf = self.batches[self.i % len(self.batches)]
        self.i += 1
        return buf[:, :-1], buf[:, 1:]


def _time_training(tg, cfg, kernels, compile_model, B, steps, warmup, rt, dtype):
    """(tokens/s, MFU or None, peak bytes or None, last loss) for `steps` timed optimizer steps of micro-batch B."""
    import time

    import torch
    mc = tg.model_config(cfg)
    T = mc.block_size
    ops = tg.select_ops(kernels, rt.device_type)
    if kernels == "cuda" and ops.name != "cuda":
        raise RuntimeError("the arcana_kernels extension is not built")
    if compile_model:
        torch._dynamo.reset()  # a fresh compilation per configuration and micro-batch, no recompile limit
    torch.manual_seed(0)
    raw_model = tg.GPT(mc, ops).to(rt.device)
    model = torch.compile(raw_model) if compile_model else raw_model
    optimizer = raw_model.configure_optimizer(0.1, 6e-4, rt.device_type)
    amp = tg.autocast_context(rt.device_type, dtype)
    loader = _RandomTokens(B, T, rt.device)
    grad_accum = max(1, cfg.total_batch_size // (B * T))
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    times = []
    for step in range(warmup + steps):
        tg.synchronize(rt.device_type)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = tg.forward_backward(model, None, loader, grad_accum, rt.device, amp)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
        optimizer.step()
        tg.synchronize(rt.device_type)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    dt = times[len(times) // 2]  # median step
    tokens = grad_accum * B * T
    peak = tg.peak_flops(rt, dtype)
    mfu = tg.flops_per_token(raw_model, T) * tokens / dt / peak if peak else None
    memory = torch.cuda.max_memory_allocated(rt.device) if rt.device_type == "cuda" else None
    return tokens / dt, mfu, memory, loss.item()


@suite("train", "whole training steps: tokens/s, MFU, peak memory per kernels/compile configuration")
def bench_train(argv):
    """Whole optimizer steps (forward, backward, clipping, AdamW) on random tokens for each kernels/compile
    configuration, all in this run on this device: tokens/s (median step), MFU (train_gpt.py's 6N + attention
    FLOPs per token over the device's bf16 dense peak) and peak memory, at the largest micro-batch that fits
    each. Checks the goals of a d12 run at T=1024: the fastest cuda configuration >= 1.1x the fastest torch one,
    MFU >= 45%, and each cuda configuration's peak memory below the torch one's with the same compile flag at
    the same micro-batch (met outright where torch does not fit that micro-batch)."""
    import argparse
    import datetime

    import torch
    import train_gpt as tg
    parser = argparse.ArgumentParser(prog="bench.py train", description=bench_train.__doc__)
    parser.add_argument("--model", default="d12", choices=sorted(tg.MODEL_PRESETS))
    parser.add_argument("--block_size", type=int, default=None, help="T (default: the preset's)")
    parser.add_argument("--batch_size", default="auto",
                        help="micro-batch B, or 'auto': the largest of 64, 32, 16, 8, 4, 2, 1 that fits (GPU)")
    parser.add_argument("--total_batch_size", type=int, default=0,
                        help="tokens per optimizer step (default: one micro-batch, no accumulation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--configs", default="torch,torch+compile,cuda,cuda+compile",
                        help="comma-separated kernels[+compile] configurations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)

    rt = tg.setup_runtime(args.device)
    dtype = tg.resolve_dtype(args.dtype, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    cfg = tg.TrainConfig(model=args.model, block_size=args.block_size)
    T = tg.model_config(cfg).block_size
    candidates = [int(args.batch_size)] if args.batch_size != "auto" else \
        ([64, 32, 16, 8, 4, 2, 1] if rt.device_type == "cuda" else [4])
    peak = tg.peak_flops(rt, dtype)
    device = tg.device_name(rt)
    setup = (f"{str(dtype).replace('torch.', '')}, model {args.model}, T={T}, median of {args.steps} steps after "
             f"{args.warmup} warmup steps, " + (f"MFU against {peak / 1e12:.0f} TFLOP/s" if peak else "no MFU "
                                                 "(peak unknown for this device and dtype)"))
    print(f"device {device} ({rt.device}), {datetime.date.today().isoformat()}, commit {_commit()}, "
          f"{torch_versions()}")
    print(setup)
    header = ["config", "B", "tokens/s", "MFU", "peak mem", "loss"]
    lines = [f"{header[0]:<16} {header[1]:>3} {header[2]:>12} {header[3]:>7} {header[4]:>10} {header[5]:>8}"]
    print(lines[0])
    results, too_big = {}, {}  # name -> (B, tokens/s, MFU, bytes); name -> smallest B that did not fit
    for name in args.configs.split(","):
        kernels, _, flag = name.partition("+")
        if kernels == "cuda" and rt.device_type != "cuda":
            print(f"{name:<16} skipped: needs a CUDA device")
            continue
        for B in candidates:
            cfg.total_batch_size = args.total_batch_size or B * T
            try:
                tok_s, mfu, memory, loss = _time_training(tg, cfg, kernels, flag == "compile", B, args.steps,
                                                          args.warmup, rt, dtype)
            except Exception as e:  # torch.compile can wrap an OOM in its own exception types
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                    too_big[name] = B
                    continue
                if not isinstance(e, (RuntimeError, tg.UserError)):
                    raise
                print(f"{name:<16} failed: {str(e).splitlines()[0]}")
                break
            results[name] = (B, tok_s, mfu, memory)
            mfu_s = f"{100 * mfu:.1f}%" if mfu else "-"
            mem_s = f"{memory / 2**30:.2f} GiB" if memory else "-"
            line = f"{name:<16} {B:>3} {tok_s:>12,.0f} {mfu_s:>7} {mem_s:>10} {loss:>8.4f}"
            lines.append(line)
            print(line, flush=True)
            break
        else:
            print(f"{name:<16} no micro-batch in {candidates} fits in memory")

    verdicts = _train_goals(results, too_big, lambda cfg_name, B: _peak_memory_at(tg, cfg, cfg_name, B, T, rt,
                                                                                  dtype, args.warmup))
    lines += print_goals(verdicts)
    if args.record:
        record("train", device, argv, f"{torch_versions()}; {setup}; random tokens, AdamW (fused), grad clipping, "
               f"one optimizer step per micro-batch unless --total_batch_size", lines)
    return 0


def _peak_memory_at(tg, cfg, name, B, T, rt, dtype, warmup):
    """Peak bytes of configuration `name` at micro-batch B (a short run), or None where it does not fit."""
    import torch
    kernels, _, flag = name.partition("+")
    cfg.total_batch_size = B * T
    try:
        return _time_training(tg, cfg, kernels, flag == "compile", B, 2, max(1, warmup), rt, dtype)[2]
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return None
        raise


def _train_goals(results, too_big, memory_at):
    """The issue's three goals as lines of text, from {name: (B, tokens/s, MFU, bytes)}; memory_at(name, B)
    measures a torch configuration's peak at a cuda configuration's micro-batch when it ran at another."""
    torch_runs = {n: r for n, r in results.items() if n.startswith("torch")}
    cuda_runs = {n: r for n, r in results.items() if n.startswith("cuda")}
    if not torch_runs or not cuda_runs:
        return []
    best_torch = max(torch_runs, key=lambda n: torch_runs[n][1])
    best_cuda = max(cuda_runs, key=lambda n: cuda_runs[n][1])
    speedup = cuda_runs[best_cuda][1] / torch_runs[best_torch][1]
    verdicts = [f"{best_cuda} {speedup:.2f}x the tokens/s of {best_torch} (>= 1.10x): {'yes' if speedup >= 1.1 else 'NO'}"]
    mfu = cuda_runs[best_cuda][2]
    verdicts.append(f"{best_cuda} MFU {100 * mfu:.1f}% (>= 45%): {'yes' if mfu >= 0.45 else 'NO'}" if mfu else
                    f"{best_cuda} MFU: unknown peak for this device")
    for name, (B, _, _, memory) in cuda_runs.items():
        twin = "torch" + name[len("cuda"):]
        if twin in torch_runs and torch_runs[twin][0] == B:
            ref = torch_runs[twin][3]
        elif twin in too_big and too_big[twin] <= B:
            verdicts.append(f"{name} peak memory at B={B}: {twin} does not fit B={too_big[twin]}: yes")
            continue
        else:
            ref = memory_at(twin, B)
            if ref is None:
                verdicts.append(f"{name} peak memory at B={B}: {twin} does not fit it: yes")
                continue
        if memory is None or ref is None:
            continue
        verdicts.append(f"{name} peak memory {memory / 2**30:.2f} GiB < {twin} {ref / 2**30:.2f} GiB at B={B}: "
                        f"{'yes' if memory < ref else 'NO'}")
    return verdicts


# -----------------------------------------------------------------------------
# hellaswag: hellaswag.py's batched scoring, examples/s

def _synthetic_hellaswag(path, n, seed=0):
    """n examples in the official format whose token counts spread like the val split's (contexts of about
    15-110 tokens, endings of 4-40): a stand-in for throughput where the real file is not at hand."""
    import json
    import random

    rng = random.Random(seed)
    words = ("the a man woman person is are then they he she it and with on in to of his her into while "
             "takes puts holds shows walks runs talks looks turns picks water ball floor table camera room "
             "hand hands paper board slowly again around down up over next front back").split()

    def phrase(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + "."

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"ind": i, "activity_label": "synthetic", "ctx": phrase(15, 110),
                                "endings": [phrase(3, 39) for _ in range(4)], "label": i % 4,
                                "split": "val", "source_id": f"synthetic~{i}"}) + "\n")


@suite("hellaswag", "hellaswag.py: examples/s scoring HellaSwag (a random d12 GPT unless a model is given)")
def bench_hellaswag(argv):
    import argparse
    import os
    import tempfile
    import time

    import torch

    import hellaswag
    import train_gpt as tg
    parser = argparse.ArgumentParser(
        prog="bench.py hellaswag",
        description="HellaSwag scoring throughput of hellaswag.score: examples/s after a warm-up call (which "
                    "tokenizes the file and, with --compile, compiles the model). Goal on one H100: the "
                    "10,042-example val split in under 10 s with the 124M model.")
    parser.add_argument("--checkpoint", help="a train_gpt.py checkpoint (default: a randomly initialized d12)")
    parser.add_argument("--model_dir", help="a local Hugging Face GPT-2 directory")
    parser.add_argument("--file", help="a HellaSwag jsonl (default: the cached val split if present, else "
                                       "synthetic data of the same shape)")
    parser.add_argument("--limit", type=int, default=None,
                        help="examples to score (default: all of the file on CUDA, 8 elsewhere)")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward pass "
                                                                     "(default: hellaswag.py's for the device)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the warm-up; the median counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kernels", default="auto", choices=["auto", "cuda", "torch"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)

    rt = tg.setup_runtime(args.device)
    dtype = tg.resolve_dtype(args.dtype, rt.device_type)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    ops = tg.select_ops(args.kernels, rt.device_type)
    if args.checkpoint:
        model, name = tg.model_from_checkpoint(args.checkpoint, rt.device, ops)[0], args.checkpoint
    elif args.model_dir:
        model, name = tg.GPT.from_pretrained(args.model_dir, ops=ops).to(rt.device), args.model_dir
    else:
        torch.manual_seed(0)
        model, name = tg.GPT(tg.GPTConfig(), ops).to(rt.device), "random d12 (124M)"
    model.eval()
    scored = torch.compile(model) if args.compile else model
    limit = args.limit or (None if rt.device_type == "cuda" else 8)
    batch_size = args.batch_size or hellaswag.default_batch_size(rt.device)
    amp = tg.autocast_context(rt.device_type, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or hellaswag.find_data("val")
        data = path or "synthetic (val-shaped)"
        if path is None:
            path = os.path.join(tmp, "synthetic_val.jsonl")
            _synthetic_hellaswag(path, 10042)
        t0 = time.perf_counter()
        with amp:
            s = hellaswag.score(scored, rt.device, path=path, batch_size=batch_size, limit=limit)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with amp:  # score() ends by copying the losses to the host: the clock stops after the device
                s = hellaswag.score(scored, rt.device, path=path, batch_size=batch_size, limit=limit)
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2] if times else first
    rate = s.total / dt
    about = (f"{str(dtype).replace('torch.', '')}, kernels {ops.name}, compile {args.compile}, torch "
             f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"device {tg.device_name(rt)} ({rt.device}), {about}")
    rate_s = f"{rate:,.1f}" if rate >= 10 else f"{rate:.3f}"
    val_s = 10042 / rate
    lines = [f"model {name}; data {data}: {s.total} examples, rows padded to {s.length} tokens, "
             f"batch {batch_size} examples = {4 * batch_size} rows",
             f"first call {first:.2f} s (tokenizing{' and compiling' if args.compile else ''}); then {dt:.3f} s = "
             f"{rate_s} examples/s: the 10,042-example val split would take {val_s:,.1f} s"]
    for line in lines:
        print(line)
    if rt.device_type == "cuda":
        lines += print_goals([f"10,042 val examples in under 10 s (124M, one H100): {val_s:.1f} s, "
                              f"{'met' if val_s < 10 else 'not met'}"])
    if args.record:
        record("hellaswag", tg.device_name(rt), argv, about, lines)
    return 0


# -----------------------------------------------------------------------------
# attention: the causal attention kernels (csrc/attention.cu) against F.scaled_dot_product_attention's backends

ATTENTION_GOAL_TFLOPS = 190  # forward+backward on an H100, causal, D = 64, T = 1024 (FlashAttention-2's figure)


def _attention_peak_mib(fn):
    """MiB allocated at fn()'s peak above what was allocated before it."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@suite("attention", "causal attention: arcana kernels vs F.scaled_dot_product_attention backends, TFLOP/s, memory")
def bench_attention(argv):
    """TFLOP/s of forward, backward and forward+backward, and peak memory of forward+backward, for the arcana
    kernels (both variants) and each SDPA backend, through the model's interface: CudaOps.attention and
    TorchOps.attention on c_attn's (B, T, 3C) output, autograd included. Causal FLOPs: forward
    4 B H T^2 D / 2, backward 2.5 x forward."""
    import argparse
    import contextlib

    import torch
    import train_gpt as tg
    parser = argparse.ArgumentParser(prog="bench.py attention", description=bench_attention.__doc__)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=64, choices=[64, 128])
    parser.add_argument("--T", default="1024,2048", help="comma-separated sequence lengths")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--variants", default="1,0", help="arcana kernel variants to time (1 fast, 0 plain)")
    parser.add_argument("--backends", default="default,flash,efficient,cudnn,math",
                        help="SDPA backends: default (PyTorch's choice), flash, efficient, cudnn, math")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)
    unavailable = gpu_unavailable("attention", tg, kernels=False)  # without the kernels: the SDPA rows
    if unavailable is not None:
        return unavailable
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    impls = []  # (name, ops object, context manager factory)
    if tg.load_kernels():
        for v in (int(v) for v in args.variants.split(",") if v):
            ops = tg.CudaOps()
            ops.attention = lambda qkv, n_head, v=v: torch.ops.arcana.attention_fwd(
                qkv.view(*qkv.shape[:2], 3, n_head, -1), v)[0].flatten(2)
            impls.append((f"arcana v{v}", ops, contextlib.nullcontext))
    else:
        print(f"arcana_kernels is not built ({tg.KERNELS['error']}): SDPA rows only")
    for name in (b for b in args.backends.split(",") if b):
        impls.append((f"sdpa {name}", tg.TorchOps(),
                      contextlib.nullcontext if name == "default" else (lambda b=backends[name]: sdpa_kernel(b))))

    dtype = getattr(torch, args.dtype)
    B, H, D = args.B, args.H, args.D
    device = torch.cuda.get_device_name()
    peak = next((flops for key, flops in tg.PEAK_BF16_FLOPS if key in device), None)
    flush = gpu_flush_buffer()
    setup = (f"B={B} H={H} D={D} {args.dtype}, causal, through CudaOps/TorchOps.attention with autograd; median of "
             f"{args.reps} runs (CUDA events, L2 flushed before each); causal FLOPs: forward 4*B*H*T^2*D/2, "
             f"backward 2.5x")
    ceiling = (f"ceiling: {peak / 1e12:.0f} TFLOP/s, the datasheet dense bf16/fp16 tensor-core peak of this device"
               if peak else "ceiling: no datasheet peak known for this device")
    print(f"device {device}, {torch_versions()}; {setup}\n{ceiling}")
    rows, best = [], {}
    for T in (int(t) for t in args.T.split(",") if t):
        flops_fwd = 4 * B * H * T * T * D / 2
        gen = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=dtype, generator=gen)
        grad = torch.randn(B, T, H * D, device="cuda", dtype=dtype, generator=gen)
        for name, ops, context in impls:
            try:
                with context():
                    x = qkv.detach().requires_grad_()
                    y = ops.attention(x, H)

                    def fwd():
                        with torch.no_grad():
                            ops.attention(qkv, H)

                    def bwd():
                        torch.autograd.grad(y, x, grad, retain_graph=True)

                    def fwd_bwd():
                        xx = qkv.detach().requires_grad_()
                        ops.attention(xx, H).backward(grad)

                    times = [gpu_median_ms(fn, flush, args.reps, args.warmup) for fn in (fwd, bwd, fwd_bwd)]
                    del y, x
                    memory = _attention_peak_mib(fwd_bwd)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                torch.cuda.empty_cache()
                print(f"T={T} {name}: skipped, {str(e).splitlines()[0][:120]}")
                continue
            tflops = [flops_fwd * k / (ms * 1e-3) / 1e12 for k, ms in zip((1, 2.5, 3.5), times)]
            rows.append([T, name] + [f"{v:.3f}" if i % 2 == 0 else f"{v:.1f}"
                                     for i, v in enumerate(x for pair in zip(times, tflops) for x in pair)] +
                        [f"{memory:.0f}"])
            best.setdefault(T, []).append((tflops[2], name))
    print()
    lines = print_table(["T", "implementation", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "f+b ms", "f+b TF/s",
                         "f+b peak MiB"], rows)
    verdicts = []
    for T, results in best.items():
        ours = dict((n, tf) for tf, n in results).get("arcana v1")
        sdpa = max(((tf, n) for tf, n in results if n.startswith("sdpa")), default=None)
        if ours is None:
            continue
        check = f"T={T}: arcana v1 forward+backward {ours:.1f} TFLOP/s"
        if T == 1024 and D == 64:
            check += f"; >= {ATTENTION_GOAL_TFLOPS} (H100 goal): {'yes' if ours >= ATTENTION_GOAL_TFLOPS else 'NO'}"
        if sdpa:
            check += f"; >= fastest SDPA ({sdpa[1]}, {sdpa[0]:.1f}): {'yes' if ours >= sdpa[0] else 'NO'}"
        verdicts.append(check)
    lines += print_goals(verdicts)
    if args.record:
        record("attention", device, argv, f"{torch_versions()}; {setup}. {ceiling}", lines)
    return 0


# -----------------------------------------------------------------------------
# helpers of every suite: tables, goals and the record in bench/RESULTS.md

def print_table(header, rows):
    """Rows of strings (or numbers) under header, each column as wide as its widest cell; returns the lines."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    for line in lines:
        print(line)
    return lines


def print_goals(verdicts, title="goals"):
    """The goal checks under a title, after a blank line; returns the lines (none without checks)."""
    lines = ["", f"{title}:"] + ["  " + v for v in verdicts] if verdicts else []
    for line in lines:
        print(line)
    return lines


def _commit():
    """The commit being measured, as the records name it."""
    import train_gpt
    return (train_gpt.git_commit() or "unknown")[:12]


def record(suite, machine, argv, about, lines):
    """Append this run to bench/RESULTS.md, in the format described there: a heading with the suite, the
    machine, the date and the commit; the command line and `about` (versions, setup, ceiling); then the lines
    the suite printed (its table and goals), as a code block."""
    import datetime
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "RESULTS.md")
    with open(path, "a") as f:
        f.write(f"\n## {suite}: {machine}, {datetime.date.today().isoformat()}, commit {_commit()}\n\n"
                f"`python bench.py {suite} {' '.join(argv)}`; {about}\n\n```\n" + "\n".join(lines) + "\n```\n")
    print(f"recorded in {path}")


# -----------------------------------------------------------------------------
# GPU helpers: the checks before a GPU suite, CUDA-event medians with the L2 cache flushed, the copy-bandwidth
# ceiling

def gpu_unavailable(suite, tg, kernels=True):
    """None where the suite can run; else, after saying why not, its exit code: 0 without a GPU (nothing to
    measure here), 1 when it needs the arcana_kernels extension and that is not built."""
    import torch
    if not torch.cuda.is_available():
        print(f"{suite}: needs a CUDA GPU; skipped")
        return 0
    if kernels and not tg.load_kernels():
        print(f"{suite}: the arcana_kernels extension is not built ({tg.KERNELS['error']}); run "
              f"`python setup.py build_ext --inplace` first")
        return 1
    return None


def torch_versions():
    """The versions every GPU record names."""
    import torch
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}"


def gpu_flush_buffer():
    """A byte buffer four times the device's L2 cache (256 MiB at least): zeroing it before a timed run
    evicts that run's inputs from L2, so they are read from device memory as in training."""
    import torch
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return torch.empty(max(4 * l2, 256 * 2**20), dtype=torch.uint8, device="cuda")


def gpu_median_ms(fn, flush, reps=20, warmup=3):
    """Median milliseconds of fn() over reps runs, each timed alone with CUDA events after the flush."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def gpu_copy_bandwidth(flush, nbytes=2**30, reps=20):
    """GB/s of a device-to-device copy of nbytes (bytes read + bytes written over the time): the ceiling that
    a memory-bound kernel's achieved GB/s is measured against."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_median_ms(lambda: dst.copy_(src), flush, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gpu_compiled_ms(fn, inputs, flush, reps, warmup, what):
    """Median milliseconds of torch.compile(fn)(*inputs), or None where compiling fails: an Inductor failure
    costs the row, not the run."""
    import torch
    compiled = torch.compile(fn)
    try:
        return gpu_median_ms(lambda: compiled(*inputs), flush, reps, warmup)
    except Exception as e:
        print(f"{what}: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def bandwidth_cells(nbytes, ms, ceiling, times):
    """GB/s of nbytes in ms, its share of the copy-bandwidth ceiling, and the speedups over times['eager'] and
    times['compile'] (where there is one), as table cells."""
    gbs = nbytes / (ms * 1e-3) / 1e9
    return [f"{gbs:.0f}", f"{100 * gbs / ceiling:.0f}%", f"{times['eager'] / ms:.2f}x",
            f"{times['compile'] / ms:.2f}x" if "compile" in times else "-"]


# -----------------------------------------------------------------------------
# kernels: the LayerNorm and GELU kernels (csrc/layernorm.cu, csrc/gelu.cu) vs PyTorch eager and torch.compile

KERNEL_GOALS = {  # kernel -> least fraction of the copy bandwidth (issue goals on an H100)
    "layer_norm fwd": 0.80, "layer_norm bwd": 0.65, "add_layer_norm fwd": 0.80, "add_layer_norm bwd": 0.65,
    "gelu fwd": 0.85, "gelu bwd": 0.85, "gelu+bias fwd": 0.85, "gelu+bias bwd": 0.85,
}


def _kernel_cases(torch, N, C, dtype, eps=1e-5):
    """(name, bytes moved at least, {implementation: fn}) for each kernel, on fresh random inputs. The byte count
    is what any implementation must read and write once (16-bit tensors, fp32 weights, mean/rstd), so every
    row's GB/s is effective bandwidth on the same work. The torch.compile rows compile the same math as the
    kernel (for the backward, the gradient formulas) so Inductor generates its fused kernels for it."""
    import torch.nn.functional as F
    A = torch.ops.arcana
    s = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(N, C, device="cuda", dtype=dtype)
    y = torch.randn(N, C, device="cuda", dtype=dtype)
    dy = torch.randn(N, C, device="cuda", dtype=dtype)
    w = 1 + 0.1 * torch.randn(C, device="cuda")
    b = 0.1 * torch.randn(C, device="cuda")
    u = torch.randn(N, 4 * C, device="cuda", dtype=dtype)
    du = torch.randn(N, 4 * C, device="cuda", dtype=dtype)
    fb = 0.1 * torch.randn(4 * C, device="cuda")
    try:  # PyTorch's CUDA LayerNorm with 16-bit x and float32 weights, where this version has it
        torch.ops.aten.native_layer_norm(x[:1], [C], w, b, eps)
        w_eager, b_eager = w, b
    except RuntimeError:
        w_eager, b_eager = w.to(dtype), b.to(dtype)
    _, mean, rstd = A.layer_norm_fwd(x, w, b, eps)
    r, _, mean_r, rstd_r = A.add_layer_norm_fwd(x, y, w, b, eps)
    _, mean_e, rstd_e = torch.ops.aten.native_layer_norm(x, [C], w_eager, b_eager, eps)  # (N, 1) each
    _, mean_re, rstd_re = torch.ops.aten.native_layer_norm(r, [C], w_eager, b_eager, eps)

    def ln_bwd_math(dy, x, w, mean, rstd):
        xhat = (x.float() - mean[:, None]) * rstd[:, None]
        g = dy.float() * w
        dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (dy.float() * xhat).sum(0), dy.float().sum(0)

    def add_ln_fwd_math(x, y, w, b):
        r = x + y
        return r, F.layer_norm(r, (C,), w, b, eps)

    def add_ln_bwd_math(dy, r, w, mean, rstd, dr):
        dx, dw, db = ln_bwd_math(dy, r, w, mean, rstd)
        return dx + dr, dw, db

    def gelu_bwd_bias_math(du, u, fb):
        dx = torch.ops.aten.gelu_backward(du, u + fb, approximate="tanh")
        return dx, dx.float().sum(0)

    ln = lambda x, w, b: F.layer_norm(x, (C,), w, b, eps)
    gelu = lambda u: F.gelu(u, approximate="tanh")
    gelu_b = lambda u, fb: F.gelu(u + fb, approximate="tanh")
    gelu_bwd = lambda du, u: torch.ops.aten.gelu_backward(du, u, approximate="tanh")
    rows = N * C * s
    return [
        ("layer_norm fwd", 2 * rows + 8 * N + 8 * C, {
            "arcana": lambda v: A.layer_norm_fwd(x, w, b, eps, v),
            "eager": lambda: torch.ops.aten.native_layer_norm(x, [C], w_eager, b_eager, eps),
            "compile": (ln, (x, w, b))}),
        ("layer_norm bwd", 3 * rows + 8 * N + 12 * C, {
            "arcana": lambda v: A.layer_norm_bwd(dy, x, w, mean, rstd, None, v),
            "eager": lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [C], mean_e, rstd_e, w_eager, b_eager,
                                                                       [True, True, True]),
            "compile": (ln_bwd_math, (dy, x, w, mean, rstd))}),
        ("add_layer_norm fwd", 4 * rows + 8 * N + 8 * C, {
            "arcana": lambda v: A.add_layer_norm_fwd(x, y, w, b, eps, v),
            "eager": lambda: torch.ops.aten.native_layer_norm(x + y, [C], w_eager, b_eager, eps),
            "compile": (add_ln_fwd_math, (x, y, w, b))}),
        ("add_layer_norm bwd", 4 * rows + 8 * N + 12 * C, {
            "arcana": lambda v: A.layer_norm_bwd(dy, r, w, mean_r, rstd_r, y, v),
            "eager": lambda: torch.ops.aten.native_layer_norm_backward(dy, r, [C], mean_re, rstd_re, w_eager, b_eager,
                                                                       [True, True, True])[0].add_(y),
            "compile": (add_ln_bwd_math, (dy, r, w, mean_r, rstd_r, y))}),
        ("gelu fwd", 2 * 4 * rows, {
            "arcana": lambda v: A.gelu_fwd(u, None, v),
            "eager": lambda: gelu(u),
            "compile": (gelu, (u,))}),
        ("gelu bwd", 3 * 4 * rows, {
            "arcana": lambda v: A.gelu_bwd(du, u, None, v),
            "eager": lambda: gelu_bwd(du, u),
            "compile": (gelu_bwd, (du, u))}),
        ("gelu+bias fwd", 2 * 4 * rows + 16 * C, {
            "arcana": lambda v: A.gelu_fwd(u, fb, v),
            "eager": lambda: gelu_b(u, fb),
            "compile": (gelu_b, (u, fb))}),
        ("gelu+bias bwd", 3 * 4 * rows + 32 * C, {
            "arcana": lambda v: A.gelu_bwd(du, u, fb, v),
            "eager": lambda: gelu_bwd_bias_math(du, u, fb),
            "compile": (gelu_bwd_bias_math, (du, u, fb))}),
    ]


@suite("kernels", "LayerNorm / GELU kernels vs PyTorch eager and torch.compile: time, GB/s, share of copy bandwidth")
def bench_kernels(argv):
    """Median time (CUDA events, L2 flushed before each run) and achieved GB/s of each LayerNorm and GELU kernel
    at GPT-2 124M shapes (B*T = 65536 rows, C = 768, GELU on the 4C = 3072-wide MLP activation, bf16), and of
    PyTorch eager and torch.compile's generated kernels for the same work; the ceiling is the device's measured
    copy bandwidth. Checks the goals: LayerNorm forward >= 80% of copy bandwidth and backward >= 65%, GELU
    forward and backward >= 85%, each >= 1.2x eager and no slower than torch.compile."""
    import argparse

    import torch
    import train_gpt as tg
    parser = argparse.ArgumentParser(prog="bench.py kernels", description=bench_kernels.__doc__)
    parser.add_argument("--rows", type=int, default=65536, help="rows B*T")
    parser.add_argument("--C", type=int, default=768, help="LayerNorm width n_embd (GELU runs on 4C)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", default="1", help="arcana variants to time: 1 fast, 0 plain (e.g. 1,0)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)
    unavailable = gpu_unavailable("kernels", tg)
    if unavailable is not None:
        return unavailable

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    flush = gpu_flush_buffer()
    ceiling = gpu_copy_bandwidth(flush, reps=args.reps)
    device = torch.cuda.get_device_name()
    setup = (f"rows={args.rows} C={args.C} {args.dtype} (GELU {args.rows}x{4 * args.C}), weights float32; median "
             f"of {args.reps} runs, L2 flushed before each; copy bandwidth {ceiling:.0f} GB/s")
    print(f"device {device}, {torch_versions()}")
    print(setup)
    variants = [int(v) for v in args.variants.split(",") if v]
    rows, verdicts = [], []
    for name, nbytes, impls in _kernel_cases(torch, args.rows, args.C, dtype):
        times = {}
        for v in variants:
            times[f"arcana v{v}"] = gpu_median_ms(lambda: impls["arcana"](v), flush, args.reps, args.warmup)
        times["eager"] = gpu_median_ms(impls["eager"], flush, args.reps, args.warmup)
        if args.compile:
            ms = gpu_compiled_ms(*impls["compile"], flush, args.reps, args.warmup, name)
            if ms is not None:
                times["compile"] = ms
        for impl, ms in times.items():
            rows.append([name, impl, f"{ms * 1e3:.1f}"] + bandwidth_cells(nbytes, ms, ceiling, times))
        if "arcana v1" in times:
            ms = times["arcana v1"]
            share = nbytes / (ms * 1e-3) / 1e9 / ceiling
            checks = [f"{100 * share:.0f}% of copy >= {100 * KERNEL_GOALS[name]:.0f}%: "
                      f"{'yes' if share >= KERNEL_GOALS[name] else 'NO'}",
                      f"{times['eager'] / ms:.2f}x eager >= 1.2x: {'yes' if times['eager'] / ms >= 1.2 else 'NO'}"]
            if "compile" in times:
                checks.append(f"{times['compile'] / ms:.2f}x compile >= 1x: "
                              f"{'yes' if times['compile'] >= ms else 'NO'}")
            verdicts.append(f"{name}: " + "; ".join(checks))
    print()
    lines = print_table(["kernel", "implementation", "us", "GB/s", "of copy", "vs eager", "vs compile"], rows)
    lines += print_goals(verdicts, "goals (arcana v1)")
    if args.record:
        record("kernels", device, argv, f"{torch_versions()}; {setup}", lines)
    return 0


# -----------------------------------------------------------------------------
# cross_entropy: the fused softmax/cross-entropy/dlogits kernel (csrc/cross_entropy.cu) on one chunk of the loss

@suite("cross_entropy", "the fused cross-entropy kernel vs PyTorch eager and torch.compile, GB/s vs copy (GPU)")
def bench_cross_entropy(argv):
    """Median time (CUDA events, L2 flushed before each run) of torch.ops.arcana.cross_entropy_fwd_bwd on one
    chunk of the chunked lm_head loss (8192 x 50304 logits by default, every 8th row ignored), each variant, and
    of the PyTorch code it replaces (train_gpt.cross_entropy_rows), eager and compiled. GB/s counts one read of
    the logits and one write of dlogits, the least any implementation moves, against the device's copy
    bandwidth. Variant 1 keeps each row in shared memory between its two sweeps where two rows fit an SM,
    variant 2 re-reads it from L2: their ratio says whether the L2 re-read costs device-memory traffic here."""
    import argparse

    import torch
    import train_gpt as tg
    parser = argparse.ArgumentParser(prog="bench.py cross_entropy", description=bench_cross_entropy.__doc__)
    parser.add_argument("--rows", type=int, default=8192, help="rows per call (lm_head_loss_op's chunk_rows)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", default="1,2,0", help="arcana variants to time: 1 fast, 2 fast re-reading "
                                                            "rows from L2, 0 plain")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append this run to bench/RESULTS.md")
    args = parser.parse_args(argv)
    unavailable = gpu_unavailable("cross_entropy", tg)
    if unavailable is not None:
        return unavailable

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = (torch.randn(args.rows, args.vocab, device="cuda") * 2).to(dtype)
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    targets[::8] = -1
    count = int((targets != -1).sum())
    grad_scale = torch.tensor(1.0 / count, device="cuda")  # a one-element GPU tensor, as the chunked loss passes it
    flush = gpu_flush_buffer()
    ceiling = gpu_copy_bandwidth(flush, reps=args.reps)
    nbytes = 2 * logits.numel() * logits.element_size()
    device = torch.cuda.get_device_name()
    setup = (f"{args.rows} x {args.vocab} {args.dtype} logits, grad_scale 1/{count}; median "
             f"of {args.reps} runs, L2 flushed before each; copy bandwidth {ceiling:.0f} GB/s")
    print(f"device {device}, {torch_versions()}")
    print(setup)
    times = {}
    for v in [int(v) for v in args.variants.split(",") if v]:
        times[f"arcana v{v}"] = gpu_median_ms(
            lambda: torch.ops.arcana.cross_entropy_fwd_bwd(logits, targets, grad_scale, True, v), flush, args.reps,
            args.warmup)
    times["eager"] = gpu_median_ms(lambda: tg.cross_entropy_rows(logits, targets, grad_scale, True), flush,
                                   args.reps, args.warmup)
    if args.compile:
        ms = gpu_compiled_ms(tg.cross_entropy_rows, (logits, targets, grad_scale, True), flush, args.reps,
                             args.warmup, "cross_entropy_rows")
        if ms is not None:
            times["compile"] = ms
    rows = [[impl, f"{ms * 1e3:.0f}"] + bandwidth_cells(nbytes, ms, ceiling, times) for impl, ms in times.items()]
    print()
    lines = print_table(["cross_entropy", "us", "GB/s", "of copy", "vs eager", "vs compile"], rows)
    if args.record:
        record("cross_entropy", device, argv, f"{torch_versions()}; {setup}", lines)
    return 0


# -----------------------------------------------------------------------------
# entry point

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        for name, (_, description) in SUITES.items():
            print(f"  {name:10s} {description}")
        return 0
    if not argv or argv[0] == "all":
        for name, (fn, _) in SUITES.items():
            print(f"=== {name}")
            fn([])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUITES:
        print(f"unknown suite {name!r}; choose from: {', '.join(SUITES)} (or 'all')", file=sys.stderr)
        return 2
    return SUITES[name][0](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
