"""bench.py on CPU: the suite dispatcher, the suites that run without a GPU on small inputs, the GPU suites'
clean skip, and the records they append to bench/RESULTS.md. The numbers are not checked (they are
measurements); that each suite runs, prints its table and records what it printed is."""

import re

import pytest
import torch

import bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths of bench.py")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """bench/RESULTS.md redirected to a temporary folder; yields the path of the file records append to."""
    (tmp_path / "bench").mkdir()
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "bench.py"))
    return tmp_path / "bench" / "RESULTS.md"


def test_help_lists_every_suite_and_unknown_suites_are_refused(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("tokenize", "train", "hellaswag", "attention", "kernels", "cross_entropy"):
        assert re.search(rf"^  {name}\s", out, re.M), name
    assert bench.main(["nope"]) == 2
    assert "unknown suite 'nope'; choose from: tokenize" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["attention", "kernels", "cross_entropy"])
def test_gpu_suites_skip_cleanly_without_a_gpu(suite, capsys, results):
    assert bench.main([suite, "--record"]) == 0
    assert capsys.readouterr().out.strip() == f"{suite}: needs a CUDA GPU; skipped"
    assert not results.exists()  # nothing measured, nothing recorded


def test_train_suite_on_cpu(capsys, results):
    assert bench.main(["train", "--model", "tiny", "--block_size", "64", "--configs", "torch,cuda", "--steps", "1",
                       "--warmup", "1", "--record"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^torch\s+4\s+([\d,]+)\s+-\s+-\s+([\d.]+)$", out, re.M)
    assert row, out
    assert int(row.group(1).replace(",", "")) > 0 and 9.0 < float(row.group(2)) < 12.0  # ~ln(50257) at init
    assert re.search(r"^cuda\s+skipped: needs a CUDA device$", out, re.M)
    text = results.read_text()
    assert text.startswith("\n## train: ") and "commit " in text
    assert "`python bench.py train --model tiny" in text and row.group(0) in text


def test_tokenize_suite_on_cpu(capsys, results):
    assert bench.main(["tokenize", "--mb", "0.1", "--num_proc", "1", "--repeat", "1", "--record"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^1\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)", out, re.M)
    assert row, out
    single, pipeline = (int(row.group(i).replace(",", "")) for i in (1, 2))
    assert single > 0 and pipeline > 0 and float(row.group(4)) == pytest.approx(pipeline / single, abs=0.006)
    assert re.search(r"^  1 procs: ratio [\d.]+ >= 0\.8: (yes|NO)", out, re.M)
    assert "## tokenize: " in results.read_text() and row.group(0) in results.read_text()


def test_hellaswag_suite_on_cpu(capsys, results, monkeypatch):
    import hellaswag
    monkeypatch.setattr(hellaswag, "find_data", lambda split: None)  # the synthetic val-shaped data
    assert bench.main(["hellaswag", "--limit", "2", "--repeat", "1", "--record"]) == 0
    out = capsys.readouterr().out
    assert "model random d12 (124M); data synthetic (val-shaped): 2 examples" in out
    rate = re.search(r"= ([\d.,]+) examples/s: the 10,042-example val split would take ([\d.,]+) s", out)
    assert rate, out
    examples_per_s, seconds = (float(rate.group(i).replace(",", "")) for i in (1, 2))
    assert seconds == pytest.approx(10042 / examples_per_s, rel=0.01)
    assert "goals" not in out  # the 10 s goal is an H100's: not judged on a CPU
    text = results.read_text()
    assert "## hellaswag: " in text and rate.group(0) in text
