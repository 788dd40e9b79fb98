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
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from prepare import UserError, atomic_write

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

STANDARD_STREAMS = ("train", "val", "hella")  # the two fixed panels; any other stream needs --streams
PANEL_WIDTH_IN, PANEL_HEIGHT_IN, DPI = 7.0, 5.0, 100  # fixed, so the PNG's pixel size is known in advance
# Runs get these colours in order. Red and green are kept for the GPT-2 and GPT-3 baselines.
RUN_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive", "tab:gray")
MAX_WARNINGS_PER_LOG = 10  # a corrupted file should not bury the summary under thousands of warnings


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
    tokens_per_step: int = None  # set only for --x tokens


def resolve_log_path(path):
    """A log argument may name log.txt itself or the folder holding it (train_gpt.py's log dir)."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
        if not os.path.isfile(path):
            raise UserError(f"{os.path.dirname(path)} is a folder without a log.txt; pass the log.txt a run writes")
    elif not os.path.exists(path):
        raise UserError(f"{path}: no such file; check the path (runs write log.txt inside their log folder)")
    return path


def parse_log(path):
    """
    Read one log.txt into {stream: (steps, values)} plus a list of problems.

    A complete line that is not `{step} {stream} {value}` is skipped and reported as "path:line: why". The text
    after the last newline is a line the trainer is still writing (it may be cut mid-number), so it is ignored
    without a word: the next read sees it whole. A step logged again in a stream (a resumed run) takes the later
    value.
    """
    try:  # errors="replace": a stray binary byte makes one malformed line, not a crash
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            pieces = f.read().split("\n")[:-1]  # drops "" after the last newline, or the line still being written
    except OSError as e:  # unreadable, or gone since the start of --watch
        raise UserError(f"{path}: cannot read it ({e.strerror}); check the path and its permissions")
    points, problems = {}, []
    for number, line in enumerate(pieces, start=1):
        fields = line.split()  # also drops the \r of a log edited on Windows
        if not fields:
            continue
        try:
            step, value = int(fields[0]), float(fields[2])
            ok = len(fields) == 3 and step >= 0
        except (IndexError, ValueError):
            ok = False
        if not ok:
            shown = " ".join(fields)[:60]
            problems.append(f"{path}:{number}: {shown!r} is not '{{step}} {{stream}} {{value}}'; line skipped")
            continue
        points.setdefault(fields[1], {})[step] = value
    streams = {}
    for name, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        streams[name] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    return streams, problems


def read_tokens_per_step(log_path):
    """tokens_per_step from the run.json beside a log (train_gpt.py writes one, build-nanogpt none), else None."""
    meta_path = os.path.join(os.path.dirname(log_path), "run.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            value = json.load(f).get("tokens_per_step")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, not a JSON object
        raise UserError(f"{meta_path} is not a readable JSON object ({e}); fix or remove it, "
                        "or pass --tokens_per_step N")
    if value is not None and (type(value) is not int or value <= 0):
        raise UserError(f"{meta_path}: tokens_per_step = {value!r} is not a positive integer; "
                        "fix it, or remove the key and pass --tokens_per_step N")
    return value


def default_labels(paths):
    """Name each log by its folder, adding parent folders until the names differ (runA/log, runB/log)."""
    parts = [os.path.dirname(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]).lstrip("/") or "/" for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(p) for p in paths]  # the same file given twice: nothing tells them apart


def load_logs(paths, labels=None, tokens_per_step=None, need_tokens=False):
    """Parse each log.txt and attach its label and, for need_tokens, its tokens per step."""
    logs = []
    for path, label in zip(paths, labels or default_labels(paths)):
        tps = None
        if need_tokens:  # run.json is the run's own record, so it wins; the flag fills in for logs without one
            tps = read_tokens_per_step(path) or tokens_per_step
            if tps is None:
                raise UserError(f"--x tokens: {path} has no run.json with tokens_per_step beside it; pass "
                                "--tokens_per_step N (524288 for GPT-2's 0.5M-token batch) or use --x steps")
        logs.append(Log(path, label, *parse_log(path), tps))
    return logs


def extra_stream_names(logs):
    """Streams the logs hold beyond train/val/hella, in the order first seen."""
    return list(dict.fromkeys(s for log in logs for s in log.streams if s not in STANDARD_STREAMS))


def format_summary(logs):
    """A table, one row per log: last step, then min train, min val and max hella as 'value @ step'."""
    def extreme(log, stream, pick):  # NaN skipped; argmin/argmax give the earliest step on ties
        steps, values = log.streams.get(stream, (np.zeros(0), np.zeros(0)))
        finite = np.isfinite(values)
        if not finite.any():
            return "-"
        i = pick(values[finite])
        return f"{values[finite][i]:.4f} @ {steps[finite][i]}"

    rows = [("run", "last step", "min train @ step", "min val @ step", "max hella @ step")]
    rows += [(log.label, str(max((s[-1] for s, _ in log.streams.values()), default="-")),
              extreme(log, "train", np.argmin), extreme(log, "val", np.argmin), extreme(log, "hella", np.argmax))
             for log in logs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # the label left-aligned, the numbers right-aligned so the digits line up
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
                     for r in rows)


# -----------------------------------------------------------------------------
# drawing

def smooth(values, window):
    """
    Centred mean over `window` points. Centred, because a trailing mean runs half a window behind a falling
    loss. Near the first point the window shrinks to stay centred (point i averages points 0..2i), so the line
    starts where the loss starts; near the newest point it is cut short on the right only. Non-finite points
    (a NaN loss) are left out of the mean rather than turning the whole window into NaN.
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
    end = np.minimum(np.where(half < window // 2, 2 * centre + 1, start + window), len(values))
    n = counts[end] - counts[start]
    return np.where(n > 0, (sums[end] - sums[start]) / np.maximum(n, 1), np.nan)


def _human_count(x, _pos=None):
    """Tick label for token counts: 0, 500M, 1.5B, ..."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def build_figure(logs, size="124M", smooth_window=100, x_unit="steps", extra_streams=()):
    """
    The figure, not yet saved: loss | HellaSwag | one panel per extra stream, side by side. size picks the
    baselines (one not in the tables, such as "NONE", hides them); x_unit "tokens" needs each log's tokens_per_step.
    """
    n_panels = 2 + len(extra_streams)
    fig = Figure(figsize=(PANEL_WIDTH_IN * n_panels, PANEL_HEIGHT_IN), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n_panels, sharex=True, squeeze=False)[0]
    panel_of = {"train": axes[0], "val": axes[0], "hella": axes[1], **dict(zip(extra_streams, axes[2:]))}
    for i, log in enumerate(logs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for stream, (steps, values) in log.streams.items():
            if stream not in panel_of:
                continue
            ax = panel_of[stream]
            xs = steps * log.tokens_per_step if x_unit == "tokens" else steps
            label = f"{log.label} {stream}" if ax is axes[0] else log.label
            if stream == "train":  # the raw loss faint behind its mean
                ax.plot(xs, values, color=color, alpha=0.2, linewidth=0.6)
                ax.plot(xs, smooth(values, smooth_window), color=color, linewidth=1.4,
                        label=label + (f" (mean of {smooth_window})" if smooth_window > 1 else ""))
            elif stream in ("val", "hella"):  # evaluations are sparse: mark each one
                ax.plot(xs, values, color=color, linewidth=1.6, marker="o", markersize=3, label=label)
            else:
                ax.plot(xs, values, color=color, linewidth=1.2, label=label)

    titles = [("loss", "loss (log scale)", "train or val"), ("HellaSwag", "acc_norm", "hella")]
    for ax, (title, ylabel, what) in zip(axes, titles + [(s, s, repr(s)) for s in extra_streams]):
        if not ax.lines:  # before the baselines, which are lines too
            ax.text(0.5, 0.5, f"no {what} lines yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    if size in GPT2_VAL_LOSS:
        v = GPT2_VAL_LOSS[size]
        axes[0].axhline(v, color="tab:red", linestyle="--", linewidth=1.2, label=f"OpenAI GPT-2 {size} val ({v})")
    if size in GPT2_HELLASWAG:
        v = GPT2_HELLASWAG[size]
        axes[1].axhline(v, color="tab:red", linestyle="--", linewidth=1.2, label=f"OpenAI GPT-2 {size} ({v})")
        v = GPT3_HELLASWAG[size]
        axes[1].axhline(v, color="tab:green", linestyle="--", linewidth=1.2, label=f"GPT-3 {GPT3_NAME[size]} ({v})")

    # Loss on a log scale, because the first steps (~11) would otherwise flatten the part that matters (~3);
    # ticks as plain numbers (3, 4, 6) rather than 3x10^0.
    plain = FuncFormatter(lambda y, _pos: f"{y:.3g}")
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 4, 5, 6, 8)))
    axes[0].yaxis.set_minor_formatter(plain)
    for ax in axes:
        ax.set_xlabel("tokens" if x_unit == "tokens" else "step")
        ax.grid(True, which="major", alpha=0.3)
        if x_unit == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(_human_count))
        if ax.get_legend_handles_labels()[0]:
            # the loss falls to the bottom right and HellaSwag climbs away from the bottom: those corners stay clear
            ax.legend(loc="upper right" if ax is axes[0] else "lower right", fontsize="small")
    low, high = axes[0].get_ylim()
    if high / low > 10:  # over more than a decade the in-between labels would crowd into each other
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    return fig


def save(fig, out):
    """Write the PNG beside out and rename it over out: a viewer reloading it during --watch never sees half."""
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); free some space or choose another -o/--out")


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.txt files (or the folders holding them); several are overlaid")
    p.add_argument("-o", "--out", metavar="PNG", help="PNG to write (default: plot.png next to the first log)")
    p.add_argument("--labels", metavar="A,B", help="comma-separated legend names, one per log, in order "
                                                   "(default: each log's folder name)")
    p.add_argument("--size", type=str.upper, choices=(*GPT2_HELLASWAG, "NONE"), default="124M",
                   help="model size for the GPT-2/GPT-3 baselines; none hides them (default 124M)")
    p.add_argument("--smooth", type=int, default=100, metavar="N",
                   help="train loss smoothing: centred mean over this many points; 1 turns it off (default 100)")
    p.add_argument("--x", choices=("steps", "tokens"), default="steps",
                   help="x axis: optimizer steps, or tokens = step x tokens_per_step from the run.json beside each log")
    p.add_argument("--tokens_per_step", type=int, metavar="N",
                   help="tokens per step for logs without run.json (build-nanogpt: 524288)")
    p.add_argument("--streams", default="", metavar="NAME,NAME",
                   help="comma-separated extra streams to plot, one panel each, or 'all'")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="redraw whenever a log changes, checking every SECONDS, until Ctrl-C")
    args = p.parse_args(argv)
    for name in ("smooth", "tokens_per_step", "watch"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name} {value}: must be above 0")
    args.labels = args.labels.split(",") if args.labels is not None else None
    if args.labels is not None and len(args.labels) != len(args.logs):
        p.error(f"--labels gave {len(args.labels)} label(s) for {len(args.logs)} log(s); give one per log, "
                "comma-separated, in the same order")
    args.logs = [resolve_log_path(path) for path in args.logs]
    args.out = args.out or os.path.join(os.path.dirname(args.logs[0]), "plot.png")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: plot.py writes PNG; give a name ending in .png")
    return args


def plot_once(args, reported, waiting=False):
    """
    Read, draw and summarise once. waiting (--watch) lets an empty log or a stream not logged yet pass, since the
    run may not have reached it. reported holds the warnings already printed, so --watch does not repeat them.
    """
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
        raise UserError(f"{empty[0]} has no '{{step}} {{stream}} {{value}}' lines yet; wait for the run's first "
                        "step, or add --watch SECONDS to redraw as lines arrive")
    if len(empty) == len(logs):
        print(f"waiting for lines in {', '.join(args.logs)}")
        return

    available = extra_stream_names(logs)
    wanted = [s for s in args.streams.split(",") if s and s not in STANDARD_STREAMS]
    extra = available if "all" in wanted else wanted
    unknown = [s for s in extra if s not in available]
    if unknown and not waiting:
        raise UserError(f"--streams {','.join(unknown)}: not in any log; the logs have "
                        f"{', '.join(available) or 'no extra streams'} (train, val and hella are always plotted)")
    save(build_figure(logs, args.size, args.smooth, args.x, extra), args.out)
    print(format_summary(logs))
    unshown = [s for s in available if s not in extra]
    if unshown:
        print(f"other streams in the logs: {', '.join(unshown)} (add --streams {','.join(unshown)} to plot them)")
    print(f"wrote {args.out} ({png_size(2 + len(extra))[0]} x {png_size()[1]} px)")


def watch(args, sleep=time.sleep):
    """
    Redraw whenever a log's size or mtime changes, until Ctrl-C. An error in the first drawing ends the watch; a
    later one (a log rotated, briefly unreadable) is reported and retried at the next check.
    """
    drawn, reported = None, set()
    try:
        while True:
            try:
                state = [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in args.logs]
                if state != drawn:
                    if drawn is not None:
                        print(f"--- {time.strftime('%H:%M:%S')}")
                    plot_once(args, reported, waiting=True)
                    drawn = state
            except (UserError, OSError) as e:
                if drawn is None:
                    raise
                print(f"warning: {e}; retrying in {args.watch:g}s", file=sys.stderr)
            sys.stdout.flush()
            sleep(args.watch)
    except KeyboardInterrupt:
        print()  # leave the shell prompt on its own line after ^C
        return 0


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.watch:
            return watch(args)
        plot_once(args, set())
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
