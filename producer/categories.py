"""Each sample's category, for the trainer's category balance (report §3.2, stage 4; data.cache.category_weights).

The producer writes it as the top-level `category` field of the sample's stored meta JSON, from (first that gives
one): the input's own metadata (`categories.field` of the img2dataset KEY.json sidecar, the Parquet row's extra
columns or the folder's stem.json: what a captioner or a labelling job wrote), the first caption rule that matches
(`categories.rules`), or `categories.default`. A sample none of them gives a category stores none; the trainer
counts it under '*'. The producer's report counts the written samples per category.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_qwen_image.config import ConfigError, option

UNCATEGORISED = "(none)"  # the report's name for samples stored without a category


@dataclass
class CategoryRule:
    """A caption rule: captions in which `caption` (a regular expression) is found get `category`."""

    category: str = option("", "the category it gives")
    caption: str = option("", "a regular expression searched in the caption ((?i) for any case)")


@dataclass
class CategoryConfig:
    """Where each sample's category comes from (producer/categories.py): the input's metadata field, else the
    first matching caption rule, else the default."""

    field: str | None = option("category", "the input metadata's field holding the category (dots for a nested "
                                           "one: labels.category); null: not read")
    rules: list[CategoryRule] = option([], "caption rules, first match wins, for samples the field gives none, e.g. "
                                           "[{category: text_rendering, caption: '(?i)\\bthe (text|words)\\b'}]")
    default: str | None = option(None, "the category of samples neither gives one (null: none stored)")


def validate_categories(cfg: CategoryConfig, key: str = "categories") -> None:
    """ConfigError naming the key of a rule that does not compile or names no category, or of an empty name."""
    if cfg.field is not None and not cfg.field.strip():
        raise ConfigError(f"{key}.field", "must name a metadata field, or be null")
    if cfg.default is not None and not cfg.default.strip():
        raise ConfigError(f"{key}.default", "must be a non-empty category name, or null")
    for i, rule in enumerate(cfg.rules):
        if not rule.category.strip():
            raise ConfigError(f"{key}.rules[{i}].category", "must be a non-empty category name")
        try:
            re.compile(rule.caption)
        except re.error as e:
            raise ConfigError(f"{key}.rules[{i}].caption", f"not a regular expression ({e}): {rule.caption!r}") from None


class Categorizer:
    """A sample's category from its input metadata and caption (module docstring); None: none."""

    def __init__(self, cfg: CategoryConfig):
        self.path = cfg.field.strip().split(".") if cfg.field else None
        self.rules = [(re.compile(r.caption), r.category.strip()) for r in cfg.rules]
        self.default = cfg.default.strip() if cfg.default else None

    def __call__(self, source_meta: dict, caption: str) -> str | None:
        return self.from_meta(source_meta) or next((c for p, c in self.rules if p.search(caption)), self.default)

    def from_meta(self, meta: dict) -> str | None:
        """The field's value as a name: a non-empty string, or an integer label; anything else (a list, a mapping,
        a boolean, an empty string) gives none."""
        if self.path is None:
            return None
        value = meta
        for part in self.path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return str(value)
        return (value.strip() or None) if isinstance(value, str) else None
