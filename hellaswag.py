"""
HellaSwag accuracy of a GPT-2 model, scored completion-style: the way GPT-2 reproductions are compared.

    python hellaswag.py --download                          # fetch the val split into hellaswag/ once
    python hellaswag.py --checkpoint log/model_19072.pt     # a train_gpt.py checkpoint on the val split
    python hellaswag.py --model_dir gpt2/                   # OpenAI's GPT-2 from a local Hugging Face directory
    python hellaswag.py --model gpt2 --json                 # ... or from the hub; one JSON object out
    python hellaswag.py --checkpoint log/model_19072.pt --file my_copy.jsonl --limit 1000
    torchrun --standalone --nproc_per_node=8 hellaswag.py --checkpoint log/model_19072.pt

Each example is a context and 4 candidate endings, one of them right. The model reads context + " " + ending
for each, and the cross-entropy of every ending token is measured (fp32):

    acc       the ending with the lowest summed loss is the model's choice
    acc_norm  the ending with the lowest mean loss per token is the model's choice (the `hella` log stream)

OpenAI's GPT-2 124M scores acc_norm 0.2955 on the 10,042 val examples this way; GPT-3 124M scored 0.337.
train_gpt.py calls evaluate() every --hellaswag_every steps.
"""

import argparse
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
DOWNLOAD_TIMEOUT = 60  # seconds a download may wait on the network before giving up
GPT2_VOCAB_SIZE = 50257  # real GPT-2 tokens; logits past this (a padded vocabulary) are never scored
EOT_TOKEN = 50256  # <|endoftext|>: stands in for an empty context, so every ending token has a predictor
PAD_MULTIPLE = 32  # the padded row length is the longest rendered row rounded up to this


class HellaSwagError(Exception):
    """Bad data, a missing file or an unusable argument: printed as one line, no traceback."""


def default_batch_size(device):
    """Examples (4 rows each) per forward pass: the logits alone take 4 * batch * length * 50304 values."""
    return 32 if torch.device(device).type == "cuda" else 4


# -----------------------------------------------------------------------------
# data: the official jsonl files, their cache folder, download and validation

def data_path(split="val", data_dir=None):
    """Where the cached copy of a split lives (whether or not it is there)."""
    if split not in SPLITS:
        raise HellaSwagError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return os.path.join(data_dir or DEFAULT_DATA_DIR, f"hellaswag_{split}.jsonl")


def find_data(split="val", data_dir=None):
    """The path of the local copy of a split, or None when it is not there. Never touches the network."""
    path = data_path(split, data_dir)
    return path if os.path.isfile(path) else None


def download(split="val", data_dir=None, timeout=DOWNLOAD_TIMEOUT):
    """Fetch a split from the official URL into data_dir and return its path. The file is written under a
    temporary name, checked, then renamed: an interrupted or corrupt download never sits under the final name."""
    dest = data_path(split, data_dir)
    url = URL.format(split=split)
    manual = (f"download {url} on a machine with network access and put it at {dest} "
              f"(or pass --file PATH to read a copy from elsewhere)")
    tmp = f"{dest}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        try:
            load_examples(tmp)
        except HellaSwagError as e:
            raise HellaSwagError(f"the download from {url} is not valid HellaSwag data ({e}); nothing was "
                                 f"saved. Try again, or {manual}") from None
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise HellaSwagError(f"could not download HellaSwag {split}: the server answered {e.code} {e.reason}. "
                             f"Try again later, or {manual}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"could not download HellaSwag {split} ({type(e).__name__}: {reason}); the network "
                             f"may be unreachable. To work offline, {manual}") from None
    except OSError as e:  # the download's own file: permissions, a full disk
        raise HellaSwagError(f"could not write {dest} ({e.strerror or e}); pass another --data_dir") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def check_example(row, where):
    """Refuse a row that cannot be scored, naming where it is and its ind."""
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: a JSON {type(row).__name__}, not an example object with ctx, endings "
                             f"and label")
    name = f"example ind={row.get('ind', '?')}"
    if not isinstance(row.get("ctx"), str):
        raise HellaSwagError(f"{where}: {name} has no 'ctx' string")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != 4:
        count = f"{len(endings)} endings" if isinstance(endings, list) else "no 'endings' list"
        raise HellaSwagError(f"{where}: {name} has {count}; every HellaSwag example has exactly 4")
    if not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: {name} has an ending that is not a string")
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or label not in (0, 1, 2, 3)):
        raise HellaSwagError(f"{where}: {name} has label {label!r}; a label is the index of the right "
                             f"ending: 0, 1, 2 or 3")


