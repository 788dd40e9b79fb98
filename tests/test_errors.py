"""Every error a user can cause, run as the user runs it: each tool ends with one `error:` line
naming the problem, a non-zero exit code and no Python traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--batch_size",
    "2",
    "--block_size",
    "32",
    "--total_batch_size",
    "64",
    "--max_steps",
    "1",
    "--hellaswag_every",
    "0",
    "--sample_every",
    "0",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small data folder, a file where a folder belongs,
    random bytes named like a checkpoint, bad inputs."""
    d = tmp_path_factory.mktemp("errors")
    os.makedirs(d / "data")
    np.save(d / "data" / "t_val_000000.npy", np.arange(1000, dtype=np.uint16))
    np.save(d / "data" / "t_train_000001.npy", np.arange(1000, dtype=np.uint16))
    os.makedirs(d / "bad_manifest")
    for name in ("t_val_000000.npy", "t_train_000001.npy"):
        os.link(d / "data" / name, d / "bad_manifest" / name)
    (d / "bad_manifest" / "manifest.json").write_text('{"complete": true,\n "shards": [\n')
    (d / "a_file").write_text("not a folder")
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    (d / "notes.xyz").write_text("text")
    (d / "log.txt").write_text("")
    os.makedirs(d / "texts")
    (d / "texts" / "a.txt").write_text("some text")
    os.makedirs(d / "bert")
    (d / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (d / "bert" / "vocab.txt").write_text("[PAD]")
    os.makedirs(d / "cut_hf")  # a Hugging Face GPT-2 folder whose weights were cut short
    config = dict(n_positions=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)
    (d / "cut_hf" / "config.json").write_text(json.dumps(config))
    save_file({"wte.weight": torch.zeros(50257, 32)}, d / "cut_hf" / "model.safetensors")
    with open(d / "cut_hf" / "model.safetensors", "r+b") as f:
        f.truncate(100000)
    return d


CASES = [  # (tool, arguments, words the error line must hold); {d} is the fixture's folder
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--total_batch_size", "0"],
        "--total_batch_size 0",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--n_head", "3"],
        "not divisible by --n_head 3",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--device", "tpu"],
        "unknown --device 'tpu'",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--optimizer", "sgd"],
        "argument --optimizer: invalid choice: 'sgd'",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--optimizer", "muon", "--muon_lr", "0"],
        "--muon_lr 0.0 must be positive",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/missing"],
        "no *_train_*.npy shards; run `python prepare.py",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--log_dir", "{d}/a_file"],
        "is a file, not a folder",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--resume", "{d}/data"],
        "is a folder but not a sharded checkpoint",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--resume", "{d}/random.pt"],
        "random.pt does not load",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/bad_manifest"],
        "manifest.json:3 is not a manifest",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--kernels", "cuda"],
        "--kernels cuda needs a CUDA device",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--init_from", "nope"],
        "'nope' is neither a folder",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--max_lr", "nan"],
        "--max_lr nan is not a finite number",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--fsdp", "--dtype", "float16"],
        "--fsdp with --dtype float16",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/a_file"],
        "--data_dir {d}/a_file is a file; pass the folder",
    ),
    (
        "train_gpt.py",
        TRAIN + ["--data_dir", "{d}/data", "--init_from", "{d}/cut_hf"],
        "cut_hf is not a Hugging Face GPT-2 folder",
    ),
    (
        "train_gpt.py",
        ["--export", "{d}/bert", "--resume", "{d}/random.pt"],
        "--export {d}/bert holds files of another model (vocab.txt)",
    ),
    ("train_gpt.py", ["--sample", "Hi", "--log_dir", "{d}/none"], "--sample needs a checkpoint"),
    (
        "train_gpt.py",
        ["--export", "{d}/hf", "--log_dir", "{d}/none"],
        "--export needs a checkpoint",
    ),
    (
        "train_gpt.py",
        ["--sample", "Hi", "--num_samples", "0", "--log_dir", "{d}/none"],
        "--num_samples 0 must be",
    ),
    ("prepare.py", ["--input", "{d}/missing.txt", "--out_dir", "{d}/out"], "missing.txt"),
    ("prepare.py", ["--input", "{d}/notes.xyz", "--out_dir", "{d}/out"], "notes.xyz"),
    ("prepare.py", ["--input", "{d}/docs.jsonl", "--out_dir", "{d}/out1"], "docs.jsonl line 2"),
    ("prepare.py", ["--input", "{d}/docs.jsonl", "--out_dir", "{d}/a_file"], "a_file"),
    ("prepare.py", ["--input", "{d}/texts", "--out_dir", "{d}/texts"], "is inside --out_dir"),
    ("hellaswag.py", ["--checkpoint", "{d}/missing.pt", "--file", "{d}/docs.jsonl"], "missing.pt"),
    ("hellaswag.py", ["--file", "{d}/docs.jsonl"], "--checkpoint"),
    ("plot.py", ["{d}/missing/log.txt"], "missing"),
    ("plot.py", ["{d}/log.txt", "--x", "tokens"], "tokens_per_step"),
]


@pytest.mark.parametrize(
    "tool, args, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_one_line_and_no_traceback(files, tool, args, words):
    args = [a.format(d=files) for a in args]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, tool)] + args,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=files,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and "error:" in lines[-1] and words.format(d=files) in lines[-1], proc.stderr
