"""plot.py: parsing edge cases, the summary numbers,
errors, --watch, and real PNGs from synthetic logs."""

import json
import math
import os

import matplotlib.colors
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
            lines += [f"{s} val {level + 0.05:.4f}", f"{s} hella {0.25 + 0.05 * s / steps:.4f}"]
        lines.append(f"{s} train {level + rng.normal(0, 0.1):.6f}")
        if extra_stream and s % 10 == 0:
            lines.append(f"{s} {extra_stream} {6e-4 * min(1.0, s / 100):.6e}")
    return lines


def write_log(folder, lines, tail="", tokens_per_step=None):
    """folder/log.txt; with tokens_per_step, a run.json beside it as train_gpt.py writes
    (build-nanogpt: none). tail is appended raw: a line still being written."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write("".join(line + "\n" for line in lines) + tail)
    if tokens_per_step is not None:
        with open(os.path.join(folder, "run.json"), "w") as f:
            json.dump({"tokens_per_step": tokens_per_step, "config": {"n_layer": 12}}, f)
    return os.path.join(folder, "log.txt")


def assert_real_png(path, n_panels=2):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (
        700 * n_panels,
        500,
    )  # the size the docstring and --help give
    pixels = np.asarray(img.convert("RGB")).astype(np.int32)
    # a blank or single-colour image has no spread; lines, text and legend give hundreds of colours
    assert pixels.std() > 10
    assert len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])) > 100
    assert [
        n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")
    ] == []  # no temporary file left


def error_line(capsys):
    """The one line a user error prints: no traceback, nothing else on stderr."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: ")
    return err


def flag_error(capsys, argv):
    """argparse's verdict on a bad flag: exit code 2, its last stderr line names the problem."""
    with pytest.raises(SystemExit) as e:
        plot.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# PNGs


