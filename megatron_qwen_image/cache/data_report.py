"""A data report a person looks at: `python -m megatron_qwen_image.cache report CACHE [--encoders DIR] [--out DIR]`.

Writes `CACHE/reports/data/index.html` (or `--out DIR`) with one PNG per figure:
- drops per filter, summed over the producer runs' reports (`CACHE/reports/producer-*.json`, where the
  producer writes them by default, or `--reports FILE...`);
- a histogram of each image-quality score over every measured image, kept or dropped, with the
  thresholds that were in force drawn on it (the producer counts them: producer/score_histograms.py);
- the bucket distribution of each family (base resolution), from the manifest (image-editing samples
  per condition group, "640x480 +cond 16x80x60");
- the text-length distribution (Qwen2.5-VL tokens), from the cache;
- samples/s over time, one line per producer run;
- a contact sheet per bucket (and condition group): the first samples' (target) latents decoded back to
  pixels through the VAE, with their captions (needs the encoders directory; without it the report says
  how to get them).

`decode_key` (`cache inspect CACHE --decode KEY`) decodes one sample the same way.
"""
from __future__ import annotations

import glob
import html
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import matplotlib
import numpy as np
import torch

from ..encoders.vae import QwenVAEEncoder
from ..image_grid import image_grid, save_png
from .exclusions import read_exclusions
from .format import group_name, parse_bucket_name
from .reader import CacheReader

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

REPORT_DIR = os.path.join("reports", "data")


@dataclass
class DataSummary:
    """What the report draws, gathered from the producer reports and the cache."""

    reports: list[str] = field(default_factory=list)           # producer report paths read
    unreadable_reports: list[str] = field(default_factory=list)
    seen: int = 0
    written: int = 0
    drops: Counter = field(default_factory=Counter)
    scores: dict = field(default_factory=dict)                 # name -> {edges, counts, min, max, log}
    timelines: list[tuple[str, list]] = field(default_factory=list)  # (run, [[s, seen, written], ...])
    families: dict = field(default_factory=dict)               # base resolution -> {group name: samples}
    text_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    samples: int = 0


def producer_reports(root: str) -> list[str]:
    """Where the producer writes its run reports by default."""
    return sorted(glob.glob(os.path.join(root, "reports", "producer-*.json")))


def summarize(root: str, reports: list[str] | None = None) -> DataSummary:
    """`reports`: the producer run reports to read (default: `producer_reports(root)`)."""
    out = DataSummary()
    for path in producer_reports(root) if reports is None else reports:
        try:
            with open(path) as f:
                r = json.load(f)
            samples = r["samples"]
        except (OSError, ValueError, KeyError) as e:
            out.unreadable_reports.append(f"{path}: {e}")
            continue
        out.reports.append(path)
        out.seen += samples["seen"]
        out.written += samples["written"]
        out.drops.update(r.get("drops", {}))
        for name, h in r.get("score_histograms", {}).items():
            have = out.scores.get(name)
            if have is None or have["edges"] != h["edges"]:
                out.scores[name] = {**h, "counts": list(h["counts"])}  # the latest run's bins and thresholds
            else:
                have["counts"] = [a + b for a, b in zip(have["counts"], h["counts"])]
        if r.get("timeline"):
            out.timelines.append((os.path.basename(path), r["timeline"]))
    reader = CacheReader(root, verify="none")
    lengths = []
    for s in reader.shards():
        fam = out.families.setdefault(s.base_resolution, Counter())
        fam[group_name(s.bucket, s.cond_shapes)] += s.num_samples
        out.samples += s.num_samples
        lengths.append(reader.open(s).text_lengths())
    if lengths:
        out.text_lengths = np.concatenate(lengths)
    return out


