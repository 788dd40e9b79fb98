"""bench.py on CPU: the suite dispatcher, flag checks, the suites that run without a GPU on small
inputs, the GPU suites' clean skip, and the records appended to bench/RESULTS.md. The numbers are
measurements, so they are not checked beyond being consistent; that each suite runs, prints its
table and records what it printed is."""

import random
import re

import pytest
import torch

import bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths of bench.py")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """bench/RESULTS.md redirected to a temporary folder;
    yields the path of the file records append to."""
    (tmp_path / "bench").mkdir()
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "bench.py"))
    return tmp_path / "bench" / "RESULTS.md"


def test_help_lists_every_suite_and_bad_input_is_one_line(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in bench.SUITES:
        assert f"python bench.py {name} " in out, name
    assert bench.main(["nope"]) == 2
    assert (
        capsys.readouterr().err
        == "error: unknown suite 'nope'; choose from: train, kernels, attention, "
        "cross_entropy, hellaswag, tokenize, memory, quality (or all)\n"
    )
    assert bench.main(["tokenize", "--mb", "0"]) == bench.USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --mb 0.0 must be positive\n"
    assert bench.main(["attention", "--T", "1024", "-5"]) == bench.USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --T [1024, -5] must be positive\n"


@pytest.mark.parametrize("suite", ["attention", "kernels", "cross_entropy"])
def test_gpu_suites_skip_cleanly_without_a_gpu(suite, capsys, results):
    assert bench.main([suite, "--record"]) == 0
    assert capsys.readouterr().out.strip() == f"{suite}: needs a CUDA GPU; skipped"
    assert not results.exists()  # nothing measured, nothing recorded


def test_train_suite_on_cpu(capsys, results):
    assert (
        bench.main(
            [
                "train",
                "--model",
                "tiny",
                "--block_size",
                "64",
                "--configs",
                "torch",
                "--steps",
                "1",
                "--record",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    row = re.search(r"^torch\s+4\s+([\d,]+)\s+-\s+-\s+([\d.]+)$", out, re.M)
    assert row, out
    assert (
        int(row.group(1).replace(",", "")) > 0 and 9.0 < float(row.group(2)) < 12.0
    )  # ~ln(50257) at init
    text = results.read_text()
    assert (
        text.startswith("\n## train: ")
        and "commit " in text
        and "`python bench.py train --model tiny" in text
    )
    assert row.group(0) in text
    assert (
        bench.main(["train", "--model", "tiny", "--configs", "cuda"]) == bench.USER_ERROR_EXIT
    )  # asked for, but no GPU here
    assert "error: --kernels cuda needs a CUDA device" in capsys.readouterr().err


def test_tokenize_suite_on_cpu(capsys, results):
    assert bench.main(["tokenize", "--mb", "0.1", "--num_proc", "1", "--record"]) == 0
    out = capsys.readouterr().out
    row = re.search(
        r"^1\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+goal >= 0\.8: (met|missed)$", out, re.M
    )
    assert row, out
    single, pipeline = (int(row.group(i).replace(",", "")) for i in (1, 2))
    assert (
        single > 0
        and pipeline > 0
        and float(row.group(4)) == pytest.approx(pipeline / single, abs=0.006)
    )
    assert (row.group(5) == "met") == (float(row.group(4)) >= 0.8)
    assert "## tokenize: " in results.read_text() and row.group(0) in results.read_text()


def test_hellaswag_suite_on_cpu(capsys, results, monkeypatch):
    import hellaswag

    monkeypatch.setattr(hellaswag, "find_data", lambda split: None)  # the synthetic val-shaped data
    assert bench.main(["hellaswag", "--model", "tiny", "--limit", "2", "--record"]) == 0
    out = capsys.readouterr().out
    assert "model tiny on synthetic (val-shaped)" in out
    rate = re.search(
        r"for 2 examples = ([\d.,]+) examples/s: "
        r"the 10,042-example val split would take ([\d.,]+) s",
        out,
    )
    assert rate, out
    examples_per_s, seconds = (float(rate.group(i).replace(",", "")) for i in (1, 2))
    assert seconds == pytest.approx(10042 / examples_per_s, rel=0.01)
    assert "goal" not in out  # the 10 s goal is an H100's: not judged on a CPU
    text = results.read_text()
    assert "## hellaswag: " in text and rate.group(0) in text


def test_quality_suite_on_cpu(capsys, results, tmp_path):
    rng = random.Random(0)
    paragraphs = [" ".join(bench.sentence(rng, 5, 20) for _ in range(4)) for _ in range(300)]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(paragraphs))
    argv = ["quality", "--text", str(text), "--shard_size", "2000", "--tokens", "512"]
    argv += ["--batch_size", "2", "--block_size", "32", "--total_batch_size", "128"]
    assert bench.main(argv + ["--evals", "2", "--val_steps", "1", "--record"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^([\d,]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["0", "256", "512"], out  # before training, after 2 and 4 steps
    assert rows[0][1] == rows[0][2]  # the same model at the start
    final = re.search(r"^final val loss: adamw ([\d.]+), muon ([\d.]+)$", out, re.M)
    assert final and final.groups() == rows[-1][1:]
    verdict = re.search(
        r"^muon (reaches|does not reach) adamw's final val loss .*\(goal <= 75%", out, re.M
    )
    assert verdict, out
    assert "float32, 4 steps of 128 tokens (B=2, T=32), 1 warmup step, cosine" in out
    text = results.read_text()
    assert "## quality: " in text and "`python bench.py quality --text" in text
    assert final.group(0) in text and verdict.group(0) in text


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 11.0), (100, 8.0), (200, 6.0), (300, 5.0)]
    assert bench.tokens_to_reach(curve, 7.0, 400) == (
        "muon reaches adamw's final val loss 7.0000 at 150 tokens, 38% of adamw's 400 "
        "(goal <= 75% of adamw's tokens: met)"
    )
    assert "at 300 tokens, 75% of adamw's 400 (goal <= 75% of adamw's tokens: met)" in (
        bench.tokens_to_reach(curve, 5.0, 400)
    )
    assert bench.tokens_to_reach(curve, 4.9, 300) == (
        "muon does not reach adamw's final val loss 4.9000 in 300 tokens "
        "(goal <= 75% of adamw's tokens: missed)"
    )


def test_table_aligns_and_goal_says_met_or_missed():
    assert bench.table(["name", "n"], [["a", 1], ["bbb", 22]]) == [
        "name   n",
        "a      1",
        "bbb   22",
    ]
    assert (
        bench.goal(">= 0.8", True) == "goal >= 0.8: met"
        and bench.goal("< 10 s", False) == "goal < 10 s: missed"
    )


def test_memory_suite_computes_and_measures_the_state_per_process(capsys, results):
    argv = ["memory", "--measure", "tiny:ddp:1", "tiny:fsdp:2", "--record"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    d12 = re.search(r"^d12\s+124\.5M\s+1\.85 GiB\s+949\.7 MiB\s+474\.8 MiB\s+237\.4 MiB", out, re.M)
    assert d12, out  # 16 bytes a weight, 1/N of them sharded
    assert "(goal d48 on 8 x 24 GB: met)" in out
    measured = re.findall(r"^tiny\s+(ddp|fsdp)\s+(\d)\s+([\d.]+) MiB.*\s([\d.]+)\s+-$", out, re.M)
    assert [(mode, n) for mode, n, _, _ in measured] == [("ddp", "1"), ("fsdp", "2")], out
    assert float(measured[1][2]) == pytest.approx(float(measured[0][2]) / 2, rel=0.01)
    assert all(float(ratio) == pytest.approx(1.0, abs=0.01) for *_, ratio in measured)
    assert "`python bench.py memory --measure tiny:ddp:1 tiny:fsdp:2" in results.read_text()
