"""Per-category sampling weights: the report's category balance (§3.2, stage 4) at training time.

The producer stores a sample's category as the top-level `category` field of its meta JSON (producer/categories.py:
from the input's metadata, a caption rule or a default). A stage's `category_weights` such as
{"portrait": 0.2, "text_rendering": 0.2, "*": 0.6} give each category that share of the samples an epoch (or a
streaming round) trains on; "*" stands for every category not named, uncategorised samples included, as one
group. A sample whose category the weights do not cover (no "*") or give weight 0 is left out.

Each category (group) is a code: its index among the sorted named categories, "*" last. The loader reads a
shard's categories once, from its meta column, and keeps one byte per sample; planning (plan.weigh_categories)
then draws each group's share from them.
"""
from __future__ import annotations

import json

import numpy as np

OTHER = "*"            # every category the weights do not name, and samples without one
UNWEIGHTED = 255       # the code of a sample no group covers (left out of the plan)
MAX_CATEGORIES = 254   # named categories (codes 0..253, "*" after them)


def check_category_weights(weights) -> dict | None:
    """{category: weight} with non-empty string keys and weights >= 0 summing to > 0; ValueError naming the
    problem."""
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"category_weights={weights!r} must be a mapping of category to weight, e.g. "
                         f"{{portrait: 0.2, text_rendering: 0.2, '*': 0.6}}")
    out = {}
    for category, weight in weights.items():
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"category_weights: {category!r} is not a category name (a non-empty string; "
                             f"'{OTHER}' stands for all the others)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"category_weights[{category}]={weight!r} must be a number >= 0")
        out[category.strip()] = float(weight)
    if sum(out.values()) <= 0:
        raise ValueError(f"category_weights={weights!r}: the weights must sum to a positive number")
    if len(out) - (OTHER in out) > MAX_CATEGORIES:
        raise ValueError(f"category_weights names {len(out)} categories; at most {MAX_CATEGORIES} are supported")
    return out


def category_of(meta_json: str) -> str | None:
    """The `category` a stored sample's meta JSON gives (None: none, or not a non-empty string)."""
    if '"category"' not in meta_json:  # most samples of most caches: skip the parse
        return None
    try:
        value = json.loads(meta_json).get("category")
    except (ValueError, AttributeError):
        return None
    return (value.strip() or None) if isinstance(value, str) else None


class CategoryGroups:
    """The sampling groups of one set of category_weights: their names, weights and codes."""

    def __init__(self, weights: dict):
        named = sorted(c for c in weights if c != OTHER)
        self.names = named + ([OTHER] if OTHER in weights else [])
        self.weights = np.array([weights[n] for n in self.names], dtype=np.float64)
        self._code = {n: i for i, n in enumerate(named)}
        self._other = len(named) if OTHER in weights else UNWEIGHTED

    def code(self, category: str | None) -> int:
        """The group a sample of `category` samples in (UNWEIGHTED: none, or one of weight 0)."""
        c = self._code.get(category, self._other) if category is not None else self._other
        return c if c == UNWEIGHTED or self.weights[c] > 0 else UNWEIGHTED

    def codes(self, meta_column: list[str]) -> np.ndarray:
        """One shard's group codes (uint8 per row) from its meta JSON strings."""
        return np.array([self.code(category_of(m)) for m in meta_column], dtype=np.uint8)

    def describe(self, counts: dict, unweighted: int) -> str:
        """One line for the start-up log: each group's share and samples (planned so far), and those left out."""
        total = self.weights.sum()
        shares = ", ".join(f"{n} {w / total:.0%} ({counts.get(n, 0):,} samples)" for n, w in zip(self.names, self.weights))
        return f"category weights: {shares}; {unweighted:,} samples of no weighted category left out"
