"""Loss curve of a training run, or of a curriculum's stages, from the per-step JSONL stats the train loop writes.

    python -m launch.plot STATS.jsonl [STATS2.jsonl ...] [--out loss.png] [--labels NAME ...] [--title TEXT]
                          [--window 5]

Each record of `consumer.train`'s JSONL (consumer/metrics.py) holds step, loss, lr, grad_norm and
latent_hw. The figure has two panels: the loss per step (each step's point coloured by the latent size of
its batch -- one colour per resolution bucket, since buckets have different loss levels -- and a moving
average over `--window` steps) and the learning rate. Several stats files are the stages of a curriculum: they
follow one another on the step axis, a dashed line where each stage starts, named by `--labels` or by their
directories. Headless: matplotlib's Agg backend, no display needed.

A resumed run appends to the same JSONL, so a step can appear more than once; the last record of a step
wins (it is the one that survived into the run's history).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


class StatsError(ValueError):
    """The stats file is missing, empty or not the train loop's JSONL; the message names the file and line."""


def read_stats(path: str) -> list[dict]:
    """The per-step records of `path`, one per step (the last record of a repeated step), sorted by step."""
    if not os.path.isfile(path):
        raise StatsError(f"{path}: no such stats file")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                # A crashed writer can leave a torn last line; anything else is a wrong file.
                if not f.read().strip():
                    break
                raise StatsError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
                raise StatsError(f"{path}:{lineno}: expected a record with 'step' and 'loss', got {line.strip()[:80]!r}")
            by_step[int(rec["step"])] = rec
    if not by_step:
        raise StatsError(f"{path}: no training steps recorded")
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start), ignoring non-finite values."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def summarize(records: list[dict], window: int = 5) -> dict:
    """First/last loss and the moving averages at both ends: the numbers the demo prints under the plot."""
    losses = [float(r["loss"]) for r in records]
    avg = moving_average(losses, window)
    head = losses[:window]
    return {"steps": len(records), "first_step": records[0]["step"], "last_step": records[-1]["step"],
            "first_loss": losses[0], "last_loss": losses[-1],
            "mean_first_window": sum(head) / len(head), "mean_last_window": avg[-1], "window": window}


def stage_label(stats_path: str) -> str:
    """A stage's default name in the plot: the directory of its stats file (OUT/train/256p/stats.jsonl -> 256p)."""
    return os.path.basename(os.path.dirname(os.path.abspath(stats_path)))


def plot_loss(stats_paths, png_path: str, title: str | None = None, window: int = 5,
              labels: list[str] | None = None) -> list[dict]:
    """Write the loss-curve PNG of one run's stats file, or of several stages' in order (one after the other on one
    step axis, each stage's moving average of its own, a line where the next stage starts), to `png_path`; return
    `summarize()` of each stage's records."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    paths = [stats_paths] if isinstance(stats_paths, str) else list(stats_paths)
    labels = labels or ([None] if len(paths) == 1 else [stage_label(p) for p in paths])
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} stats files")
    stages = [read_stats(p) for p in paths]
    summaries = [summarize(records, window) for records in stages]

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    every = [r for records in stages for r in records]
    buckets = sorted({tuple(r["latent_hw"]) for r in every if r.get("latent_hw")})
    by_bucket = bool(buckets) and all(r.get("latent_hw") for r in every)
    cmap = plt.get_cmap("tab10")
    colour = {hw: cmap(i % 10) for i, hw in enumerate(buckets)}
    offset, shown = 0, set()
    for k, (records, label) in enumerate(zip(stages, labels)):
        steps = [offset + r["step"] for r in records]  # the stage's steps after those of the stages before it
        losses = [float(r["loss"]) for r in records]
        if k:
            ax.axvline(offset + 0.5, color="grey", ls="--", lw=1)
            ax_lr.axvline(offset + 0.5, color="grey", ls="--", lw=1)
        if label:
            ax.text(offset + 1, 0.02, f" {label}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
        if by_bucket:
            for hw in sorted({tuple(r["latent_hw"]) for r in records}):
                xs = [x for x, r in zip(steps, records) if tuple(r["latent_hw"]) == hw]
                ys = [y for y, r in zip(losses, records) if tuple(r["latent_hw"]) == hw]
                ax.scatter(xs, ys, s=18, color=colour[hw], alpha=0.8, zorder=3,
                           label=None if hw in shown else f"{hw[1] * 8}x{hw[0] * 8} px (latent {hw[0]}x{hw[1]})")
                shown.add(hw)
        else:
            ax.scatter(steps, losses, s=18, color="tab:blue", alpha=0.8, zorder=3, label=None if k else "loss per step")
        ax.plot(steps, moving_average(losses, window), color="black", lw=2, zorder=4,
                label=None if k else f"moving average ({window} steps{', per stage' if len(stages) > 1 else ''})")
        lrs = [r.get("lr") for r in records]
        if all(v is not None for v in lrs):
            ax_lr.plot(steps, lrs, color="tab:orange")
        offset = steps[-1]
    ax.set_ylabel("flow-matching loss (MSE)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", title="batch bucket (w x h)" if by_bucket else None, title_fontsize=7)
    ax.set_title(title or "training loss: " + "; ".join(
        f"{label + ' ' if label else ''}{s['first_loss']:.3f} -> {s['last_loss']:.3f} over {s['steps']} steps"
        for label, s in zip(labels, summaries)), fontsize=10)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step" if len(stages) == 1 else "step (the stages one after the other)")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)  # never leave a half-written PNG where the demo says the plot is
    return summaries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", nargs="+", help="the train loop's per-step JSONL (--log-jsonl); several: the stages of a "
                                            "curriculum, in order")
    p.add_argument("--out", default=None, help="PNG path (default: next to the (first) stats file, loss.png)")
    p.add_argument("--title", default=None)
    p.add_argument("--labels", nargs="+", default=None,
                   help="the stages' names (default: each stats file's directory name)")
    p.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.stats[0])), "loss.png")
    try:
        summaries = plot_loss(args.stats, out, args.title, args.window, args.labels)
    except (StatsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loss curve: {os.path.abspath(out)}")
    for path, s in zip(args.stats, summaries):
        print(f"  {path}: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}; mean of the "
              f"first/last {s['window']} steps {s['mean_first_window']:.4f} -> {s['mean_last_window']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
