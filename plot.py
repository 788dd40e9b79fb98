"""
Plot ArcanaGPT training logs: loss and HellaSwag against OpenAI's GPT-2 and GPT-3, as one PNG.

    python plot.py log/log.txt                         # writes log/plot.png and prints a summary
    python plot.py runA/log runB/log --labels base,new # overlay two runs (a folder: its log.txt)
    python plot.py log/log.txt --x tokens              # x in tokens (run.json's tokens_per_step)
    python plot.py log/log.txt --watch 60              # redraw as the run goes, checked each minute
    python plot.py log/log.txt --streams lr,grad_norm  # a panel per stream named ('all': every one)

Reads the `{step} {stream} {value}` log.txt of train_gpt.py or build-nanogpt (streams train, val,
hella = HellaSwag acc_norm; others via --streams). Each run has its colour: its train loss faint,
with a centred mean over it, and its val loss marked, in a darker shade. The PNG, drawn without a
display, is 700 x 500 pixels a panel: 1400 x 500 for loss and HellaSwag (700 x 500 while no log
has HellaSwag lines).

This file imports prepare.py only (for UserError and atomic_write).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from prepare import USER_ERROR_EXIT, UserError, atomic_write, one_line

# -----------------------------------------------------------------------------
# reference numbers

# OpenAI's GPT-2 checkpoints evaluated on our own data: val loss on the FineWeb-edu val shard (the
# same tokens the val stream is measured on), known for 124M only, and HellaSwag acc_norm on the
# 10,042 validation examples, the metric the hella stream logs. README.md and hellaswag.py quote
# these.
GPT2_VAL_LOSS = {"124M": 3.2924}
GPT2_HELLASWAG = {"124M": 0.2945, "350M": 0.3752, "774M": 0.4320, "1558M": 0.4889}
# GPT-3 zero-shot HellaSwag from the GPT-3 paper (Brown et al. 2020), per model size. GPT-3 has no
# models of exactly GPT-2's sizes; each GPT-2 size is paired with the nearest GPT-3 one, named here
# for the legend.
GPT3_HELLASWAG = {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
GPT3_NAME = {"124M": "125M", "350M": "350M", "774M": "760M", "1558M": "1.3B"}

STANDARD_STREAMS = ("train", "val", "hella")  # the fixed panels; any other stream needs --streams
PANEL_WIDTH, PANEL_HEIGHT, DPI = 7, 5, 100  # inches and dots per inch: 700 x 500 pixels a panel
# Runs get these colours in order. Red and green are kept for the GPT-2 and GPT-3 baselines.
RUN_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:cyan",
    "tab:olive",
    "tab:gray",
)
MAX_WARNINGS_PER_LOG = 10  # a corrupted file should not bury the summary under thousands of them
MAX_SMOOTH = 100  # the widest default window of the train loss's mean, in points


# -----------------------------------------------------------------------------
# reading logs


@dataclass
class Log:
    path: str  # the log.txt read
    label: str  # legend and summary name
    streams: dict  # stream name -> (steps int64 array, values float64 array), sorted by step
    problems: list  # "file:line: why" for each skipped malformed line
    tokens_per_step: int  # for --x tokens


def parse_log(path):
    """{stream: (steps, values)}, and a problem for each complete line that is not
    `{step} {stream} {value}`. A step logged again in a stream (a resumed run) takes the later
    value."""
    try:  # errors="replace": a stray binary byte makes one malformed line, not a crash
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            # [:-1]: the "" after the last newline, or a line still being written (maybe cut
            # mid-number): ignored
            lines = f.read().split("\n")[:-1]
    except OSError as e:  # unreadable, or gone while --watch runs
        raise UserError(
            f"{path}: cannot read it ({e.strerror}); check the path and its permissions"
        ) from None
    points, problems = {}, []
    for number, line in enumerate(lines, start=1):
        fields = line.split()  # also drops the \r of a log edited on Windows
        if not fields:
            continue
        try:
            step, value = int(fields[0]), float(fields[2])
        except (IndexError, ValueError):
            step = -1
        if len(fields) != 3 or step < 0:
            problems.append(
                f"{path}:{number}: {line.strip()[:60]!r} is not '{{step}} {{stream}} {{value}}'; "
                f"skipped"
            )
            continue
        points.setdefault(fields[1], {})[step] = value
    streams = {}
    for name, by_step in points.items():
        steps = sorted(by_step)
        values = [by_step[step] for step in steps]
        streams[name] = (np.array(steps, dtype=np.int64), np.array(values))
    return streams, problems


def default_labels(paths):
    """Name each log by its folder, adding parent folders until the names differ (runA/log,
    runB/log)."""
    parts = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]).lstrip("/") or "/" for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(p) for p in paths]  # the same file twice: nothing tells them apart


def load_logs(paths, labels=None, tokens_per_step=None, need_tokens=False):
    """Parse each log.txt and attach its label and, for need_tokens, its tokens per step: from the
    run.json that train_gpt.py writes beside its log (the run's own record, so it wins), else
    tokens_per_step (build-nanogpt)."""
    logs = []
    for path, label in zip(paths, labels or default_labels(paths)):
        meta_path, tps = os.path.join(os.path.dirname(path), "run.json"), tokens_per_step
        if need_tokens and os.path.exists(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    tps = json.load(f).get("tokens_per_step", tps)
            except (OSError, ValueError, AttributeError) as e:  # unreadable, not a JSON object
                raise UserError(
                    f"{meta_path} is not a readable JSON object ({e}); fix or remove it"
                ) from None
        if need_tokens and not (type(tps) is int and tps > 0):
            raise UserError(
                f"--x tokens: no positive integer tokens_per_step for {path} (got {tps!r}); fix "
                f"its run.json, pass --tokens_per_step N (524288 for GPT-2's 0.5M-token batch) "
                f"or use --x steps"
            )
        logs.append(Log(path, label, *parse_log(path), tps))
    return logs


def extreme(log, stream, pick):
    """'value @ step' of a stream's lowest or highest value (pick: np.argmin or np.argmax), or '-'.
    NaN is skipped; on a tie the earliest step counts."""
    steps, values = log.streams.get(stream, (np.zeros(0), np.zeros(0)))
    finite = np.isfinite(values)
    if not finite.any():
        return "-"
    i = pick(values[finite])
    return f"{values[finite][i]:.4f} @ {steps[finite][i]}"


def table(header, rows):
    """Lines of a table: the first column left-aligned, the others right-aligned so the digits
    line up, each as wide as its widest cell."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        line = [row[0].ljust(widths[0])]
        line += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(line).rstrip())
    return lines


