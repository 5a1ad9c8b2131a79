"""Histograms of the image-quality scores of every measured image, kept or dropped (for the data report).

The filters measure clarity, luma, saturation, entropy and texture once per decoded image
(`filters.image_stats`); the cache keeps the scores of the images it keeps only. To show where each
threshold cuts, the producer counts every measured image into fixed bins: a Counter of "name/bin",
summed over chunks like the drop counts, and written to the run report with the thresholds in force.
Clarity (a Laplacian variance, 0 to ~10^4) is binned on log10(1 + x).
"""
from __future__ import annotations

import math
from collections import Counter

from producer.config import FilterConfig

BINS = 40
# score -> (low, high, log10(1 + x) axis); values outside go to the first / last bin
RANGES = {"clarity": (0.0, 4.5, True), "luma": (0.0, 1.0, False), "saturation": (0.0, 1.0, False),
          "entropy": (0.0, 8.0, False), "texture": (0.0, 1.0, False)}
# score -> the FilterConfig keys of its lower and upper threshold
THRESHOLDS = {"clarity": ("min_clarity", None), "luma": ("min_luma", "max_luma"),
              "saturation": (None, "max_saturation"), "entropy": ("min_entropy", None),
              "texture": (None, "max_texture")}


def count_scores(counts: Counter, scores: dict) -> None:
    """Add one image's scores ({name: value}) to `counts` ("name/bin" -> images)."""
    for name, value in scores.items():
        if name not in RANGES:
            continue
        lo, hi, log = RANGES[name]
        x = math.log10(1.0 + max(0.0, value)) if log else value
        counts[f"{name}/{min(BINS - 1, max(0, int((x - lo) / (hi - lo) * BINS)))}"] += 1


def histograms(counts: Counter, cfg: FilterConfig) -> dict:
    """The report's `score_histograms`: per score its bin edges (on the score's own scale), counts, and the
    thresholds in force (null where a check is off)."""
    out = {}
    for name, (lo, hi, log) in RANGES.items():
        row = [counts.get(f"{name}/{b}", 0) for b in range(BINS)]
        if not any(row):
            continue
        edges = [lo + (hi - lo) * b / BINS for b in range(BINS + 1)]
        low_key, high_key = THRESHOLDS[name]
        out[name] = {"edges": [round(10 ** e - 1.0, 4) if log else round(e, 4) for e in edges], "log": log,
                     "counts": row, "min": getattr(cfg, low_key) if low_key else None,
                     "max": getattr(cfg, high_key) if high_key else None}
    return out