def load_examples(path, limit=None, require_labels=False):
    """The examples of a HellaSwag jsonl file, as parsed (every original field kept), each one checked.
    limit keeps the first N; require_labels refuses unlabelled rows (the test split's labels are hidden)."""
    if not os.path.isfile(path):
        raise HellaSwagError(f"{path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HellaSwagError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); the "
                                         f"file may be truncated or not HellaSwag data (delete it and download "
                                         f"it again)") from None
                check_example(row, f"{path}:{lineno}")
                if require_labels and row.get("label") is None:
                    raise HellaSwagError(f"{path}:{lineno}: example ind={row.get('ind', '?')} has no label, so it "
                                         f"cannot be scored (the test split's labels are not public: use val or "
                                         f"train)")
                examples.append(row)
        except UnicodeDecodeError as e:
            raise HellaSwagError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None
    if not examples:
        raise HellaSwagError(f"{path} holds no examples")
    return examples


# -----------------------------------------------------------------------------
# rendering: tokens of context + " " + ending, left-truncated to the model's block size

def gpt2_encoding():
    """prepare.py's shared GPT-2 tokenizer (works offline), with its failure as a HellaSwagError."""
    try:
        from prepare import gpt2_encoding as shared
        return shared()
    except Exception as e:
        raise HellaSwagError(f"the GPT-2 tokenizer is unavailable: {e}") from None


def fit_row(ctx, ending, block_size=None):
    """(tokens, start, truncated): one row of context then ending tokens, ending from index start. Beyond
    block_size the context loses its oldest tokens; an ending that alone fills the block keeps its first
    block_size - 1 tokens after one context token, so every ending token kept still has a predictor."""
    ctx = ctx or [EOT_TOKEN]
    if block_size is None or len(ctx) + len(ending) <= block_size:
        return ctx + ending, len(ctx), False
    if len(ending) >= block_size:
        ctx, ending = ctx[-1:], ending[:block_size - 1]
    else:
        ctx = ctx[len(ctx) + len(ending) - block_size:]
    return ctx + ending, len(ctx), True


@dataclass
class Rendered:
    """One example as the model reads it: 4 rows, each the context's tokens followed by one ending's."""
    rows: list  # 4 lists of token ids
    starts: list  # index in each row of its first ending token
    label: Optional[int]  # the right ending, None for the unlabelled test split
    truncated: bool  # a row was cut to fit block_size

    def tensors(self):
        """(tokens, mask), each (4, longest row): zero-padded tokens, and 1 over the ending tokens."""
        length = max(len(r) for r in self.rows)
        tokens = torch.zeros((4, length), dtype=torch.long)
        mask = torch.zeros((4, length), dtype=torch.long)
        for i, (row, start) in enumerate(zip(self.rows, self.starts)):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, start:len(row)] = 1
        return tokens, mask


def render_example(example, block_size=None, enc=None):
    """An example (a dict as loaded) as the model reads it; see fit_row for truncation."""
    enc = enc or gpt2_encoding()
    ctx = enc.encode_ordinary(example["ctx"])
    fitted = [fit_row(ctx, enc.encode_ordinary(" " + ending), block_size) for ending in example["endings"]]
    return Rendered([f[0] for f in fitted], [f[1] for f in fitted], example.get("label"),
                    any(f[2] for f in fitted))


@dataclass
class RenderedSet:
    """Every example of a file, rendered into fixed-shape arrays; L is the one padded row length."""
    tokens: np.ndarray  # (n, 4, L) int32 token ids, zero past each row's end
    starts: np.ndarray  # (n, 4) index of each row's first ending token
    lengths: np.ndarray  # (n, 4) tokens in each row
    labels: np.ndarray  # (n,) right ending
    truncated: np.ndarray  # (n,) bool: a row was cut to fit block_size