def format_summary(logs):
    """A table, one row per log: its last step, then min train, min val and max hella as
    'value @ step'."""
    rows = []
    for log in logs:
        last = max((steps[-1] for steps, _ in log.streams.values()), default="-")
        train = extreme(log, "train", np.argmin)
        val = extreme(log, "val", np.argmin)
        hella = extreme(log, "hella", np.argmax)
        rows.append([log.label, last, train, val, hella])
    header = ["run", "last step", "min train @ step", "min val @ step", "max hella @ step"]
    return "\n".join(table(header, rows))


# -----------------------------------------------------------------------------
# drawing


def smooth(values, window):
    """Centred mean over `window` points: a trailing one runs half a window behind a falling loss.
    Near the first point the window shrinks to stay centred (point i averages 0..2i), so the line
    starts where the loss starts; near the newest it is cut short on the right. A NaN loss is left
    out of the mean, not spread over a window."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    centre = np.arange(len(values))
    half = np.minimum(window // 2, centre)  # points [start, end) are averaged
    start = centre - half
    end = np.minimum(np.where(half < window // 2, 2 * centre + 1, start + window), len(values))
    n = counts[end] - counts[start]
    return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def default_window(points):
    """The train loss's window for a run of this many points: a twentieth of them, 1 to 100. A
    fixed 100 would flatten a short run's whole curve."""
    return min(MAX_SMOOTH, max(1, points // 20))


def darker(color):
    """A darker shade of a run's colour, for its val loss beside its train loss."""
    return tuple(0.6 * c for c in to_rgb(color))


def _human_count(x, _pos=None):
    """Tick label for token counts: 0, 500M, 1.5B, ..."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def draw_stream(ax, log, stream, color, smooth_window, x_unit, name_stream):
    """One stream of one run: the train loss faint behind its centred mean, val in a darker shade;
    evaluations (val, hella) are sparse, so each one is marked. name_stream puts the stream's name
    in the legend after the run's."""
    steps, values = log.streams[stream]
    xs = steps * log.tokens_per_step if x_unit == "tokens" else steps
    label = f"{log.label} {stream}" if name_stream else log.label
    if stream == "train":
        window = smooth_window or default_window(len(values))
        ax.plot(xs, values, color=color, alpha=0.2, linewidth=0.6)
        values = smooth(values, window)
        if window > 1:
            label += f" (mean of {window})"
    if stream == "val":
        color = darker(color)
    marker = "o" if stream in ("val", "hella") else None
    ax.plot(xs, values, color=color, linewidth=1.4, marker=marker, markersize=3, label=label)


def plain_log_scale(ax):
    """Loss on a log scale, or the first steps (~11) would flatten the part that matters (~3), with
    plain numbers (3, 4, 6) as ticks, not 3x10^0; over more than a decade the in-between ones would
    crowd, so 1, 10, 100 only."""
    plain = FuncFormatter(lambda y, _pos: f"{y:.3g}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 4, 5, 6, 8)))
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low <= 10 else NullFormatter())


def build_figure(logs, size="124M", smooth_window=None, x_unit="steps", extra_streams=()):
    """loss | HellaSwag (where a log has hella lines) | a panel per extra stream, side by side.
    size picks the baselines ("NONE" hides them); smooth_window None fits the train loss's window
    to each run; x_unit "tokens" needs each log's tokens_per_step."""
    gpt2, gpt3 = f"OpenAI GPT-2 {size}", f"GPT-3 {GPT3_NAME.get(size)}"
    loss_baselines = [(GPT2_VAL_LOSS, "tab:red", f"{gpt2} val")]
    panels = [("loss", "loss (log scale)", ["train", "val"], loss_baselines)]
    if any("hella" in log.streams for log in logs):
        hella_baselines = [(GPT2_HELLASWAG, "tab:red", gpt2), (GPT3_HELLASWAG, "tab:green", gpt3)]
        panels.append(("HellaSwag", "acc_norm", ["hella"], hella_baselines))
    for stream in extra_streams:
        panels.append((stream, stream, [stream], []))
    width = PANEL_WIDTH * len(panels)
    fig = Figure(figsize=(width, PANEL_HEIGHT), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    for ax, (title, ylabel, streams, baselines) in zip(axes, panels):
        for i, log in enumerate(logs):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            for stream in streams:
                if stream in log.streams:
                    draw_stream(ax, log, stream, color, smooth_window, x_unit, ax is axes[0])
        if not ax.lines:
            message = f"no {' or '.join(streams)} lines yet"
            ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", color="0.5")
        for by_size, color, name in baselines:
            if size in by_size:
                value = by_size[size]
                label = f"{name} ({value})"
                ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=label)
        # the loss falls to the bottom right and HellaSwag climbs away from the bottom: corners
        # kept clear
        if ax.lines:
            ax.legend(loc="upper right" if ax is axes[0] else "lower right", fontsize="small")
        ax.set(title=title, ylabel=ylabel, xlabel="tokens" if x_unit == "tokens" else "step")
        ax.grid(True, which="major", alpha=0.3)
        if x_unit == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(_human_count))
    plain_log_scale(axes[0])
    return fig


# -----------------------------------------------------------------------------
# command line


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "logs", nargs="+", help="log.txt files (or the folders holding them); several are overlaid"
    )
    p.add_argument(
        "-o", "--out", metavar="PNG", help="PNG to write (default: plot.png next to the first log)"
    )
    p.add_argument(
        "--labels",
        metavar="A,B",
        help="comma-separated legend names, one per log (default: folders)",
    )
    p.add_argument(
        "--size",
        type=str.upper,
        choices=(*GPT2_HELLASWAG, "NONE"),
        default="124M",
        help="GPT-2 size whose GPT-2/GPT-3 baselines to draw; none hides them",
    )
    p.add_argument(
        "--smooth",
        type=int,
        metavar="N",
        help=f"train loss: centred mean of N points, 1: none (default: a twentieth of a run's "
        f"points, 1 to {MAX_SMOOTH})",
    )
    p.add_argument(
        "--x",
        choices=("steps", "tokens"),
        default="steps",
        help="x axis; tokens = step x tokens_per_step",
    )
    p.add_argument(
        "--tokens_per_step",
        type=int,
        metavar="N",
        help="for logs without run.json (build-nanogpt: 524288)",
    )
    p.add_argument(
        "--streams", default="", metavar="A,B", help="extra streams to plot, a panel each, or 'all'"
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="check every SECONDS, redraw when a log changed",
    )
    return p