def _aspect(name: str) -> float:
    """Width / height of a group name's bucket ("640x480" or "640x480 +cond 16x80x60")."""
    w, h = parse_bucket_name(name.split(" ")[0])
    return w / h


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_drops(s: DataSummary, path: str) -> str | None:
    if not s.drops:
        return None
    items = sorted(s.drops.items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#c0504d")
    ax.set_xlabel(f"samples dropped (of {s.seen:,} seen, {s.written:,} written)")
    ax.set_title("drops per filter")
    return _save(fig, path)


def plot_scores(s: DataSummary, path: str) -> str | None:
    if not s.scores:
        return None
    fig, axes = plt.subplots(1, len(s.scores), figsize=(3.2 * len(s.scores), 2.8), squeeze=False)
    for ax, (name, h) in zip(axes[0], sorted(s.scores.items())):
        edges = np.asarray(h["edges"], float)
        x = np.log10(1 + edges) if h["log"] else edges
        ax.bar(x[:-1], h["counts"], width=np.diff(x), align="edge", color="#4f81bd")
        for key, style in (("min", "--"), ("max", ":")):
            if h.get(key) is not None:
                t = np.log10(1 + h[key]) if h["log"] else h[key]
                ax.axvline(t, color="#c0504d", linestyle=style, label=f"{key} {h[key]:g}")
                ax.legend(fontsize=7)
        ax.set_title(name + (" (log10(1+x))" if h["log"] else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("measured images")
    return _save(fig, path)


def plot_buckets(s: DataSummary, path: str) -> str | None:
    if not s.families:
        return None
    fams = sorted(s.families.items(), key=lambda kv: kv[0] or 0)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 3.2), squeeze=False)
    for ax, (base, buckets) in zip(axes[0], fams):
        names = sorted(buckets, key=lambda b: (_aspect(b), b))
        ax.bar(names, [buckets[n] for n in names], color="#9bbb59")
        ax.set_title(f"{base}p family: {sum(buckets.values()):,} samples", fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    axes[0][0].set_ylabel("samples")
    return _save(fig, path)


def plot_text_lengths(s: DataSummary, path: str) -> str | None:
    if not len(s.text_lengths):
        return None
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.hist(s.text_lengths, bins=min(50, max(5, len(np.unique(s.text_lengths)))), color="#8064a2")
    ax.set_xlabel("caption length (text-encoder tokens)")
    ax.set_ylabel("samples")
    ax.set_title(f"text length: median {int(np.median(s.text_lengths))}, max {int(s.text_lengths.max())}")
    return _save(fig, path)


def plot_throughput(s: DataSummary, path: str) -> str | None:
    if not s.timelines:
        return None
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for name, tl in s.timelines:
        t = np.asarray([p[0] for p in tl], float)
        seen = np.asarray([p[1] for p in tl], float)
        if len(t) < 2:
            continue
        rate = np.diff(seen) / np.maximum(np.diff(t), 1e-9)
        ax.step(t[1:], rate, where="pre", label=name.removeprefix("producer-").removesuffix(".json"))
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("samples seen / s")
    ax.set_title("producer throughput")
    if ax.lines:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _decode(vae: QwenVAEEncoder, latents: list[torch.Tensor]) -> list:
    return vae.to_pil(vae.decode(torch.stack([lat.float() for lat in latents])).float())


def pick_samples(root: str, per_bucket: int) -> dict[str, list]:
    """For each bucket (and condition group), its first `per_bucket` samples in manifest order that loaders read
    (not on the exclusion list): {group name: [(key, latent, caption, condition latents)]}."""
    reader = CacheReader(root, verify="sample")
    excluded = read_exclusions(root).rows  # what loaders skip is not what training reads: left out here too
    picked: dict = defaultdict(list)
    for info in reader.shards():
        name = group_name(info.bucket, info.cond_shapes)
        if len(picked[name]) >= per_bucket:
            continue
        shard = reader.open(info)
        captions = shard.column("caption")
        skip = set(excluded.get(info.path, np.zeros(0, np.int64)).tolist())
        for i in (i for i in range(info.num_samples) if i not in skip):
            if len(picked[name]) >= per_bucket:
                break
            key, lat, _ = shard.sample(i)
            picked[name].append((key, lat.clone(), captions[i], [c.clone() for c in shard.conditions(i)]))
    return picked


def contact_sheets(root: str, encoders: str, out_dir: str, per_bucket: int = 4) -> list[tuple[str, str]]:
    """`pick_samples` decoded to pixels, a captioned row per bucket: [(bucket name, PNG path)]. An edit group's
    row shows each sample's source image(s) before its target, the instruction under the target."""
    picked = pick_samples(root, per_bucket)
    vae = QwenVAEEncoder.from_pretrained(encoders, decoder_only=True)
    sheets = []
    for name, rows in sorted(picked.items()):
        targets = _decode(vae, [lat for _, lat, _, _ in rows])
        images, captions = [], []
        for (key, _, caption, conds), target in zip(rows, targets):
            for n, cond in enumerate(conds):  # one group: every sample has the same condition shapes
                images += _decode(vae, [cond])
                captions.append(f"{key}: source" + (f" {n + 1}" if len(conds) > 1 else ""))
            images.append(target)
            captions.append(f"{key}: {caption}")
        grid = image_grid(images, captions, columns=len(images))
        file_name = re.sub(r"[^0-9A-Za-z]+", "_", name)  # "640x480 +cond 16x80x60" -> "640x480_cond_16x80x60"
        path = os.path.join(out_dir, f"samples_{file_name}.png")
        save_png(grid, path)
        sheets.append((name, path))
    return sheets


def decode_key(root: str, key: str, encoders: str, out_path: str) -> str:
    """Decode the sample `key` back to pixels through the VAE and write it as a PNG (KeyError if absent)."""
    reader = CacheReader(root, verify="sample")
    for info in reader.shards():
        shard = reader.open(info)
        keys = shard.column("key")
        if key in keys:
            _, lat, _ = shard.sample(keys.index(key))
            [image] = _decode(QwenVAEEncoder.from_pretrained(encoders, decoder_only=True), [lat.clone()])
            save_png(image, out_path)
            return out_path
    raise KeyError(f"no sample {key!r} in the cache {root}")


def write_report(root: str, out_dir: str | None = None, encoders: str | None = None, per_bucket: int = 4,
                 reports: list[str] | None = None) -> str:
    """Write the report's PNGs and index.html; returns the HTML's path."""
    out_dir = out_dir or os.path.join(root, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    s = summarize(root, reports)
    figures = [("Drops per filter", plot_drops(s, os.path.join(out_dir, "drops.png"))),
               ("Image-quality scores and thresholds", plot_scores(s, os.path.join(out_dir, "scores.png"))),
               ("Buckets per family", plot_buckets(s, os.path.join(out_dir, "buckets.png"))),
               ("Text length", plot_text_lengths(s, os.path.join(out_dir, "text_length.png"))),
               ("Producer throughput", plot_throughput(s, os.path.join(out_dir, "throughput.png")))]
    sheets = contact_sheets(root, encoders, out_dir, per_bucket) if encoders else []
    parts = [f"<h1>Data report: {html.escape(os.path.abspath(root))}</h1>",
             f"<p>{s.samples:,} samples in the cache; {len(s.reports)} producer report(s): {s.seen:,} seen, "
             f"{s.written:,} written, {sum(s.drops.values()):,} dropped.</p>"]
    parts += [f"<p>unreadable report: {html.escape(u)}</p>" for u in s.unreadable_reports]
    for title, path in figures:
        body = (f'<img src="{os.path.basename(path)}">' if path else
                "<p>no data (no producer report with it, or an empty cache)</p>")
        parts.append(f"<h2>{title}</h2>{body}")
    parts.append("<h2>Samples per bucket, decoded through the VAE</h2>")
    if not encoders:
        parts.append("<p>not drawn: pass --encoders DIR (the Qwen-Image VAE) to decode samples</p>")
    for name, path in sheets:
        parts.append(f'<h3>{name}</h3><img src="{os.path.basename(path)}">')
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>data report</title>"
                "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}img{max-width:100%}</style>"
                + "\n".join(parts))
    return index
