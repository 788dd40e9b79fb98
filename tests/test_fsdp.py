"""--fsdp on CPU (gloo): 2 sharded processes train as 1 plain process does, their checkpoints
(torch.distributed.checkpoint folders) continue with any number of processes, sharded or not,
export to Hugging Face, survive a kill -9 bitwise, and are refused when damaged."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import ROOT, SCRIPT, SMALL, make_shards, read_log, run_script

import train_gpt

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ARGS = SMALL + ["--val_every", "2", "--total_batch_size", "256"]  # 2 micro-batches a process


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data", train_tokens=1500)  # a step crosses shard ends


def losses(log_dir):
    return [(step, stream, float(value)) for step, stream, value in read_log(log_dir)]


def assert_logs_close(a, b, tol=1e-5):
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    assert max(abs(va - vb) for (_, _, va), (_, _, vb) in zip(a, b)) < tol


def continue_in(folder, source, checkpoint):
    """A new log folder holding source's checkpoint and its log up to it, to resume there."""
    os.makedirs(folder)
    for path in glob.glob(os.path.join(source, os.path.basename(checkpoint) + "*")):
        copy = shutil.copytree if os.path.isdir(path) else shutil.copy
        copy(path, os.path.join(folder, os.path.basename(path)))
    shutil.copy(os.path.join(source, "log.txt"), folder)
    return str(folder)


def test_sharded_training_matches_one_process_and_its_checkpoints_go_anywhere(
    data_dir, tmp_path, capsys
):
    run = ARGS + ["--data_dir", data_dir, "--max_steps", "4", "--checkpoint_every", "2"]
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")
    assert run_script(run + ["--log_dir", plain]).returncode == 0
    two = run_script(run + ["--log_dir", sharded, "--fsdp"], launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr
    assert "sharded over 2 processes" in two.stdout and "FSDP2-wrapped" not in two.stderr
    assert_logs_close(losses(plain), losses(sharded))
    checkpoints = train_gpt.list_checkpoints(sharded)
    assert [step for step, _ in checkpoints] == [4, 2]
    newest = checkpoints[0][1]
    assert os.path.isdir(newest) and not glob.glob(os.path.join(sharded, "*.tmp"))
    assert sorted(os.listdir(newest)) == [
        ".metadata",
        "SHA256SUMS",
        "__0_0.distcp",
        "__1_0.distcp",
    ]

    # the sharded checkpoint at step 2 continues in one plain process, as the sharded run went on
    plain_again = continue_in(tmp_path / "plain_again", sharded, checkpoints[1][1])
    assert train_gpt.main(["--log_dir", plain_again, "--resume", "auto", "--no-fsdp"]) == 0
    assert_logs_close(losses(plain_again), losses(sharded))
    # and a single-file checkpoint continues sharded
    from_file = continue_in(tmp_path / "from_file", plain, os.path.join(plain, "model_00002.pt"))
    again = run_script(["--log_dir", from_file, "--resume", "auto", "--fsdp"], launcher=TORCHRUN)
    assert again.returncode == 0, again.stderr
    assert_logs_close(losses(from_file), losses(plain))

    # --sample and --export read it in one process; transformers loads the export
    transformers = pytest.importorskip("transformers")
    capsys.readouterr()
    assert train_gpt.main(["--resume", newest, "--sample", "Hi", "--num_samples", "1"]) == 0
    assert capsys.readouterr().out.count("sample 0: 'Hi") == 1
    hf = str(tmp_path / "hf")
    assert train_gpt.main(["--resume", newest, "--export", hf]) == 0
    model, _ = train_gpt.model_from_checkpoint(newest)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ours = model.eval()(idx)[0][..., :50257]
        torch.testing.assert_close(theirs(idx).logits, ours, atol=2e-5, rtol=1e-4)

    # a damaged shard: refused by name, skipped by --resume auto
    with open(os.path.join(newest, "__1_0.distcp"), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(os.urandom(4096))
    assert train_gpt.main(["--resume", newest, "--export", str(tmp_path / "hf2")]) == 2
    assert "does not match the sha256 recorded" in capsys.readouterr().err
    assert train_gpt.main(["--log_dir", sharded, "--resume", "auto", "--max_steps", "5"]) == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint" in err and "resuming " + checkpoints[1][1] in out


def test_a_killed_sharded_run_resumes_bitwise(data_dir, tmp_path):
    run = ARGS + ["--data_dir", data_dir, "--max_steps", "8", "--checkpoint_every", "1"]
    run += ["--fsdp", "--keep_checkpoints", "0"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    full = run_script(run + ["--log_dir", whole], launcher=TORCHRUN)
    assert full.returncode == 0, full.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        TORCHRUN + [SCRIPT] + run + ["--log_dir", killed],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the launcher and both workers
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(train_gpt.list_checkpoints(killed)) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # often inside a checkpoint's save
    proc.wait(timeout=60)
    resumed = run_script(run + ["--log_dir", killed, "--resume", "auto"], launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr
    assert read_log(killed) == read_log(whole)  # the same text: bitwise the same losses
    assert not glob.glob(os.path.join(killed, "*.tmp"))  # a cut-short save's folder is gone
    a = train_gpt.model_from_checkpoint(os.path.join(whole, "model_00008"))[0].state_dict()
    b = train_gpt.model_from_checkpoint(os.path.join(killed, "model_00008"))[0].state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_fsdp_without_torchrun_trains_unsharded(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = ARGS + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "1", "--fsdp"]
    assert train_gpt.main(args) == 0
    assert "(--fsdp without torchrun: nothing to shard)" in capsys.readouterr().out
    assert [os.path.basename(p) for _, p in train_gpt.list_checkpoints(log_dir)] == [
        "model_00001.pt"
    ]


def test_muon_sharded_matches_one_process_and_resumes_unsharded(data_dir, tmp_path):
    """torch.optim.Muon takes the sharded matrices and orthogonalizes each whole (not shard by
    shard): the losses differ from one process only by its bfloat16 Newton-Schulz rounding."""
    run = ARGS + ["--data_dir", data_dir, "--max_steps", "4", "--checkpoint_every", "2"]
    run += ["--optimizer", "muon"]
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")
    assert run_script(run + ["--log_dir", plain]).returncode == 0
    two = run_script(run + ["--log_dir", sharded, "--fsdp"], launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr
    assert_logs_close(losses(plain), losses(sharded), tol=2e-4)
    step2 = os.path.join(sharded, "model_00002")
    plain_again = continue_in(tmp_path / "plain_again", sharded, step2)
    assert train_gpt.main(["--log_dir", plain_again, "--resume", "auto", "--no-fsdp"]) == 0
    assert_logs_close(losses(plain_again), losses(sharded), tol=2e-4)