def parse_args(argv=None):
    """The command line's settings, checked, with each log folder turned into its log.txt."""
    p = make_parser()
    args = p.parse_args(argv)
    for name in ("smooth", "tokens_per_step", "watch"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name} {value}: must be above 0")
    if args.labels:
        args.labels = args.labels.split(",")
        if len(args.labels) != len(args.logs):
            p.error(
                f"--labels gave {len(args.labels)} label(s) for {len(args.logs)} log(s); give one "
                f"per log, in order"
            )
    logs = []
    for path in args.logs:
        if os.path.isdir(path):
            path = os.path.join(path, "log.txt")
        if not os.path.isfile(path):
            raise UserError(
                f"{path}: no such file; pass a run's log.txt or the folder that holds it"
            )
        logs.append(path)
    args.logs = logs
    args.out = args.out or os.path.join(os.path.dirname(args.logs[0]), "plot.png")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: plot.py writes PNG; give a name ending in .png")
    return args


def warn_once(logs, reported):
    """Print each log's malformed lines not reported before, MAX_WARNINGS_PER_LOG at most a log."""
    for log in logs:
        fresh = [msg for msg in log.problems if msg not in reported]
        reported.update(fresh)
        for msg in fresh[:MAX_WARNINGS_PER_LOG]:
            print(f"warning: {msg}", file=sys.stderr)
        if len(fresh) > MAX_WARNINGS_PER_LOG:
            more = len(fresh) - MAX_WARNINGS_PER_LOG
            print(f"warning: {log.path}: {more} more malformed lines", file=sys.stderr)


