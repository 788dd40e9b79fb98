"""plot.py: parsing edge cases, the summary numbers, and real PNGs from synthetic logs in both formats."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import plot


# -----------------------------------------------------------------------------
# synthetic logs

def fake_run(steps=600, val_every=100, seed=0, extra_stream=None):
    """Lines of a plausible run: falling noisy train loss, val and hella every val_every steps."""
    rng = np.random.default_rng(seed)
    lines = []
    for s in range(steps):
        level = 3.0 + 8.0 * math.exp(-s / 80)
        if s % val_every == 0 or s == steps - 1:
            lines.append(f"{s} val {level + 0.05:.4f}")
            lines.append(f"{s} hella {0.25 + 0.05 * s / steps:.4f}")
        lines.append(f"{s} train {level + rng.normal(0, 0.1):.6f}")
        if extra_stream and s % 10 == 0:
            lines.append(f"{s} {extra_stream} {6e-4 * min(1.0, s / 100):.6e}")
    return lines


def write_arcana_run(folder, lines, tokens_per_step=524288):
    """train_gpt.py's layout: log.txt plus run.json beside it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"tokens_per_step": tokens_per_step, "config": {"n_layer": 12}}, f)
    return os.path.join(folder, "log.txt")


def write_nanogpt_log(folder, lines, tail=""):
    """build-nanogpt's layout: log.txt alone. tail is appended raw (a line still being written)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "log.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + tail)
    return path


def write_text(tmp_path, text, name="log.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_real_png(path, n_panels=2):
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == plot.png_size(n_panels)
    pixels = np.asarray(img.convert("RGB")).astype(np.int32)
    # a blank or single-colour image has no spread; lines, text and legend give hundreds of colours
    assert pixels.std() > 10
    colours = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # one int per RGB triple
    assert len(np.unique(colours)) > 100


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".plot-")]


# -----------------------------------------------------------------------------
# PNGs

def test_png_geometry_is_documented():
    assert plot.png_size() == (1400, 500)
    assert plot.png_size(3) == (2100, 500)


def test_arcana_log_dir_gives_png_next_to_it(tmp_path, capsys):
    log = write_arcana_run(tmp_path / "run1" / "log", fake_run(extra_stream="lr"))
    assert plot.main([os.path.dirname(log)]) == 0
    out = tmp_path / "run1" / "log" / "plot.png"
    assert_real_png(out)
    assert leftovers(out.parent) == []
    printed = capsys.readouterr().out
    assert "lr" in printed and "--streams lr" in printed  # the unplotted stream is pointed out


def test_nanogpt_log_gives_png(tmp_path):
    log = write_nanogpt_log(tmp_path / "log", fake_run(seed=1), tail="600 tra")
    out = tmp_path / "nano.png"
    assert plot.main([log, "-o", str(out)]) == 0
    assert_real_png(out)


def test_overlay_extra_stream_and_tokens(tmp_path, capsys):
    a = write_arcana_run(tmp_path / "a" / "log", fake_run(extra_stream="lr"), tokens_per_step=1000)
    b = write_nanogpt_log(tmp_path / "b" / "log", fake_run(steps=400, seed=2))
    out = tmp_path / "both.png"
    argv = [a, b, "-o", str(out), "--streams", "lr", "--x", "tokens", "--tokens_per_step", "2000",
            "--labels", "arcana,nano", "--size", "350m", "--smooth", "20"]
    assert plot.main(argv) == 0
    assert_real_png(out, n_panels=3)
    printed = capsys.readouterr().out
    assert "arcana" in printed and "nano" in printed


def test_tokens_axis_uses_run_json_and_flag_fills_in(tmp_path):
    a = write_arcana_run(tmp_path / "a" / "log", fake_run(steps=300), tokens_per_step=1000)
    b = write_nanogpt_log(tmp_path / "b" / "log", fake_run(steps=200))
    logs = plot.load_logs([a, b], tokens_per_step=7, need_tokens=True)
    assert [log.tokens_per_step for log in logs] == [1000, 7]  # run.json wins where it exists
    fig = plot.build_figure(logs, x_unit="tokens")
    loss_lines = fig.axes[0].get_lines()
    assert max(np.max(line.get_xdata()) for line in loss_lines) == 299 * 1000
    assert fig.axes[0].get_xlabel() == "tokens"


def test_baselines_follow_size(tmp_path):
    logs = plot.load_logs([write_nanogpt_log(tmp_path, fake_run(steps=50))])

    def hlines(ax):
        return sorted(round(float(line.get_ydata()[0]), 4) for line in ax.get_lines() if line.get_linestyle() == "--")

    fig = plot.build_figure(logs, size="124M")
    assert hlines(fig.axes[0]) == [3.2924]
    assert hlines(fig.axes[1]) == [0.2945, 0.337]
    fig = plot.build_figure(logs, size="1558M")
    assert hlines(fig.axes[0]) == []  # GPT-2's val loss is only known for 124M
    assert hlines(fig.axes[1]) == [0.4889, 0.547]
    fig = plot.build_figure(logs, size=None)
    assert hlines(fig.axes[0]) == [] and hlines(fig.axes[1]) == []


# -----------------------------------------------------------------------------
# parsing

def test_parse_both_formats_and_sorts_steps(tmp_path):
    streams, problems = plot.parse_log(write_text(tmp_path, "0 val 10.9466\n0 hella 0.2479\n0 train 10.955063\n"
                                                            "2 train 9.5\n1 train 10.1\n"))
    assert problems == []
    steps, values = streams["train"]
    assert steps.tolist() == [0, 1, 2] and values.tolist() == [10.955063, 10.1, 9.5]
    assert streams["val"][1].tolist() == [10.9466]
    assert streams["hella"][1].tolist() == [0.2479]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path, capsys):
    text = "0 train 10.9\n1 train\nx train 3.0\n2 train abc\n-3 train 1.0\n3 train 9.0 extra\n\n4 train 8.5\n"
    path = write_text(tmp_path, text)
    streams, problems = plot.parse_log(path)
    assert streams["train"][0].tolist() == [0, 4]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert plot.main([path, "-o", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and f"{path}:6:" in err and f"{path}:7:" not in err  # blank line 7 is no problem


def test_partial_last_line_is_ignored_silently(tmp_path, capsys):
    path = write_text(tmp_path, "0 train 10.9\n1 train 10.5\n2 tr")
    streams, problems = plot.parse_log(path)
    assert streams["train"][0].tolist() == [0, 1] and problems == []
    # even a cut that still looks like a number: it may be "9.8" of "9.876543"
    streams, problems = plot.parse_log(write_text(tmp_path, "0 train 10.9\n1 train 9.8"))
    assert streams["train"][0].tolist() == [0] and problems == []
    assert plot.main([path, "-o", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().err == ""


def test_repeated_steps_later_value_wins(tmp_path):
    text = "0 train 11.0\n1 train 10.0\n2 train 9.0\n100 val 5.0\n1 train 7.0\n2 train 6.0\n100 val 4.0\n"
    streams, _ = plot.parse_log(write_text(tmp_path, text))
    assert streams["train"][0].tolist() == [0, 1, 2]
    assert streams["train"][1].tolist() == [11.0, 7.0, 6.0]
    assert streams["val"][1].tolist() == [4.0]


def test_crlf_and_unknown_streams(tmp_path):
    path = write_text(tmp_path, "0 train 10.9\r\n0 grad_norm 1.5\r\n10 grad_norm 0.9\r\n")
    streams, problems = plot.parse_log(path)
    assert problems == []
    assert streams["grad_norm"][1].tolist() == [1.5, 0.9]
    logs = plot.load_logs([path])
    assert plot.extra_stream_names(logs) == ["grad_norm"]
    assert len(plot.build_figure(logs).axes) == 2  # not drawn unless asked for
    assert len(plot.build_figure(logs, extra_streams=["grad_norm"]).axes) == 3


# -----------------------------------------------------------------------------
# errors a user can cause: one line, non-zero exit, no traceback

def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "log.txt")
    assert plot.main([missing]) != 0
    assert missing in one_line_error(capsys)


def test_folder_without_log(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) != 0
    assert "log.txt" in one_line_error(capsys)


@pytest.mark.parametrize("text", ["", "\n\n", "0 tra"])
def test_empty_log(tmp_path, capsys, text):
    path = write_text(tmp_path, text)
    assert plot.main([path]) != 0
    err = one_line_error(capsys)
    assert path in err and "--watch" in err
    assert not (tmp_path / "plot.png").exists()


def test_unknown_size(tmp_path, capsys):
    path = write_text(tmp_path, "0 train 10.9\n")
    assert plot.main([path, "--size", "125M"]) == 2
    err = one_line_error(capsys)
    assert "'125M'" in err and "1558M" in err and "none" in err


def test_labels_count_mismatch(tmp_path, capsys):
    path = write_text(tmp_path, "0 train 10.9\n")
    assert plot.main([path, "--labels", "a,b"]) == 2
    err = one_line_error(capsys)
    assert "2 label(s) for 1 log(s)" in err


def test_tokens_without_tokens_per_step(tmp_path, capsys):
    path = write_nanogpt_log(tmp_path / "log", fake_run(steps=20))
    assert plot.main([path, "--x", "tokens"]) != 0
    err = one_line_error(capsys)
    assert "run.json" in err and "--tokens_per_step" in err


def test_bad_run_json(tmp_path, capsys):
    path = write_arcana_run(tmp_path / "log", fake_run(steps=20))
    (tmp_path / "log" / "run.json").write_text('{"tokens_per_step": "lots"}')
    assert plot.main([path, "--x", "tokens"]) != 0
    assert "'lots'" in one_line_error(capsys)


def test_unknown_stream_requested(tmp_path, capsys):
    path = write_arcana_run(tmp_path / "log", fake_run(steps=20, extra_stream="lr"))
    assert plot.main([path, "--streams", "lrr"]) != 0
    err = one_line_error(capsys)
    assert "lrr" in err and "lr" in err


def test_help_and_bad_out(tmp_path, capsys):
    assert plot.main(["--help"]) == 0
    assert "1400 x 500" in capsys.readouterr().out
    path = write_text(tmp_path, "0 train 10.9\n")
    assert plot.main([path, "-o", str(tmp_path / "plot.jpg")]) == 2
    assert ".png" in one_line_error(capsys)
    assert plot.main([path, "-o", str(tmp_path / "no" / "plot.png")]) == 2
    assert "does not exist" in one_line_error(capsys)


# -----------------------------------------------------------------------------
# summary

def test_summary_numbers(tmp_path):
    text = ("0 val 11.0\n0 hella 0.25\n0 train 11.0\n1 train 4.0\n2 train nan\n3 train 3.5\n4 train 3.5\n"
            "5 train 3.9\n5 val 3.6\n5 hella 0.31\n7 val 3.7\n7 hella 0.31\n8 lr 0.1\n")
    (log,) = plot.load_logs([write_text(tmp_path, text)])
    s = plot.summarize(log)
    assert s.last_step == 8
    assert s.min_train == (3.5, 3)  # NaN skipped; the first step on a tie
    assert s.min_val == (3.6, 5)
    assert s.max_hella == (0.31, 5)
    table = plot.format_summary([s])
    assert "3.5000 @ 3" in table and "3.6000 @ 5" in table and "0.3100 @ 5" in table


def test_summary_of_run_without_evals(tmp_path):
    (log,) = plot.load_logs([write_text(tmp_path, "0 train 10.0\n1 train 9.0\n")])
    s = plot.summarize(log)
    assert (s.last_step, s.min_train, s.min_val, s.max_hella) == (1, (9.0, 1), None, None)
    assert plot.format_summary([s]).splitlines()[1].split()[-2:] == ["-", "-"]


def test_default_labels_tell_runs_apart(tmp_path):
    a = str(tmp_path / "runA" / "log" / "log.txt")
    b = str(tmp_path / "runB" / "log" / "log.txt")
    c = str(tmp_path / "other" / "log.txt")
    assert plot.default_labels([a, b]) == ["runA/log", "runB/log"]
    assert plot.default_labels([a, c]) == ["log", "other"]


def test_smooth():
    assert plot.smooth([1, 2, 3, 4, 5], 1).tolist() == [1, 2, 3, 4, 5]
    # centred; at the start the window shrinks to stay centred, at the newest point it is cut short
    assert plot.smooth([1, 2, 3, 4, 5], 3).tolist() == [1, 2, 3, 4, 4.5]
    assert plot.smooth([10, 8, 6, 4, 2, 0], 4).tolist() == [10, 8, 7, 5, 3, 2]
    assert plot.smooth([1, float("nan"), 3], 3).tolist() == [1, 2, 3]


# -----------------------------------------------------------------------------
# --watch

def test_watch_redraws_as_the_log_grows(tmp_path, capsys):
    lines = fake_run(steps=300)
    path = write_nanogpt_log(tmp_path / "log", lines[:100], tail="50 tr")
    out = tmp_path / "live.png"
    args = plot.parse_args([path, "-o", str(out), "--watch", "30"])
    sleeps = []

    def sleep(seconds):
        assert out.exists()  # the first round has drawn before the first wait
        sleeps.append(seconds)
        write_nanogpt_log(tmp_path / "log", lines)  # the run moves on between redraws

    assert plot.watch(args, rounds=2, sleep=sleep) == 0
    assert sleeps == [30]  # no wait after the last round
    assert_real_png(out)
    assert leftovers(tmp_path / "log") == [] and leftovers(tmp_path) == []
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("log ")]
    assert [int(line.split()[1]) for line in summaries] == [97, 299]  # the last step, before and after


def test_watch_waits_for_an_empty_log_and_stops_on_ctrl_c(tmp_path, capsys):
    path = write_text(tmp_path, "")
    args = plot.parse_args([path, "--watch", "5"])
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 1:
            (tmp_path / "log.txt").write_text("0 train 10.9\n0 val 10.95\n")
        else:
            raise KeyboardInterrupt

    assert plot.watch(args, sleep=sleep) == 0
    printed = capsys.readouterr().out
    assert "waiting for lines" in printed and "wrote" in printed
    assert_real_png(tmp_path / "plot.png")


def test_watch_missing_file_fails_at_start(tmp_path, capsys):
    assert plot.main([str(tmp_path / "log.txt"), "--watch", "1"]) != 0
    assert "no such file" in one_line_error(capsys)