def test_png_geometry_is_documented(capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(["--help"])
    assert e.value.code == 0 and "1400 x 500" in capsys.readouterr().out


def test_arcana_log_dir_gives_png_next_to_it(tmp_path, capsys):
    log = write_log(tmp_path / "run1" / "log", fake_run(extra_stream="lr"), tokens_per_step=524288)
    assert plot.main([os.path.dirname(log)]) == 0
    assert_real_png(str(tmp_path / "run1" / "log" / "plot.png"))
    printed = capsys.readouterr().out
    assert "lr" in printed and "--streams lr" in printed  # the unplotted stream is pointed out
    assert "wrote" in printed and "1400 x 500 px" in printed


def test_nanogpt_log_gives_png(tmp_path):
    log = write_log(tmp_path / "log", fake_run(seed=1), tail="600 tra")
    out = str(tmp_path / "nano.png")
    assert plot.main([log, "-o", out]) == 0
    assert_real_png(out)


def test_overlay_extra_stream_and_tokens(tmp_path, capsys):
    a = write_log(tmp_path / "a" / "log", fake_run(extra_stream="lr"), tokens_per_step=1000)
    b = write_log(tmp_path / "b" / "log", fake_run(steps=400, seed=2))
    out = str(tmp_path / "both.png")
    argv = [
        a,
        b,
        "-o",
        out,
        "--streams",
        "lr",
        "--x",
        "tokens",
        "--tokens_per_step",
        "2000",
        "--labels",
        "arcana,nano",
        "--size",
        "350m",
        "--smooth",
        "20",
    ]
    assert plot.main(argv) == 0
    assert_real_png(out, n_panels=3)
    printed = capsys.readouterr().out
    assert "arcana" in printed and "nano" in printed and "2100 x 500 px" in printed


def test_tokens_axis_uses_run_json_and_flag_fills_in(tmp_path):
    a = write_log(tmp_path / "a" / "log", fake_run(steps=300), tokens_per_step=1000)
    b = write_log(tmp_path / "b" / "log", fake_run(steps=200))
    logs = plot.load_logs([a, b], tokens_per_step=7, need_tokens=True)
    assert [log.tokens_per_step for log in logs] == [1000, 7]  # run.json wins where it exists
    assert [log.label for log in logs] == ["a/log", "b/log"]
    fig = plot.build_figure(logs, x_unit="tokens")
    assert max(np.max(line.get_xdata()) for line in fig.axes[0].get_lines()) == 299 * 1000
    assert fig.axes[0].get_xlabel() == "tokens"


def test_hellaswag_panel_only_where_a_log_has_hella_lines(tmp_path, capsys):
    without = write_log(
        tmp_path / "a", [line for line in fake_run(steps=40) if "hella" not in line]
    )
    assert plot.main([without]) == 0
    assert_real_png(str(tmp_path / "a" / "plot.png"), n_panels=1)
    assert "700 x 500 px" in capsys.readouterr().out
    with_hella = write_log(tmp_path / "b", fake_run(steps=40))
    logs = plot.load_logs([without, with_hella])  # one log with hella lines is enough
    assert [ax.get_title() for ax in plot.build_figure(logs).axes] == ["loss", "HellaSwag"]


def smoothed_train(ax):
    """The legend label and values of the first smoothed train curve on an axis."""
    line = next(line for line in ax.get_lines() if "train" in str(line.get_label()))
    return line.get_label(), line.get_ydata()


def test_default_smoothing_scales_with_the_run(tmp_path):
    short = plot.load_logs([write_log(tmp_path / "short", fake_run(steps=40))])
    label, values = smoothed_train(plot.build_figure(short).axes[0])
    assert label.endswith("(mean of 2)")  # a twentieth of the run's 40 points
    raw = short[0].streams["train"][1]
    assert abs(values[-1] - raw[-1]) < 0.5  # the curve still falls to where the loss ends (~7.9)
    assert abs(plot.smooth(raw, 100)[-1] - raw[-1]) > 1  # where a mean of 100 would flatten it
    long = plot.load_logs([write_log(tmp_path / "long", fake_run(steps=3000))])
    assert smoothed_train(plot.build_figure(long).axes[0])[0].endswith("(mean of 100)")
    tiny = plot.load_logs([write_log(tmp_path / "tiny", fake_run(steps=10))])
    assert smoothed_train(plot.build_figure(tiny).axes[0])[0] == "tiny train"  # a window of 1
    # --smooth N overrides
    assert smoothed_train(plot.build_figure(short, smooth_window=7).axes[0])[0].endswith(
        "(mean of 7)"
    )
    assert plot.parse_args([str(tmp_path / "short")]).smooth is None


def test_train_and_val_of_a_run_are_told_apart(tmp_path):
    a = write_log(tmp_path / "a", fake_run(steps=100))
    b = write_log(tmp_path / "b", fake_run(steps=100, seed=1))
    ax = plot.build_figure(plot.load_logs([a, b])).axes[0]
    color = {}
    for line in ax.get_lines():
        if not str(line.get_label()).startswith("_"):  # the legend's lines, not the raw loss
            color[line.get_label().split(" (")[0]] = matplotlib.colors.to_hex(line.get_color())
    assert color["a train"] != color["a val"] and color["b train"] != color["b val"]
    assert len({color["a train"], color["a val"], color["b train"], color["b val"]}) == 4
    val = next(line for line in ax.get_lines() if line.get_label() == "a val")
    assert val.get_marker() == "o" and val.get_linestyle() != "--"  # dashed lines are baselines


def test_baselines_follow_size(tmp_path):
    logs = plot.load_logs([write_log(tmp_path, fake_run(steps=50))])

    def hlines(ax):
        return sorted(
            round(float(line.get_ydata()[0]), 4)
            for line in ax.get_lines()
            if line.get_linestyle() == "--"
        )

    fig = plot.build_figure(logs, size="124M")
    assert hlines(fig.axes[0]) == [3.2924]
    assert hlines(fig.axes[1]) == [0.2945, 0.337]
    fig = plot.build_figure(logs, size="1558M")
    assert hlines(fig.axes[0]) == []  # GPT-2's val loss is only known for 124M
    assert hlines(fig.axes[1]) == [0.4889, 0.547]
    fig = plot.build_figure(logs, size="NONE")
    assert hlines(fig.axes[0]) == [] and hlines(fig.axes[1]) == []


# -----------------------------------------------------------------------------
# parsing


def test_parse_sorts_steps_and_later_value_wins(tmp_path):
    log = write_log(
        tmp_path,
        [
            "0 val 10.9466",
            "0 hella 0.2479",
            "0 train 10.955063",
            "2 train 9.5",
            "1 train 10.1",
            "100 val 5.0",
            "1 train 7.0",
            "100 val 4.0",
        ],
    )  # a resumed run logs steps 1, 100 again
    streams, problems = plot.parse_log(log)
    assert problems == []
    assert streams["train"][0].tolist() == [0, 1, 2] and streams["train"][1].tolist() == [
        10.955063,
        7.0,
        9.5,
    ]
    assert streams["val"][0].tolist() == [0, 100] and streams["val"][1].tolist() == [10.9466, 4.0]
    assert streams["hella"][1].tolist() == [0.2479]


def test_malformed_lines_are_reported_with_file_and_line(tmp_path, capsys):
    log = write_log(
        tmp_path,
        [
            "0 train 10.9",
            "1 train",
            "x train 3.0",
            "2 train abc",
            "-3 train 1.0",
            "3 train 9.0 extra",
            "",
            "4 train 8.5",
        ],
    )
    streams, problems = plot.parse_log(log)
    assert streams["train"][0].tolist() == [0, 4]
    assert [p.split(": ")[0] for p in problems] == [f"{log}:{n}" for n in (2, 3, 4, 5, 6)]
    assert plot.main([log, "-o", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    assert (
        f"{log}:2:" in err and f"{log}:6:" in err and f"{log}:7:" not in err
    )  # blank line 7 is no problem


def test_warnings_are_capped_per_log(tmp_path, capsys):
    log = write_log(tmp_path, ["0 train 10.9"] + ["garbage"] * 25)
    assert plot.main([log]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == plot.MAX_WARNINGS_PER_LOG + 1 and "15 more malformed lines" in err[-1]


def test_partial_last_line_is_ignored_silently(tmp_path, capsys):
    log = write_log(tmp_path, ["0 train 10.9", "1 train 10.5"], tail="2 tr")
    streams, problems = plot.parse_log(log)
    assert streams["train"][0].tolist() == [0, 1] and problems == []
    assert plot.main([log]) == 0
    assert capsys.readouterr().err == ""
    # even a cut that still looks like a number: it may be "9.8" of "9.876543"
    streams, problems = plot.parse_log(write_log(tmp_path, ["0 train 10.9"], tail="1 train 9.8"))
    assert streams["train"][0].tolist() == [0] and problems == []


def test_crlf_and_unknown_streams(tmp_path):
    log = tmp_path / "log.txt"
    log.write_bytes(b"0 train 10.9\r\n0 grad_norm 1.5\r\n10 grad_norm 0.9\r\n")
    streams, problems = plot.parse_log(str(log))
    assert problems == [] and streams["grad_norm"][1].tolist() == [1.5, 0.9]
    logs = plot.load_logs([str(log)])
    assert len(plot.build_figure(logs).axes) == 1  # not drawn unless asked for; no hella lines
    assert len(plot.build_figure(logs, extra_streams=["grad_norm"]).axes) == 2


def test_default_labels_tell_runs_apart(tmp_path):
    a = str(tmp_path / "runA" / "log" / "log.txt")
    b = str(tmp_path / "runB" / "log" / "log.txt")
    c = str(tmp_path / "other" / "log.txt")
    assert plot.default_labels([a, b]) == ["runA/log", "runB/log"]
    assert plot.default_labels([a, c]) == ["log", "other"]
    assert plot.default_labels([a, a]) == [a, a]


def test_smooth():
    assert plot.smooth([1, 2, 3, 4, 5], 1).tolist() == [1, 2, 3, 4, 5]
    # centred; at the start the window shrinks to stay centred, at the newest point it is cut short
    assert plot.smooth([1, 2, 3, 4, 5], 3).tolist() == [1, 2, 3, 4, 4.5]
    assert plot.smooth([10, 8, 6, 4, 2, 0], 4).tolist() == [10, 8, 7, 5, 3, 2]
    assert plot.smooth([1, float("nan"), 3], 3).tolist() == [1, 2, 3]


# -----------------------------------------------------------------------------
# summary


def test_summary_numbers(tmp_path):
    log = write_log(
        tmp_path,
        [
            "0 val 11.0",
            "0 hella 0.25",
            "0 train 11.0",
            "1 train 4.0",
            "2 train nan",
            "3 train 3.5",
            "4 train 3.5",
            "5 train 3.9",
            "5 val 3.6",
            "5 hella 0.31",
            "7 val 3.7",
            "7 hella 0.31",
            "8 lr 0.1",
        ],
    )
    header, row = plot.format_summary(plot.load_logs([log])).splitlines()
    # last step 8 (any stream); NaN skipped; the first step on a tie
    assert row.split() == [
        os.path.basename(tmp_path),
        "8",
        "3.5000",
        "@",
        "3",
        "3.6000",
        "@",
        "5",
        "0.3100",
        "@",
        "5",
    ]
    assert (
        header.index("last step") + len("last step") == row.index(" 8") + 2
    )  # numbers right-aligned


def test_summary_of_run_without_evals(tmp_path):
    (log,) = plot.load_logs([write_log(tmp_path, ["0 train 10.0", "1 train 9.0"])])
    assert plot.format_summary([log]).splitlines()[1].split()[1:] == [
        "1",
        "9.0000",
        "@",
        "1",
        "-",
        "-",
    ]


# -----------------------------------------------------------------------------
# errors a user can cause: one line, non-zero exit, no traceback


def test_missing_file_and_folder_without_log(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "log.txt")
    assert plot.main([missing]) == plot.USER_ERROR_EXIT
    assert missing in error_line(capsys)
    assert plot.main([str(tmp_path)]) == plot.USER_ERROR_EXIT
    assert os.path.join(str(tmp_path), "log.txt") in error_line(capsys)


@pytest.mark.parametrize("tail", ["", "\n\n", "0 tra"])
def test_empty_log(tmp_path, capsys, tail):
    log = write_log(tmp_path, [], tail=tail)
    assert plot.main([log]) == plot.USER_ERROR_EXIT
    err = error_line(capsys)
    assert log in err and "--watch" in err
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--size", "125M"], ["'125M'", "1558M", "NONE"]),
        (["--labels", "a,b"], ["2 label(s) for 1 log(s)"]),
        (["--smooth", "0"], ["--smooth 0", "above 0"]),
        (["--watch", "-1"], ["--watch -1.0", "above 0"]),
        (["--tokens_per_step", "0"], ["--tokens_per_step 0", "above 0"]),
        (["--x", "epochs"], ["'epochs'", "tokens"]),
    ],
)
def test_bad_flags(tmp_path, capsys, argv, expected):
    line = flag_error(capsys, [write_log(tmp_path, ["0 train 10.9"])] + argv)
    assert all(word in line for word in expected)


def test_bad_out(tmp_path, capsys):
    log = write_log(tmp_path, ["0 train 10.9"])
    assert plot.main([log, "-o", str(tmp_path / "plot.jpg")]) == plot.USER_ERROR_EXIT
    assert ".png" in error_line(capsys)
    assert plot.main([log, "-o", str(tmp_path / "no" / "plot.png")]) == plot.USER_ERROR_EXIT
    assert "cannot write" in error_line(capsys)
    assert os.listdir(tmp_path) == ["log.txt"]


def test_tokens_without_tokens_per_step(tmp_path, capsys):
    log = write_log(tmp_path / "log", fake_run(steps=20))
    assert plot.main([log, "--x", "tokens"]) == plot.USER_ERROR_EXIT
    err = error_line(capsys)
    assert "run.json" in err and "--tokens_per_step" in err


@pytest.mark.parametrize(
    "text, expected", [('{"tokens_per_step": "lots"}', "'lots'"), ("{", "JSON")]
)
def test_bad_run_json(tmp_path, capsys, text, expected):
    log = write_log(tmp_path / "log", fake_run(steps=20), tokens_per_step=1)
    (tmp_path / "log" / "run.json").write_text(text)
    assert plot.main([log]) == 0  # the step axis does not need it
    assert plot.main([log, "--x", "tokens"]) == plot.USER_ERROR_EXIT
    assert expected in error_line(capsys)


def test_unknown_stream_requested(tmp_path, capsys):
    log = write_log(tmp_path / "log", fake_run(steps=20, extra_stream="lr"))
    assert plot.main([log, "--streams", "lrr"]) == plot.USER_ERROR_EXIT
    err = error_line(capsys)
    assert "lrr" in err and "the logs have lr" in err


# -----------------------------------------------------------------------------
# --watch


def test_watch_redraws_when_the_log_changes(tmp_path, capsys):
    lines = fake_run(steps=300)
    log = write_log(tmp_path / "log", lines[:100], tail="50 tr")
    out = tmp_path / "live.png"
    args = plot.parse_args([log, "-o", str(out), "--watch", "30"])
    sleeps = []

    def sleep(seconds):
        assert out.exists()  # each round draws before it waits
        sleeps.append(seconds)
        if len(sleeps) == 1:
            write_log(tmp_path / "log", lines)  # the run moves on between checks
        elif len(sleeps) == 3:
            raise KeyboardInterrupt

    assert plot.run(args, sleep=sleep) == 0
    assert sleeps == [30, 30, 30]
    assert_real_png(str(out))
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("log ")]
    assert [int(line.split()[1]) for line in summaries] == [
        97,
        299,
    ]  # redrawn once per change, not per check


def test_watch_waits_for_an_empty_log_and_stops_on_ctrl_c(tmp_path, capsys):
    log = write_log(tmp_path, [])
    args = plot.parse_args([log, "--watch", "5"])
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 1:
            write_log(tmp_path, ["0 train 10.9", "0 val 10.95"])
        else:
            raise KeyboardInterrupt

    assert plot.run(args, sleep=sleep) == 0
    printed = capsys.readouterr().out
    assert "waiting for lines" in printed and "wrote" in printed
    assert_real_png(str(tmp_path / "plot.png"), n_panels=1)  # no hella lines yet


def test_watch_ends_when_the_log_goes(tmp_path):
    log = write_log(tmp_path, ["0 train 10.9"])
    with pytest.raises(plot.UserError, match="cannot read"):
        plot.run(plot.parse_args([log, "--watch", "5"]), sleep=lambda _: os.remove(log))


def test_watch_fails_at_start(tmp_path, capsys):
    assert plot.main([str(tmp_path / "log.txt"), "--watch", "1"]) == plot.USER_ERROR_EXIT
    assert "no such file" in error_line(capsys)
    log = write_log(tmp_path / "log", fake_run(steps=20))
    assert (
        plot.main([log, "--watch", "1", "--x", "tokens"]) == plot.USER_ERROR_EXIT
    )  # a first drawing that fails ends the watch
    assert "--tokens_per_step" in error_line(capsys)
