"""
HellaSwag accuracy of a GPT-2 model, scored completion-style: the way GPT-2 reproductions are
compared.

    python hellaswag.py --download                       # fetch the val split into hellaswag/ once
    python hellaswag.py --checkpoint log/model_19073.pt  # a train_gpt.py checkpoint, val split
    python hellaswag.py --model_dir gpt2/                # OpenAI's GPT-2 from a local HF folder
    python hellaswag.py --model gpt2 --json              # ... or from the hub; one JSON object out
    python hellaswag.py --checkpoint log/model_19073.pt --file my_copy.jsonl --limit 1000
    torchrun --standalone --nproc_per_node=8 hellaswag.py --checkpoint log/model_19073.pt

Each example is a context and 4 candidate endings, one of them right. The model reads
context + " " + ending for each, and the cross-entropy of every ending token is measured (fp32):

    acc       the model's choice is the ending with the lowest summed loss
    acc_norm  ... with the lowest mean loss per token (train_gpt.py logs it as `hella`)

OpenAI's GPT-2 124M scores acc_norm 0.2945 on the 10,042 val examples this way (plot.py draws it
as the baseline); GPT-3 Small (125M) scored 0.337 in its paper.

This file imports prepare.py, and train_gpt.py only inside the functions that build a model
(train_gpt.py imports this file).
"""

import functools
import http.client
import json
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from prepare import (
    EOT_TOKEN,
    GPT2_VOCAB_SIZE,
    USER_ERROR_EXIT,
    Progress,
    UserError,
    config_parser,
    gpt2_encoding,
    one_line,
)

SPLITS = ("train", "val", "test")
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
# seconds the download may wait on the network; nothing retries, so offline runs go on soon
DOWNLOAD_TIMEOUT = 20
# the padded row length is the longest row rounded up to this (at most block_size)
PAD_MULTIPLE = 32


def default_batch_size(device):
    """Examples (4 rows each) per forward pass: the logits alone take 4 * batch * length * 50304
    values."""
    return 32 if torch.device(device).type == "cuda" else 4


# -----------------------------------------------------------------------------
# data: the official jsonl files, their cache folder, download and validation


def data_path(split, data_dir):
    return os.path.join(data_dir or DEFAULT_DATA_DIR, f"hellaswag_{split}.jsonl")


def find_data(split="val", data_dir=None):
    """The path of the local copy of a split, or None when it is not there. Never touches the
    network."""
    path = data_path(split, data_dir)
    return path if os.path.isfile(path) else None


def download(split="val", data_dir=None):
    """Fetch a split into data_dir; return its path. The file is checked under a temporary name,
    then renamed."""
    dest, url = data_path(split, data_dir), URL.format(split=split)
    tmp = f"{dest}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(response, f)
            f.flush()
            os.fsync(f.fileno())
        load_examples(tmp)  # a cut-off transfer or an error page never gets the final name
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, UserError) as e:  # network, folder, bad transfer
        raise UserError(
            f"could not download {url} to {dest} ({getattr(e, 'reason', e)}); fix the network, "
            f"or put a copy of the file there yourself (hellaswag.py: --data_dir or --file PATH; "
            f"train_gpt.py: --hellaswag_dir)"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def ensure_data(split="val", data_dir=None, master=True, distributed=False):
    """The path of the local copy of a split. When it is missing the master process downloads it
    once, the others waiting; every process raises UserError when it is still missing."""
    path, failure = find_data(split, data_dir), None
    if path is None and master:
        print(f"downloading HellaSwag {split} into {data_dir or DEFAULT_DATA_DIR}", file=sys.stderr)
        try:
            path = download(split, data_dir)
        except UserError as e:
            failure = e
    if distributed:
        # the master reaches it whether or not its download worked, so no process waits forever
        dist.barrier()
        path = find_data(split, data_dir)
    if path is None:
        raise failure or UserError(
            f"{data_path(split, data_dir)} is missing and the master process could not "
            f"download it; run python hellaswag.py --download where there is network"
        )
    return path


def check_example(row, where):
    """Refuse a row that cannot be scored, naming where it is and its ind."""
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: a JSON {type(row).__name__}, not an example object with ctx, endings "
            f"and label"
        )
    name = f"{where}: example ind={row.get('ind', '?')}"
    if not isinstance(row.get("ctx"), str):
        raise UserError(f"{name} has no 'ctx' string")
    endings = row.get("endings")
    four = isinstance(endings, list) and len(endings) == 4
    if not four or not all(isinstance(e, str) for e in endings):
        raise UserError(
            f"{name} has endings {json.dumps(endings)[:80]}; every example has a list of 4 strings"
        )
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or label not in (0, 1, 2, 3)):
        raise UserError(
            f"{name} has label {label!r}; a label is the index of the right ending: 0, 1, 2 or 3"
        )