def plot_once(args, reported):
    """Read, draw, summarise. Under --watch an empty log or a stream not logged yet is no error:
    the run may not have reached it. reported holds the warnings already printed, so that --watch
    does not repeat them."""
    logs = load_logs(args.logs, args.labels, args.tokens_per_step, need_tokens=args.x == "tokens")
    warn_once(logs, reported)
    empty = [log.path for log in logs if not log.streams]
    if empty and not args.watch:
        raise UserError(
            f"{empty[0]} has no '{{step}} {{stream}} {{value}}' lines yet; wait for the run's "
            f"first step, or add --watch SECONDS to redraw as lines arrive"
        )
    if len(empty) == len(logs):
        print(f"waiting for lines in {', '.join(args.logs)}", flush=True)
        return

    available = []  # the streams of every log beyond the standard ones, in order of appearance
    for log in logs:
        for stream in log.streams:
            if stream not in STANDARD_STREAMS and stream not in available:
                available.append(stream)
    wanted = [s for s in args.streams.split(",") if s and s not in STANDARD_STREAMS]
    extra = available if "all" in wanted else wanted
    unknown = [s for s in extra if s not in available]
    if unknown and not args.watch:
        raise UserError(
            f"--streams {','.join(unknown)}: not in any log; the logs have "
            f"{', '.join(available) or 'no extra streams'} (train, val and hella are always "
            f"plotted)"
        )
    fig = build_figure(logs, args.size, args.smooth, args.x, extra)
    # a viewer reloading the PNG during --watch sees the old one or the new one, never half of one
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    print(format_summary(logs))
    unshown = [s for s in available if s not in extra]
    if unshown:
        print(
            f"other streams in the logs: {', '.join(unshown)} (add --streams "
            f"{','.join(unshown)} to plot them)"
        )
    pixels = f"{PANEL_WIDTH * DPI * len(fig.axes)} x {PANEL_HEIGHT * DPI} px"
    print(f"wrote {args.out} ({pixels})", flush=True)


def run(args, sleep=time.sleep):
    """Draw once, or under --watch redraw whenever a log's size or mtime changes, until Ctrl-C."""
    drawn, reported = None, set()
    try:
        while True:
            state = []  # a missing log is reported by plot_once
            for path in args.logs:
                if os.path.exists(path):
                    state.append((os.path.getsize(path), os.path.getmtime(path)))
                else:
                    state.append(None)
            if state != drawn:
                plot_once(args, reported)
                drawn = state
            if not args.watch:
                return 0
            sleep(args.watch)
    except KeyboardInterrupt:  # how --watch ends; a single drawing cut short is no success
        print()  # leave the shell prompt on its own line after ^C
        return 0 if args.watch else 130


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