def render_all(examples, block_size, enc=None):
    """Examples (dicts as loaded, labelled) fitted to block_size and padded to one length L."""
    enc = enc or gpt2_encoding()
    if block_size < 2:
        raise HellaSwagError(f"block_size {block_size} is too small: a row needs a context token and an ending token")
    contexts = enc.encode_ordinary_batch([ex["ctx"] for ex in examples])
    endings = enc.encode_ordinary_batch([" " + e for ex in examples for e in ex["endings"]])
    n = len(examples)
    rows, starts, truncated = [], np.zeros((n, 4), np.int64), np.zeros(n, bool)
    for i, ctx in enumerate(contexts):
        for j in range(4):
            row, starts[i, j], cut = fit_row(ctx, endings[4 * i + j], block_size)
            rows.append(row)
            truncated[i] |= cut
    lengths = np.array([len(r) for r in rows], np.int64).reshape(n, 4)
    L = min(-(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE, block_size)
    tokens = np.zeros((n * 4, L), np.int32)
    for k, row in enumerate(rows):
        tokens[k, :len(row)] = row
    labels = np.array([-1 if ex.get("label") is None else ex["label"] for ex in examples], np.int64)
    return RenderedSet(tokens.reshape(n, 4, L), starts, lengths, labels, truncated)


_CACHE = {}  # (file identity, limit, block_size) -> RenderedSet: training re-scores the same file often


def load_rendered(path, block_size, limit=None):
    """The labelled examples of a file rendered for block_size, from memory when the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        raise HellaSwagError(f"{path} does not exist") from None
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, limit, block_size)
    if key not in _CACHE:
        data = render_all(load_examples(path, limit, require_labels=True), block_size)
        if len(_CACHE) >= 4:
            _CACHE.clear()
        _CACHE[key] = data
    return _CACHE[key]


# -----------------------------------------------------------------------------
# scoring

def model_block_size(model):
    """config.block_size of a model, looking through torch.compile (_orig_mod) and DDP (module) wrappers."""
    m = model
    for _ in range(8):
        block_size = getattr(getattr(m, "config", None), "block_size", None)
        if block_size:
            return int(block_size)
        inner = getattr(m, "_orig_mod", None)
        m = inner if inner is not None else getattr(m, "module", None)
        if m is None:
            break
    raise HellaSwagError("cannot find the model's block size (no .config.block_size on it or on the modules it "
                         "wraps); pass block_size= to evaluate()")


@dataclass
class Score:
    correct_norm: int  # right by the lowest mean loss per ending token (acc_norm), over all processes
    correct: int  # right by the lowest summed loss (acc), over all processes
    total: int  # examples scored, over all processes
    truncated: int  # of those, examples with a row cut to fit block_size
    block_size: int  # the model context rows were fitted to
    length: int  # the padded row length of every forward pass
    indices: np.ndarray  # this process's examples (positions in the file, counting from 0)
    sum_loss: np.ndarray  # (len(indices), 4) summed cross-entropy of each ending
    mean_loss: np.ndarray  # (len(indices), 4) mean cross-entropy per token of each ending
    load_seconds: float  # reading and tokenizing the file (next to nothing when it came from memory)
    seconds: float  # forward passes and scoring, all processes done

    @property
    def predictions(self):
        """(acc choice, acc_norm choice) of each of this process's examples."""
        return self.sum_loss.argmin(1), self.mean_loss.argmin(1)


@torch.no_grad()
def _ending_losses(model, data, indices, device, batch_size):
    """(summed, mean) ending losses, each (len(indices), 4), from forward passes of one fixed shape
    (4 * batch_size, L): the last batch is filled with dummy rows, so a compiled model compiles once. Inputs
    and targets go to the device in one copy and the losses come back in one, so the device never waits on
    the host between passes."""
    L = data.tokens.shape[2]
    R = 4 * batch_size  # rows per forward pass
    n = len(indices)
    batches = -(-n // batch_size)
    rows = np.zeros((batches * R, L), np.int32)  # dummy rows stay all zeros
    rows[:4 * n] = data.tokens[indices].reshape(4 * n, L)
    positions = np.arange(1, L)  # a token at position t is predicted by the logits at t - 1
    first = np.maximum(data.starts[indices].reshape(4 * n, 1), 1)
    scored = (positions >= first) & (positions < data.lengths[indices].reshape(4 * n, 1))  # (4n, L - 1)
    row, col = np.nonzero(scored)  # ordered by row, so each batch's scored tokens are one slice
    bounds = np.searchsorted(row, np.arange(batches + 1) * R).tolist()
    inputs = torch.from_numpy(rows).to(device)
    row_t = torch.from_numpy(row).to(device)
    at = torch.from_numpy(row % R * L + col).to(device)  # flat (row, position) in its batch's logits
    targets = torch.from_numpy(rows[row, col + 1].astype(np.int64)).to(device)
    summed = torch.zeros(4 * n, dtype=torch.float32, device=device)
    for b in range(batches):
        logits = model(inputs[b * R:(b + 1) * R].long())  # a fresh (R, L) tensor each pass
        logits = logits[0] if isinstance(logits, tuple) else logits  # (R, L, V)
        if logits.size(-1) < GPT2_VOCAB_SIZE:
            raise HellaSwagError(f"the model has {logits.size(-1)} output logits, fewer than GPT-2's "
                                 f"{GPT2_VOCAB_SIZE} tokens")
        s, e = bounds[b], bounds[b + 1]
        picked = logits.reshape(R * L, -1)[at[s:e]][:, :GPT2_VOCAB_SIZE].float()  # (K, 50257)
        summed.index_add_(0, row_t[s:e], F.cross_entropy(picked, targets[s:e], reduction="none"))
    summed = summed.double().cpu().numpy().reshape(n, 4)
    return summed, summed / scored.sum(1).reshape(n, 4)


def score(model, device, rank=0, world_size=1, *, path=None, split="val", batch_size=None, limit=None,
          block_size=None):
    """evaluate() with everything it measured: counts over all processes, and this process's losses."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise HellaSwagError(f"world_size {world_size} needs torch.distributed initialized (run under torchrun)")
    if not 0 <= rank < world_size:
        raise HellaSwagError(f"rank {rank} is outside 0..{world_size - 1}")
    batch_size = batch_size or default_batch_size(device)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise HellaSwagError(f"batch_size ({batch_size}) and limit ({limit}) must be at least 1")
    if path is None:
        path = find_data(split) or download(split)
    block_size = block_size or model_block_size(model)
    t0 = time.perf_counter()
    data = load_rendered(path, block_size, limit)
    load_seconds = time.perf_counter() - t0
    indices = np.arange(rank, len(data.labels), world_size)

    t0 = time.perf_counter()
    sum_loss, mean_loss = _ending_losses(model, data, indices, device, batch_size)
    labels = data.labels[indices]
    counts = torch.tensor([(mean_loss.argmin(1) == labels).sum(), (sum_loss.argmin(1) == labels).sum(),
                           len(indices), data.truncated[indices].sum()], dtype=torch.long)
    if world_size > 1:
        counts = counts.to(device) if dist.get_backend() == "nccl" else counts  # nccl reduces GPU tensors only
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct_norm, correct, total, truncated = counts.tolist()
    seconds = time.perf_counter() - t0  # with several processes, until the slowest has finished
    return Score(correct_norm, correct, total, truncated, block_size, data.tokens.shape[2], indices, sum_loss,
                 mean_loss, load_seconds, seconds)


def evaluate(model, device, rank=0, world_size=1, *, path=None, batch_size=None, limit=None, block_size=None):
    """(correct_norm, correct, total) of model on a HellaSwag file (default: the val split, downloaded on first
    use), counted over all processes. Rank r scores examples i % world_size == r. The caller sets eval mode and
    autocast; model(idx) must return (logits, _) with logits (N, L, vocab). batch_size counts examples (4 rows
    each); block_size defaults to the model's config.block_size."""
    s = score(model, device, rank, world_size, path=path, batch_size=batch_size, limit=limit, block_size=block_size)
    return s.correct_norm, s.correct, s.total


# -----------------------------------------------------------------------------
# command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="HellaSwag accuracy (acc and acc_norm) of a GPT-2 model. Launch commands: see the module "
                    "docstring.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="a train_gpt.py checkpoint (model_*.pt) to score")
    parser.add_argument("--model_dir", help="a local Hugging Face GPT-2 directory (config.json, model.safetensors)")
    parser.add_argument("--model", help="a Hugging Face hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl); "
                                        "needs network")
    parser.add_argument("--split", default="val", choices=SPLITS, help="which official split to score")
    parser.add_argument("--file", help="read this local jsonl copy instead of the cached split")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="the cache folder of the official files")
    parser.add_argument("--download", action="store_true", help="only download --split into --data_dir, then exit")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--batch_size", type=int, help="examples (4 rows each) per forward pass "
                                                       "(default: 32 on CUDA, 4 elsewhere)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast precision (auto: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "cuda", "torch"],
                        help="the model's ops: the arcana_kernels extension (cuda) or PyTorch (torch)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def model_source(args):
    """(flag, value) of the one model flag given."""
    given = [(flag, value) for flag, value in (("--checkpoint", args.checkpoint), ("--model_dir", args.model_dir),
                                               ("--model", args.model)) if value]
    if len(given) != 1:
        raise HellaSwagError("choose the model with exactly one of --checkpoint PATH, --model_dir DIR or --model "
                             "NAME" + (f" (got {' and '.join(flag for flag, _ in given)})" if given else ""))
    return given[0]


def load_model(flag, value, device, ops):
    """(model on device, a description of it) from --checkpoint, --model_dir or --model."""
    import train_gpt

    try:
        if flag == "--checkpoint":
            model, ckpt = train_gpt.model_from_checkpoint(value, device, ops)
            return model, f"{value} (step {ckpt['step']})"
        return train_gpt.GPT.from_pretrained(value, ops=ops).to(device), value
    except train_gpt.UserError:
        raise
    except Exception as e:  # e.g. weights of another shape: load_state_dict's RuntimeError
        reason = " ".join(str(e).split())
        raise HellaSwagError(f"{flag} {value} does not load into a GPT ({type(e).__name__}: "
                             f"{reason[:400]}{'...' if len(reason) > 400 else ''})") from None


def resolve_data(args, rt):
    """The jsonl to score: --file, else the cached split, downloaded first when missing (by rank 0 only
    under torchrun; the others wait for it)."""
    if args.file:
        if not os.path.isfile(args.file):
            raise HellaSwagError(f"--file {args.file} does not exist")
        return args.file
    path, failure = find_data(args.split, args.data_dir), None
    if path is None and rt.master:
        if not args.json:
            print(f"downloading HellaSwag {args.split} into {args.data_dir}")
        try:
            path = download(args.split, args.data_dir)
        except HellaSwagError as e:
            failure = e
    if rt.ddp:
        dist.barrier()  # reached by rank 0 whether or not its download worked, so none waits forever
        path = path or find_data(args.split, args.data_dir)
    if failure:
        raise failure
    if path is None:
        raise HellaSwagError(f"{data_path(args.split, args.data_dir)} is missing: rank 0 could not download it")
    return path


def run(args):
    import train_gpt

    if args.download:
        path = find_data(args.split, args.data_dir)
        if path:
            print(f"{path} is already there (delete it to download again)")
        else:
            print(f"downloading {URL.format(split=args.split)}")
            path = download(args.split, args.data_dir)
            print(f"saved {path}")
        return 0
    if args.limit is not None and args.limit < 1:
        raise HellaSwagError(f"--limit {args.limit} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise HellaSwagError(f"--batch_size {args.batch_size} must be at least 1")
    flag, value = model_source(args)
    rt = train_gpt.setup_runtime(args.device)
    path = resolve_data(args, rt)
    model, name = load_model(flag, value, rt.device, train_gpt.select_ops(args.kernels, rt.device_type))
    model.eval()
    if rt.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    dtype = train_gpt.resolve_dtype(args.dtype, rt.device_type)
    batch_size = args.batch_size or default_batch_size(rt.device)
    with train_gpt.autocast_context(rt.device_type, dtype):
        s = score(model, rt.device, rt.rank, rt.world_size, path=path, batch_size=batch_size, limit=args.limit)
    if not rt.master:
        return 0
    result = {
        "split": None if args.file else args.split, "file": path, "model": name, "examples": s.total,
        "acc": s.correct / s.total, "acc_norm": s.correct_norm / s.total, "correct": s.correct,
        "correct_norm": s.correct_norm, "truncated": s.truncated, "block_size": s.block_size,
        "seconds": round(s.seconds, 3), "examples_per_s": round(s.total / max(s.seconds, 1e-9), 1),
        "load_seconds": round(s.load_seconds, 3), "device": rt.device, "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size, "processes": rt.world_size,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{path}: {s.total} examples ({s.truncated} truncated to block_size {s.block_size}), model {name}")
    print(f"acc {result['acc']:.4f} ({s.correct}/{s.total})  acc_norm {result['acc_norm']:.4f} "
          f"({s.correct_norm}/{s.total})")
    print(f"{s.seconds:.2f} s, {result['examples_per_s']:.1f} examples/s ({rt.world_size} process(es) on {rt.device}, "
          f"{result['dtype']}, batch_size {batch_size}; {s.load_seconds:.2f} s reading and tokenizing)")
    return 0


# -----------------------------------------------------------------------------
# entry point

def main(argv=None):
    args = build_parser().parse_args(argv)
    import train_gpt

    try:
        return run(args)
    except (HellaSwagError, train_gpt.UserError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    finally:
        train_gpt.end_distributed()


if __name__ == "__main__":
    sys.exit(main())