def load_examples(path, limit=None, require_labels=False):
    """The examples of a HellaSwag jsonl file, as parsed (every original field kept), each one
    checked. limit keeps the first N; require_labels refuses unlabelled rows (the test split's
    labels are hidden)."""
    examples = []
    # binary: json.loads decodes each line itself, so bad bytes get a line number too
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # malformed JSON, or not UTF-8
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
                raise UserError(
                    f"{path}:{lineno}: not a line of JSON text ({why}); the file may be truncated "
                    f"or not HellaSwag data (delete it and download it again)"
                ) from None
            check_example(row, f"{path}:{lineno}")
            if require_labels and row.get("label") is None:
                ind = row.get("ind", "?")
                raise UserError(
                    f"{path}:{lineno}: example ind={ind} has no label, so it cannot be scored "
                    f"(the test split's labels are not public: use val or train)"
                )
            examples.append(row)
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


# -----------------------------------------------------------------------------
# rendering: tokens of context + " " + ending, left-truncated to the model's block size, in
# fixed-shape arrays


def fit_row(ctx, ending, block_size):
    """(tokens, start, truncated): one row of context then ending tokens, the ending from index
    start. Beyond block_size the context loses its oldest tokens; an ending that alone fills the
    block keeps its first block_size - 1 tokens after one context token, so every ending token kept
    still has a predictor."""
    ctx = ctx or [EOT_TOKEN]  # an empty context reads <|endoftext|>
    kept_ending = ending[: block_size - 1]
    kept_ctx = ctx[-(block_size - len(kept_ending)) :]
    truncated = len(kept_ctx) + len(kept_ending) < len(ctx) + len(ending)
    return kept_ctx + kept_ending, len(kept_ctx), truncated


@dataclass
class Rendered:  # the labelled examples of a file as the model reads them
    # (n, 4, L) int32 token ids, zero past each row's end; L is the one padded row length
    tokens: np.ndarray
    starts: np.ndarray  # (n, 4) index of each row's first ending token
    lengths: np.ndarray  # (n, 4) tokens in each row
    labels: np.ndarray  # (n,) right ending
    truncated: np.ndarray  # (n,) bool: a row was cut to fit block_size


