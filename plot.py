"""
Plot ArcanaGPT training logs: loss and HellaSwag against OpenAI's GPT-2 and GPT-3, as one PNG.

    python plot.py log/log.txt                          # writes log/plot.png and prints a summary
    python plot.py runA/log runB/log --labels base,fused # overlay two runs (a folder means its log.txt)
    python plot.py log/log.txt --x tokens               # x axis in tokens, from run.json's tokens_per_step
    python plot.py log/log.txt --watch 60               # redraw every minute while the run goes; Ctrl-C stops
    python plot.py log/log.txt --streams lr,grad_norm   # one extra panel per named stream ('all' for every one)

Reads train_gpt.py's log.txt and build-nanogpt's log/log.txt, which share one line format:
`{step} {stream} {value}` with streams train, val and hella (HellaSwag acc_norm). Other streams are
ignored unless --streams names them. The PNG is 700 x 500 pixels per panel: 1400 x 500 for the default
two panels. It is drawn with matplotlib's Agg renderer, so no display is needed.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

# -----------------------------------------------------------------------------
# reference numbers

# OpenAI's GPT-2 checkpoints evaluated on our own data: val loss on the FineWeb-edu val shard (the same
# tokens the val stream is measured on), known for 124M only, and HellaSwag acc_norm on the 10,042
# validation examples, the metric the hella stream logs.
GPT2_VAL_LOSS = {"124M": 3.2924}
GPT2_HELLASWAG = {"124M": 0.2945, "350M": 0.3752, "774M": 0.4320, "1558M": 0.4889}
# GPT-3 zero-shot HellaSwag from the GPT-3 paper (Brown et al. 2020), per model size. GPT-3 has no models of
# exactly GPT-2's sizes; each GPT-2 size is paired with the nearest GPT-3 one, named here for the legend.
GPT3_HELLASWAG = {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
GPT3_NAME = {"124M": "125M", "350M": "350M", "774M": "760M", "1558M": "1.3B"}
SIZES = tuple(GPT2_HELLASWAG)

# The streams the two fixed panels draw; any other stream in a log is extra and needs --streams.
STANDARD_STREAMS = ("train", "val", "hella")

# Fixed geometry so the PNG's pixel size is known in advance: PANEL_WIDTH_IN * DPI pixels per panel.
PANEL_WIDTH_IN = 7.0
PANEL_HEIGHT_IN = 5.0
DPI = 100

# Runs get these colours in order. Red and green are kept for the GPT-2 and GPT-3 baselines.
RUN_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive", "tab:gray")
GPT2_COLOR = "tab:red"
GPT3_COLOR = "tab:green"

MAX_WARNINGS_PER_LOG = 10  # a corrupted file should not bury the summary under thousands of warnings


class PlotError(Exception):
    """A problem the user can fix: main prints the message on one line and exits non-zero."""


def png_size(n_panels=2):
    """(width, height) in pixels of the PNG for a figure with n_panels panels side by side."""
    return round(PANEL_WIDTH_IN * DPI) * n_panels, round(PANEL_HEIGHT_IN * DPI)


# -----------------------------------------------------------------------------
# reading logs

@dataclass
class Log:
    path: str                   # the log.txt read
    label: str                  # legend and summary name
    streams: dict               # stream name -> (steps int64 array, values float64 array), sorted by step
    problems: list = field(default_factory=list)  # "file:line: why" for each skipped malformed line
    tokens_per_step: int = None  # from run.json or --tokens_per_step; None when unknown


def resolve_log_path(path):
    """A log argument may name log.txt itself or the folder holding it (train_gpt.py's log dir)."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "log.txt")
        if not os.path.isfile(candidate):
            raise PlotError(f"{path} is a folder without a log.txt; pass the log.txt that the run writes")
        return candidate
    if not os.path.exists(path):
        raise PlotError(f"{path}: no such file; check the path (runs write log.txt inside their log folder)")
    return path


def parse_log(path):
    """
    Read one log.txt into {stream: (steps, values)} plus a list of problems.

    Lines are `{step} {stream} {value}`. A complete line that does not fit is skipped and reported as
    "path:line: why". The text after the last newline is a line the trainer is still writing (it may be
    cut mid-number), so it is ignored without a word: the next read will see it whole. A step that
    appears again in a stream (a resumed run, a tool that re-logs) takes the later value.
    """
    # errors="replace": a stray binary byte should make one malformed line, not a crash.
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
    except OSError as e:  # unreadable, or gone between the check and the read
        raise PlotError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions")
    pieces = text.split("\n")
    pieces.pop()  # "" when the file ends with a newline, else the partial line of a run still writing
    by_stream = {}
    problems = []
    for number, raw in enumerate(pieces, start=1):
        line = raw.strip()  # also drops the \r of a log edited on Windows
        if not line:
            continue
        why = None
        fields = line.split()
        if len(fields) != 3:
            why = f"expected 3 fields '{{step}} {{stream}} {{value}}', found {len(fields)}"
        elif not fields[0].isascii() or not fields[0].isdigit():
            why = f"step {fields[0]!r} is not a non-negative integer"
        else:
            try:
                value = float(fields[2])
            except ValueError:
                why = f"value {fields[2]!r} is not a number"
        if why is not None:
            shown = line if len(line) <= 60 else line[:57] + "..."
            problems.append(f"{path}:{number}: {why} in {shown!r}; line skipped")
            continue
        by_stream.setdefault(fields[1], {})[int(fields[0])] = value  # dict: a repeated step keeps the later value
    streams = {}
    for name, points in by_stream.items():
        steps = np.array(sorted(points), dtype=np.int64)
        values = np.array([points[s] for s in steps.tolist()], dtype=np.float64)
        streams[name] = (steps, values)
    return streams, problems


def read_tokens_per_step(log_path):
    """tokens_per_step from the run.json next to log_path, or None and the reason it is not there."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(log_path)), "run.json")
    if not os.path.isfile(meta_path):
        return None, f"{meta_path} does not exist (build-nanogpt logs have none)"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlotError(f"{meta_path} is not valid JSON ({e}); fix or remove it, or pass --tokens_per_step N")
    value = meta.get("tokens_per_step") if isinstance(meta, dict) else None
    if value is None:
        return None, f"{meta_path} has no 'tokens_per_step' key"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlotError(f"{meta_path}: tokens_per_step = {value!r} is not a positive integer; "
                        "fix it, or remove the key and pass --tokens_per_step N")
    return value, None


def default_labels(paths):
    """
    Name each log by its folder. Runs often share a folder name (runA/log, runB/log), so parent
    folders are added until the names differ.
    """
    parts = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    longest = max(len(p) for p in parts)
    for depth in range(1, longest + 1):
        labels = ["/".join(p[-depth:]).lstrip("/") or "/" for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(p) for p in paths]  # the same file given twice: nothing tells them apart


def load_logs(paths, labels=None, tokens_per_step=None, need_tokens=False):
    """Parse each log and attach its label and tokens per step. Raises PlotError for what a user can fix."""
    resolved = [resolve_log_path(p) for p in paths]
    labels = labels or default_labels(resolved)
    logs = []
    for path, label in zip(resolved, labels):
        streams, problems = parse_log(path)
        # run.json is the run's own record, so it wins; the flag fills in for logs without one.
        tps, missing = read_tokens_per_step(path)
        if tps is None:
            tps = tokens_per_step
        if need_tokens and tps is None:
            raise PlotError(f"--x tokens needs tokens per step for {path}, but {missing}; "
                            "pass --tokens_per_step N (524288 for GPT-2's 0.5M-token batch) or use --x steps")
        logs.append(Log(path, label, streams, problems, tps))
    return logs


def extra_stream_names(logs):
    """Streams the logs hold beyond train/val/hella, in the order first seen."""
    names = []
    for log in logs:
        names += [s for s in log.streams if s not in STANDARD_STREAMS and s not in names]
    return names


# -----------------------------------------------------------------------------
# summary

@dataclass
class Summary:
    label: str
    last_step: int            # the largest step in any stream
    min_train: tuple = None   # (value, step) of the lowest train loss; None without train lines
    min_val: tuple = None     # (value, step) of the lowest val loss
    max_hella: tuple = None   # (value, step) of the best HellaSwag acc_norm


def _extreme(log, stream, pick):
    """(value, step) where stream is at its min or max; the earliest step on ties; NaN/inf skipped."""
    if stream not in log.streams:
        return None
    steps, values = log.streams[stream]
    finite = np.isfinite(values)
    if not finite.any():
        return None
    steps, values = steps[finite], values[finite]
    i = int(pick(values))  # argmin / argmax return the first index among equals
    return float(values[i]), int(steps[i])


def summarize(log):
    last = max((int(steps[-1]) for steps, _ in log.streams.values() if len(steps)), default=None)
    return Summary(
        label=log.label,
        last_step=last,
        min_train=_extreme(log, "train", np.argmin),
        min_val=_extreme(log, "val", np.argmin),
        max_hella=_extreme(log, "hella", np.argmax),
    )


def format_summary(summaries):
    """A small table: one row per log, each extreme printed as 'value @ step'."""
    def cell(extreme):
        return "-" if extreme is None else f"{extreme[0]:.4f} @ {extreme[1]}"

    header = ("run", "last step", "min train @ step", "min val @ step", "max hella @ step")
    rows = [(s.label, "-" if s.last_step is None else str(s.last_step),
             cell(s.min_train), cell(s.min_val), cell(s.max_hella)) for s in summaries]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        # the label left-aligned, the numbers right-aligned so the digits line up
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# drawing

def smooth(values, window):
    """
    Centred mean over `window` points, cut short where the data ends. Centred, because a trailing
    mean runs half a window behind a falling loss. Near the first point the window shrinks to stay
    centred (point i averages points 0..2i), so the line starts where the loss starts instead of at
    an average of the steep first steps; near the newest point it is cut short on the right only, so
    that point averages the last half window logged so far. Non-finite points (a NaN loss) are left
    out of the mean rather than turning the whole window into NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values.copy()
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    centre = np.arange(len(values))
    half = np.minimum(window // 2, centre)  # points [start, end) are averaged
    start = centre - half
    end = np.minimum(np.where(half < window // 2, 2 * centre + 1, centre - half + window), len(values))
    n = counts[end] - counts[start]
    return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def _human_count(x, _pos=None):
    """Tick label for token counts: 0, 500M, 1.5B, ..."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def _plain_number(y, _pos=None):
    """Tick label for a log-scale loss axis: 3, 4, 6, 10 rather than 3x10^0."""
    return f"{y:.3g}"


def _xs(log, steps, x_unit):
    return steps * log.tokens_per_step if x_unit == "tokens" else steps


def _note_if_empty(ax, drawn, what):
    if not drawn:
        ax.text(0.5, 0.5, f"no {what} lines yet", transform=ax.transAxes, ha="center", va="center", color="0.5")


def build_figure(logs, size="124M", smooth_window=100, x_unit="steps", extra_streams=()):
    """
    The figure, not yet saved: loss | HellaSwag | one panel per extra stream, side by side.
    size picks the baselines (None hides them); x_unit is "steps" or "tokens" (which needs
    each log's tokens_per_step).
    """
    n_panels = 2 + len(extra_streams)
    fig = Figure(figsize=(PANEL_WIDTH_IN * n_panels, PANEL_HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg explicitly: no display, and no change to pyplot's global backend
    axes = fig.subplots(1, n_panels, sharex=True, squeeze=False)[0]
    x_label = "tokens" if x_unit == "tokens" else "step"

    # Panel 1: loss. Log scale, because the first steps (~11) would otherwise flatten the part that matters (~3).
    ax = axes[0]
    drawn = False
    for i, log in enumerate(logs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        if "train" in log.streams:
            steps, values = log.streams["train"]
            xs = _xs(log, steps, x_unit)
            ax.plot(xs, values, color=color, alpha=0.2, linewidth=0.6)
            name = f"{log.label} train" + (f" (mean of {smooth_window})" if smooth_window > 1 else "")
            ax.plot(xs, smooth(values, smooth_window), color=color, linewidth=1.4, label=name)
            drawn = True
        if "val" in log.streams:
            steps, values = log.streams["val"]
            ax.plot(_xs(log, steps, x_unit), values, color=color, linewidth=1.6, marker="o", markersize=3,
                    label=f"{log.label} val")
            drawn = True
    if size in GPT2_VAL_LOSS:
        v = GPT2_VAL_LOSS[size]
        ax.axhline(v, color=GPT2_COLOR, linestyle="--", linewidth=1.2, label=f"OpenAI GPT-2 {size} val ({v})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 4, 5, 6, 8)))
    ax.yaxis.set_minor_formatter(FuncFormatter(_plain_number))
    ax.set_title("loss")
    ax.set_ylabel("loss (log scale)")
    _note_if_empty(ax, drawn, "train or val")

    # Panel 2: HellaSwag acc_norm, with what GPT-2 and GPT-3 of the chosen size reach.
    ax = axes[1]
    drawn = False
    for i, log in enumerate(logs):
        if "hella" in log.streams:
            steps, values = log.streams["hella"]
            ax.plot(_xs(log, steps, x_unit), values, color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=1.6,
                    marker="o", markersize=3, label=log.label)
            drawn = True
    if size in GPT2_HELLASWAG:
        v = GPT2_HELLASWAG[size]
        ax.axhline(v, color=GPT2_COLOR, linestyle="--", linewidth=1.2, label=f"OpenAI GPT-2 {size} ({v})")
        v = GPT3_HELLASWAG[size]
        ax.axhline(v, color=GPT3_COLOR, linestyle="--", linewidth=1.2, label=f"GPT-3 {GPT3_NAME[size]} ({v})")
    ax.set_title("HellaSwag")
    ax.set_ylabel("acc_norm")
    _note_if_empty(ax, drawn, "hella")

    # Extra panels: whatever else the run logs (learning rate, grad norm, ...), linear y.
    for ax, stream in zip(axes[2:], extra_streams):
        drawn = False
        for i, log in enumerate(logs):
            if stream in log.streams:
                steps, values = log.streams[stream]
                ax.plot(_xs(log, steps, x_unit), values, color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=1.2,
                        label=log.label)
                drawn = True
        ax.set_title(stream)
        ax.set_ylabel(stream)
        _note_if_empty(ax, drawn, repr(stream))

    for ax in axes:
        ax.set_xlabel(x_label)
        ax.grid(True, which="major", alpha=0.3)
        if x_unit == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(_human_count))
        if ax.get_legend_handles_labels()[0]:
            # the loss falls to the bottom right and HellaSwag climbs away from the bottom, so those corners stay clear
            ax.legend(loc="upper right" if ax is axes[0] else "lower right", fontsize="small")
    low, high = axes[0].get_ylim()
    if high / low > 10:
        # over more than a decade the in-between labels would crowd into each other; keep 1, 10, 100
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    return fig


def save_atomically(fig, out):
    """
    Write the PNG to a temporary file in the same folder, then rename it over `out`. A viewer
    reloading the image during --watch sees the old plot or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=folder)
    except OSError as e:
        raise PlotError(f"cannot write in {folder} ({e.strerror}); choose another place with -o/--out")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the plot is meant to be looked at
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def draw(logs, out, size="124M", smooth_window=100, x_unit="steps", extra_streams=()):
    """Build the figure and write it to `out` as a PNG of png_size(2 + len(extra_streams)) pixels."""
    save_atomically(build_figure(logs, size, smooth_window, x_unit, extra_streams), out)
    return out


# -----------------------------------------------------------------------------
# command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line that says what is wrong, instead of argparse's usage block
        self.exit(2, f"{self.prog}: {message} (see python plot.py --help)\n")


def _size(text):
    key = text.strip().upper()
    if key == "NONE":
        return None
    if key not in SIZES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPT-2 size; use one of {', '.join(SIZES)}, or none")
    return key


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}")
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value
    return parse


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv):
    p = _Parser(prog="plot.py", description="Plot loss and HellaSwag from log.txt files into one PNG.",
                epilog=f"The PNG is {png_size()[0]} x {png_size()[1]} pixels, plus {png_size(1)[0]} px of width per "
                       "--streams panel.")
    p.add_argument("logs", nargs="+", help="log.txt files (or the folders holding them); several are overlaid")
    p.add_argument("-o", "--out", metavar="PNG", help="PNG to write (default: plot.png next to the first log)")
    p.add_argument("--labels", type=_names, metavar="A,B", help="comma-separated legend names, one per log, in order "
                                                 "(default: each log's folder name)")
    p.add_argument("--size", type=_size, default="124M",
                   help=f"model size for the baselines: {', '.join(SIZES)}, or none to hide them (default 124M)")
    p.add_argument("--smooth", type=_positive(int), default=100, metavar="N",
                   help="train loss smoothing: centred mean over this many points; 1 turns it off (default 100)")
    p.add_argument("--x", choices=("steps", "tokens"), default="steps",
                   help="x axis: optimizer steps, or tokens = step x tokens_per_step from the run.json beside each log")
    p.add_argument("--tokens_per_step", type=_positive(int), metavar="N",
                   help="tokens per step for logs without run.json (build-nanogpt: 524288)")
    p.add_argument("--streams", type=_names, default=[], metavar="NAME,NAME",
                   help="comma-separated extra streams to plot, one panel each, or 'all'")
    p.add_argument("--watch", type=_positive(float), metavar="SECONDS",
                   help="re-read the logs and redraw every SECONDS until Ctrl-C")
    args = p.parse_args(argv)

    if args.labels is not None and len(args.labels) != len(args.logs):
        p.error(f"--labels gave {len(args.labels)} label(s) for {len(args.logs)} log(s); give one per log, "
                "comma-separated, in the same order")
    for path in args.logs:  # a wrong log path is the likelier mistake, so it is reported before --out's folder
        try:
            resolve_log_path(path)
        except PlotError as e:
            p.error(str(e))
    if args.out is None:
        first = args.logs[0] if os.path.isdir(args.logs[0]) else os.path.dirname(args.logs[0])
        args.out = os.path.join(first, "plot.png")
    if not args.out.lower().endswith(".png"):
        p.error(f"--out {args.out}: plot.py writes PNG; give a name ending in .png")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: folder {out_dir} does not exist; create it or choose another path")
    return args


def plot_once(args, waiting=False, reported=None):
    """
    Read, draw, summarise once; returns the logs drawn (None when there was nothing to draw yet).
    waiting=True (used by --watch) lets an empty log or a stream not yet logged pass, since the
    run may simply not have reached it. `reported` holds the warnings already printed, so --watch
    does not repeat them at every redraw.
    """
    reported = set() if reported is None else reported
    logs = load_logs(args.logs, args.labels, args.tokens_per_step, need_tokens=args.x == "tokens")
    for log in logs:
        fresh = [msg for msg in log.problems if msg not in reported]
        for msg in fresh[:MAX_WARNINGS_PER_LOG]:
            print(f"warning: {msg}", file=sys.stderr)
        if len(fresh) > MAX_WARNINGS_PER_LOG:
            print(f"warning: {log.path}: {len(fresh) - MAX_WARNINGS_PER_LOG} more malformed lines skipped",
                  file=sys.stderr)
        reported.update(fresh)

    empty = [log.path for log in logs if not log.streams]
    if empty and not waiting:
        raise PlotError(f"{empty[0]} has no '{{step}} {{stream}} {{value}}' lines yet; wait for the run's first "
                        "step, or add --watch SECONDS to redraw as lines arrive")
    if len(empty) == len(logs):
        return None

    available = extra_stream_names(logs)
    if "all" in args.streams:
        extra = available
    else:
        extra = [s for s in args.streams if s not in STANDARD_STREAMS]
        unknown = [s for s in extra if s not in available]
        if unknown and not waiting:
            raise PlotError(f"--streams {','.join(unknown)}: not in any log; the logs have "
                            f"{', '.join(available) or 'no extra streams'} (train, val and hella are always plotted)")

    draw(logs, args.out, args.size, args.smooth, args.x, extra)
    print(format_summary([summarize(log) for log in logs]))
    unshown = [s for s in available if s not in extra]
    if unshown:
        print(f"other streams in the logs: {', '.join(unshown)} (add --streams {','.join(unshown)} to plot them)")
    print(f"wrote {args.out} ({png_size(2 + len(extra))[0]} x {png_size()[1]} px)")
    return logs


def _signature(args):
    """What changes when a log grows: size and mtime of every log and run.json."""
    sig = []
    for path in args.logs:
        log_path = os.path.join(path, "log.txt") if os.path.isdir(path) else path
        for p in (log_path, os.path.join(os.path.dirname(log_path), "run.json")):
            try:
                st = os.stat(p)
                sig.append((p, st.st_size, st.st_mtime_ns))
            except OSError:
                sig.append((p, None, None))
    return sig


def watch(args, rounds=None, sleep=time.sleep):
    """
    Redraw every args.watch seconds until Ctrl-C (rounds=N stops after N reads, for tests).
    A missing log is an error at the start; once running, a read that fails is reported and
    retried at the next round, so a log rotated or briefly unreadable does not end the watch.
    """
    reported = set()
    last = None
    done = 0
    try:
        while rounds is None or done < rounds:
            sig = _signature(args)
            if sig != last:  # a quiet run is not redrawn: same input, same picture
                try:
                    if done > 0:
                        print(f"--- {time.strftime('%H:%M:%S')}")
                    if plot_once(args, waiting=True, reported=reported) is None:
                        print(f"waiting for lines in {', '.join(args.logs)}")
                    last = sig
                except PlotError as e:
                    if done == 0:
                        raise
                    print(f"warning: {e}; retrying in {args.watch:g}s", file=sys.stderr)
                sys.stdout.flush()
            done += 1
            if rounds is None or done < rounds:
                sleep(args.watch)
    except KeyboardInterrupt:
        print()  # leave the shell prompt on its own line after ^C
    return 0


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse exits for --help and for bad flags; main returns the code instead
        return e.code
    try:
        if args.watch:
            return watch(args)
        plot_once(args)
        return 0
    except PlotError as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
