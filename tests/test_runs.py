"""What a careless user and a preemptible cluster do to a run: a second trainer in the same folder,
a killed launcher, an export over another model, a user's own files in --log_dir, weights that are
not finite, a checkpoint damaged on disk, and a resume that must continue the run it names."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from test_train import (
    SCRIPT,
    SMALL,
    make_shards,
    read_log,
    run_script,
    start_script,
    wait_for_steps,
)

import prepare
import train_gpt


@pytest.fixture
def data_dir(tmp_path):
    return make_shards(tmp_path / "data")


def last_error(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -----------------------------------------------------------------------------
# one run per folder


def test_a_second_trainer_in_the_same_folder_is_refused(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    first = start_script(args + ["--max_steps", "400", "--checkpoint_every", "0"])
    try:
        wait_for_steps(log_dir, 1)
        second = run_script(args + ["--max_steps", "2", "--resume", "auto"])
        assert second.returncode == prepare.USER_ERROR_EXIT
        assert "Traceback" not in second.stderr
        error = last_error(second.stderr)
        assert f"--log_dir {log_dir} is being written by another train_gpt.py" in error
        assert f"pid {first.pid} on " in error
    finally:
        first.send_signal(signal.SIGTERM)  # finishes its step and checkpoints
        first.communicate(timeout=120)
    assert first.returncode == 0
    steps = len(read_log(log_dir, "train"))
    assert [s for s, _ in train_gpt.list_checkpoints(log_dir)] == [steps]  # nothing of the second
    again = run_script(args + ["--max_steps", str(steps + 1), "--resume", "auto"])
    assert again.returncode == 0, again.stderr  # the lock went with the first process


def test_the_workers_of_a_killed_launcher_keep_the_folder(data_dir, tmp_path):
    """kill -9 of torchrun alone leaves its workers training: a restart into the same folder is
    refused while they run, and the folder is free once they end."""
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    quiet = subprocess.DEVNULL  # no pipe that fills up once the launcher no longer reads it
    first = start_script(args + ["--max_steps", "400", "--checkpoint_every", "0"], launcher, quiet)
    workers = []
    try:
        wait_for_steps(log_dir, 1)
        found = subprocess.run(["pgrep", "-f", f"{SCRIPT}.*{log_dir}"], capture_output=True)
        workers = [int(pid) for pid in found.stdout.split() if int(pid) != first.pid]
        assert len(workers) == 2
        first.kill()
        first.wait(timeout=60)
        steps = len(read_log(log_dir, "train"))
        time.sleep(1)
        assert len(read_log(log_dir, "train")) > steps  # the orphaned workers train on
        second = run_script(args + ["--max_steps", "2", "--resume", "auto"])
        assert second.returncode == prepare.USER_ERROR_EXIT
        assert "is being written by another train_gpt.py (pid " in last_error(second.stderr)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 30
    while time.time() < deadline:
        if all(not os.path.exists(f"/proc/{pid}") for pid in workers):
            break
        time.sleep(0.1)
    steps = len(read_log(log_dir, "train"))
    again = run_script(args + ["--max_steps", "1", "--resume", "auto"])
    assert again.returncode == 0, again.stderr


def test_a_killed_worker_is_named_in_one_line(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = start_script(args + ["--max_steps", "400", "--checkpoint_every", "0"], launcher)
    try:
        wait_for_steps(log_dir, 1)
        found = subprocess.run(["pgrep", "-f", f"{SCRIPT}.*{log_dir}"], capture_output=True)
        workers = sorted(int(pid) for pid in found.stdout.split() if int(pid) != run.pid)
        os.kill(workers[-1], signal.SIGKILL)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0
    assert "another process of this run stopped" in err and "--resume auto" in err


# -----------------------------------------------------------------------------
# never touch what is not ours


def test_export_writes_only_into_a_new_folder_or_an_earlier_export(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "1"]
    assert train_gpt.main(args) == 0
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "vocab.txt").write_text("[PAD]\n")
    export = ["--resume", "auto", "--log_dir", log_dir, "--export"]
    assert train_gpt.main(export + [str(bert)]) == prepare.USER_ERROR_EXIT
    assert "holds files of another model (vocab.txt)" in capsys.readouterr().err
    assert json.loads((bert / "config.json").read_text()) == {"model_type": "bert"}
    (bert / "vocab.txt").unlink()  # a config.json that is not ours is not ours either
    assert train_gpt.main(export + [str(bert)]) == prepare.USER_ERROR_EXIT
    assert json.loads((bert / "config.json").read_text()) == {"model_type": "bert"}
    hf = tmp_path / "hf"
    assert train_gpt.main(export + [str(hf) + "/"]) == 0  # a new folder
    assert f"to {hf}/ as a Hugging Face" in capsys.readouterr().out  # no double slash
    assert train_gpt.main(export + [str(hf)]) == 0  # an earlier export of ours
    assert json.loads((hf / "config.json").read_text())["arcanagpt"]["step"] == 1
    (tmp_path / "empty").mkdir()
    assert train_gpt.main(export + [str(tmp_path / "empty")]) == 0


def test_a_start_removes_only_our_own_temp_files(data_dir, tmp_path):
    log_dir = tmp_path / "log"
    args = SMALL + ["--data_dir", data_dir, "--log_dir", str(log_dir), "--max_steps", "2"]
    assert train_gpt.main(args) == 0
    ours = ["model_00003.pt.tmp", "model_00003.pt.sha256.tmp", "log.txt.tmp", "run.json.tmp"]
    theirs = ["notes.tmp", "results.csv.tmp", "model_final.pt.tmp"]
    for name in ours + theirs:
        (log_dir / name).write_text("x")
    assert train_gpt.main(args[:-1] + ["3", "--resume", "auto"]) == 0
    left = set(os.listdir(log_dir))
    assert not left & set(ours) and set(theirs) <= left


def test_a_read_only_log_dir_or_export_folder_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "1"]
    assert train_gpt.main(args) == 0
    capsys.readouterr()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(prepare.os, "makedirs", read_only)
    assert train_gpt.main(SMALL + ["--data_dir", data_dir, "--log_dir", str(tmp_path / "ro")]) == 2
    assert "cannot write to --log_dir" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", read_only)  # the folder exists, its files cannot be made
    monkeypatch.setattr(os, "remove", read_only)  # nor the temp file be removed
    export = ["--resume", "auto", "--log_dir", log_dir, "--export", str(tmp_path / "hf")]
    assert train_gpt.main(export) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# never call a bad checkpoint good


def test_weights_that_are_not_finite_are_never_checkpointed(
    data_dir, tmp_path, monkeypatch, capsys
):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    args += ["--checkpoint_every", "2", "--keep_checkpoints", "1", "--max_steps", "8"]
    update = train_gpt.update

    def poisoning_update(run, step):  # an update that leaves one weight NaN from step 3 on
        lr = update(run, step)
        if step >= 3:
            with torch.no_grad():
                run.raw_model.transformer.h[0].ln_1.weight[0] = float("nan")
        return lr

    monkeypatch.setattr(train_gpt, "update", poisoning_update)
    assert train_gpt.main(args) == 1
    err = capsys.readouterr().err
    assert "step 3: the updated weights are not finite" in err and "model_00002.pt" in err
    checkpoints = train_gpt.list_checkpoints(log_dir)
    assert [s for s, _ in checkpoints] == [2]  # the last finite one, kept by the rotation
    ckpt = train_gpt.load_checkpoint(checkpoints[0][1])
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def damage(path, size=16384):
    """Overwrite size bytes in the middle of a checkpoint's largest tensor, leaving its zip
    structure intact."""
    with zipfile.ZipFile(path) as zf:
        largest = max(zf.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(largest.header_offset + largest.file_size // 2)
        f.write(os.urandom(size))


def test_a_checkpoint_damaged_on_disk_is_never_resumed(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--val_every", "0"]
    assert train_gpt.main(args + ["--max_steps", "4", "--checkpoint_every", "2"]) == 0
    newest = os.path.join(log_dir, "model_00004.pt")
    damage(newest)
    torch.load(newest, weights_only=True)  # torch itself sees nothing wrong
    capsys.readouterr()
    for flags in (["--resume", newest], ["--resume", newest, "--sample", "Hi"]):
        assert train_gpt.main(args + flags) == 2
        assert "does not match the sha256 recorded when it was written" in last_error(
            capsys.readouterr().err
        )
    export = ["--resume", newest, "--export", str(tmp_path / "hf")]
    assert train_gpt.main(export) == 2 and not os.path.exists(tmp_path / "hf")
    assert train_gpt.main(args + ["--max_steps", "5", "--resume", "auto"]) == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint" in err and "model_00004.pt does not match" in err
    assert "resuming " + os.path.join(log_dir, "model_00002.pt") in out


# -----------------------------------------------------------------------------
# a resume continues the run it names


def test_resume_auto_continues_the_run_with_its_own_settings(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    run_args = ["--data_dir", data_dir, "--max_steps", "6", "--val_every", "3", "--seed", "7"]
    run_args += ["--checkpoint_every", "3", "--keep_checkpoints", "0", "--log_dir", log_dir]
    assert train_gpt.main(SMALL + run_args) == 0
    full = read_log(log_dir)
    os.remove(os.path.join(log_dir, "model_00006.pt"))
    capsys.readouterr()
    # the bare command continues the run: its data, batch, schedule and evaluations come with it
    assert train_gpt.main(["--log_dir", log_dir, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "settings: data, batch, schedule and evaluations as in" in out
    assert "resuming " + os.path.join(log_dir, "model_00003.pt") in out
    assert read_log(log_dir) == full
    # a flag given over a setting: named in the summary
    assert train_gpt.main(["--log_dir", log_dir, "--resume", "auto", "--max_steps", "7"]) == 0
    assert "settings given anew: --max_steps 7 (was 6)" in capsys.readouterr().out
    assert [s for s, _, _ in read_log(log_dir, "train")] == list(range(7))
    # --sample and --export need no training flags
    assert train_gpt.main(["--log_dir", log_dir, "--resume", "auto", "--sample", "Hi"]) == 0


def test_resume_refuses_a_change_of_the_tokens_it_reads(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir, "--max_steps", "2"]
    assert train_gpt.main(args) == 0
    other = make_shards(tmp_path / "other", seed=3)
    resume = ["--log_dir", log_dir, "--resume", "auto", "--max_steps", "3"]
    for flags, words in [
        (["--data_dir", other], f"--data_dir {other} differs from {data_dir}"),
        (["--seed", "5"], "--seed 5 differs from 1337"),
        (["--shuffle"], "--shuffle True differs from False"),
    ]:
        assert train_gpt.main(resume + flags) == 2
        error = last_error(capsys.readouterr().err)
        assert words in error and "the run would read other tokens" in error
    moved = str(tmp_path / "moved")
    os.rename(data_dir, moved)  # the same shards in another folder: the run goes on
    assert train_gpt.main(resume + ["--data_dir", moved]) == 0


def test_a_manifest_names_the_shards_and_validation_wraps_with_a_warning(tmp_path, capsys):
    data = make_shards(tmp_path / "data", val_tokens=200)
    with open(os.path.join(data, "manifest.json"), "w") as f:
        shards = [{"name": "tok_val_000000.npy", "split": "val"}]
        shards.append({"name": "tok_train_000001.npy", "split": "train"})
        json.dump({"settings": {}, "shards": shards, "complete": True}, f)
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data, "--log_dir", log_dir, "--max_steps", "1"]
    assert train_gpt.main(args + ["--val_steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert "data: " + data + ": 1 train shard(s)" in out
    assert "holds 1 shard file(s) its manifest.json does not list" in err
    assert "tok_train_000002.npy" in err
    assert "each validation reads 256 tokens (--val_steps 2) and the val shards hold" in err


def test_run_json_keeps_the_earlier_starts(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    args = SMALL + ["--data_dir", data_dir, "--log_dir", log_dir]
    assert train_gpt.main(args + ["--max_steps", "1"]) == 0
    assert train_gpt.main(args + ["--max_steps", "2", "--resume", "auto"]) == 0
    with open(os.path.join(log_dir, "run.json")) as f:
        meta = json.load(f)
    assert meta["start_step"] == 1 and meta["earlier"]["start_step"] == 0