def render_file(path, block_size, limit=None):
    """The labelled examples of a jsonl file fitted to block_size, from memory while the file is
    unchanged."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    st = os.stat(path)
    return _render(os.path.realpath(path), st.st_mtime_ns, st.st_size, block_size, limit)


@functools.lru_cache(maxsize=4)  # training re-scores the same file every --hellaswag_every steps
def _render(path, mtime_ns, size, block_size, limit):
    examples = load_examples(path, limit, require_labels=True)
    enc = gpt2_encoding()
    contexts = enc.encode_ordinary_batch([ex["ctx"] for ex in examples])
    texts = []  # the 4 endings of each example in turn, each after the space that joins it
    for ex in examples:
        texts += [" " + ending for ending in ex["endings"]]
    endings = enc.encode_ordinary_batch(texts)
    rows, starts, cuts = [], [], []
    for k, ending in enumerate(endings):  # example k // 4, its ending k % 4
        row, start, cut = fit_row(contexts[k // 4], ending, block_size)
        rows.append(row)
        starts.append(start)
        cuts.append(cut)
    n = len(examples)
    lengths = np.array([len(row) for row in rows]).reshape(n, 4)
    L = min(-(-lengths.max() // PAD_MULTIPLE) * PAD_MULTIPLE, block_size)
    tokens = np.zeros((4 * n, L), np.int32)
    for k, row in enumerate(rows):
        tokens[k, : len(row)] = row
    return Rendered(
        tokens.reshape(n, 4, L),
        np.array(starts).reshape(n, 4),
        lengths,
        np.array([ex["label"] for ex in examples]),
        np.array(cuts).reshape(n, 4).any(1),
    )


# -----------------------------------------------------------------------------
# scoring


@dataclass
class Score:
    correct_norm: int  # right by the lowest mean loss per ending token (acc_norm), all processes
    correct: int  # right by the lowest summed loss (acc), over all processes
    total: int  # examples scored, over all processes
    truncated: int  # of those, examples with a row cut to fit block_size
    length: int  # the padded row length of every forward pass
    indices: np.ndarray  # this process's examples (positions in the file, counting from 0)
    sum_loss: np.ndarray  # (len(indices), 4) summed cross-entropy of each ending
    mean_loss: np.ndarray  # (len(indices), 4) mean cross-entropy per token of each ending
    load_seconds: float  # reading and tokenizing the file (next to nothing from memory)
    seconds: float  # forward passes and scoring, all processes done


@torch.no_grad()
def _ending_losses(model, data, indices, device, batch_size, batches, show_progress=True):
    """(summed, mean) ending losses, each (len(indices), 4), from `batches` forward passes (enough
    for indices, and the same number on every process) of one fixed shape (4 * batch_size, L):
    batches past the examples are filled with dummy rows, so a compiled model compiles once.
    Inputs and targets go to the device in one copy and the losses come back in one, so the
    device never waits on the host between passes."""
    n = len(indices)  # examples
    L = data.tokens.shape[2]  # row length
    R = 4 * batch_size  # rows per forward pass
    rows = np.zeros((batches * R, L), np.int32)  # dummy rows stay all zeros
    rows[: 4 * n] = data.tokens[indices].reshape(4 * n, L)
    positions = np.arange(1, L)  # a token at position t is predicted by the logits at t - 1
    first = np.maximum(data.starts[indices].reshape(4 * n, 1), 1)
    last = data.lengths[indices].reshape(4 * n, 1)
    scored = (positions >= first) & (positions < last)  # (4n, L - 1)
    row, col = np.nonzero(scored)  # ordered by row, so each batch's scored tokens are one slice
    bounds = np.searchsorted(row, np.arange(batches + 1) * R).tolist()
    inputs = torch.from_numpy(rows).to(device)
    row_t = torch.from_numpy(row).to(device)
    at = torch.from_numpy(row % R * L + col).to(device)  # flat (row, position) in batch logits
    targets = torch.from_numpy(rows[row, col + 1].astype(np.int64)).to(device)
    summed = torch.zeros(4 * n, dtype=torch.float32, device=device)
    progress = Progress("HellaSwag batches", batches, show_progress)
    for b in range(batches):
        progress.update(b)
        logits, _ = model(inputs[b * R : (b + 1) * R].long())  # (R, L, vocab), a fresh input
        s, e = bounds[b], bounds[b + 1]
        picked = logits.reshape(R * L, -1)[at[s:e]]  # (K, vocab)
        picked = picked[:, :GPT2_VOCAB_SIZE].float()  # (K, 50257): no padding ids
        summed.index_add_(0, row_t[s:e], F.cross_entropy(picked, targets[s:e], reduction="none"))
    summed = summed.double().cpu().numpy().reshape(n, 4)
    return summed, summed / scored.sum(1).reshape(n, 4)


def score(model, path, block_size, device="cpu", rank=0, world_size=1, batch_size=None, limit=None):
    """HellaSwag counts of model on the jsonl at path (rows fitted to block_size), summed over all
    processes: rank r scores examples i % world_size == r. The caller sets eval mode and autocast;
    model(idx) returns (logits, loss) with logits (N, T, vocab). batch_size counts examples (4 rows
    each) per forward pass."""
    if world_size > 1 and not dist.is_initialized():
        raise UserError(
            f"world_size {world_size} needs torch.distributed initialized (run under torchrun)"
        )
    for name, value in (("batch_size", batch_size), ("limit", limit)):
        if value is not None and value < 1:
            raise UserError(f"--{name} {value} must be at least 1")
    t0 = time.perf_counter()
    data = render_file(path, block_size, limit)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    indices = np.arange(rank, len(data.labels), world_size)
    batch_size = batch_size or default_batch_size(device)
    per_process = -(-len(data.labels) // world_size)  # the most examples a process scores
    batches = -(-per_process // batch_size)  # the same on every process: a sharded model's
    sum_loss, mean_loss = _ending_losses(  # forward passes are collectives
        model, data, indices, device, batch_size, batches, rank == 0
    )
    labels = data.labels[indices]
    counts = torch.tensor(
        [
            (mean_loss.argmin(1) == labels).sum(),
            (sum_loss.argmin(1) == labels).sum(),
            len(indices),
            data.truncated[indices].sum(),
        ],
        device=device,
    )
    if world_size > 1:
        dist.all_reduce(counts)
    correct_norm, correct, total, truncated = counts.tolist()
    seconds = time.perf_counter() - t0  # with several processes, until the slowest is done
    length = data.tokens.shape[2]
    return Score(
        correct_norm,
        correct,
        total,
        truncated,
        length,
        indices,
        sum_loss,
        mean_loss,
        load_seconds,
        seconds,
    )


# -----------------------------------------------------------------------------
# command line


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None  # a train_gpt.py checkpoint to score (model_*.pt, or a folder)
    model_dir: Optional[str] = None  # a local Hugging Face GPT-2 folder (config.json, weights)
    model: Optional[str] = None  # a hub name: gpt2, gpt2-medium, gpt2-large, gpt2-xl (network)
    split: str = "val"  # which official split to score
    file: Optional[str] = None  # read this local jsonl copy instead of the cached split
    data_dir: str = DEFAULT_DATA_DIR  # the cache folder of the official files
    download: bool = False  # only download --split into --data_dir, then exit
    limit: Optional[int] = None  # score only the first N examples
    batch_size: Optional[int] = None  # examples (4 rows each) per forward pass: 32 on CUDA, else 4
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # autocast precision (auto: bfloat16 on CUDA, float32 elsewhere)
    kernels: str = "auto"  # the model's ops: the arcana_kernels extension (cuda) or PyTorch (torch)
    json: bool = False  # print one JSON object instead of text


def model_flag(cfg):
    """The one flag of --checkpoint, --model_dir and --model that the user gave."""
    given = [f"--{name}" for name in ("checkpoint", "model_dir", "model") if getattr(cfg, name)]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise UserError(
            f"choose the model with exactly one of --checkpoint PATH, --model_dir DIR or "
            f"--model NAME{got}"
        )
    return given[0]


def load_model(cfg, flag, device, ops):
    """(the model flag names, in eval mode on device, and its name for the output)."""
    import train_gpt  # the trainer's model; imported here, as train_gpt.py imports this file

    name = cfg.checkpoint or cfg.model_dir or cfg.model
    try:
        if cfg.checkpoint:
            model, ckpt = train_gpt.model_from_checkpoint(name, device, ops)
            name = f"{name} (step {ckpt['step']})"
        else:
            model = train_gpt.GPT.from_pretrained(name, ops=ops).to(device)
    except (RuntimeError, TypeError) as e:  # weights of another shape; a config GPTConfig refuses
        raise UserError(
            f"{flag} {name} does not load into a GPT ({type(e).__name__}: {str(e)[:400]})"
        ) from None
    vocab_size = model.config.vocab_size
    if vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{flag} {name}: {vocab_size} tokens, fewer than GPT-2's {GPT2_VOCAB_SIZE}")
    return model.eval(), name


def run(cfg):
    import train_gpt

    if cfg.download:
        print(f"{ensure_data(cfg.split, cfg.data_dir)} is in place")
        return 0
    flag = model_flag(cfg)
    rt = train_gpt.setup_runtime(cfg.device)
    path = cfg.file or ensure_data(cfg.split, cfg.data_dir, rt.master, rt.ddp)
    ops = train_gpt.select_ops(cfg.kernels, rt.device_type)
    model, name = load_model(cfg, flag, rt.device, ops)
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    dtype = train_gpt.resolve_dtype(cfg.dtype, rt.device_type)
    batch_size = default_batch_size(rt.device) if cfg.batch_size is None else cfg.batch_size
    block_size = model.config.block_size
    with train_gpt.autocast_context(rt.device_type, dtype):
        s = score(model, path, block_size, rt.device, rt.rank, rt.world_size, batch_size, cfg.limit)
    if not rt.master:
        return 0
    result = {
        "split": None if cfg.file else cfg.split,
        "file": path,
        "model": name,
        "examples": s.total,
        "acc": s.correct / s.total,
        "acc_norm": s.correct_norm / s.total,
        "correct": s.correct,
        "correct_norm": s.correct_norm,
        "truncated": s.truncated,
        "block_size": block_size,
        "seconds": round(s.seconds, 3),
        "examples_per_s": round(s.total / max(s.seconds, 1e-9), 1),
        "load_seconds": round(s.load_seconds, 3),
        "device": rt.device,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "processes": rt.world_size,
    }
    if cfg.json:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0


def print_result(r):
    """run's result dict for people: what was scored, the accuracies, the speed."""
    n = r["examples"]
    print(
        f"{r['file']}: {n} examples ({r['truncated']} truncated to block_size "
        f"{r['block_size']}), model {r['model']}"
    )
    print(
        f"acc {r['acc']:.4f} ({r['correct']}/{n})  "
        f"acc_norm {r['acc_norm']:.4f} ({r['correct_norm']}/{n})"
    )
    print(
        f"{r['seconds']:.2f} s, {r['examples_per_s']:.1f} examples/s ({r['processes']} "
        f"process(es) on {r['device']}, {r['dtype']}, batch_size {r['batch_size']}; "
        f"{r['load_seconds']:.2f} s reading and tokenizing)"
    )


def main(argv=None):
    import train_gpt

    cfg = config_parser(
        EvalConfig,
        __doc__,
        split=dict(choices=SPLITS),
        dtype=dict(choices=train_gpt.DTYPES),
        kernels=dict(choices=train_gpt.KERNELS),
    ).parse_args(argv)
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        # before interpreter shutdown: a later teardown aborts under torchrun
        train_gpt.end_distributed()


if __name__ == "__main__":
    sys.exit(main())
