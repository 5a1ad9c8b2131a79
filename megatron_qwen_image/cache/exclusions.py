"""Exclusion lists: committed samples that readers skip (spec: docs/cache_format.md → Exclusions).

Shard files are immutable, so a sample found to be unwanted after it was committed (a duplicate of a
sample in another work unit, found by `python -m producer.dedup`) is not deleted; it is listed.

`exclusions/NNNNNN.json` files are numbered from 1 and never modified: each is a complete list (not
a delta), the highest number is the current one. A loader records the number it planned with, so a
run resumed from a checkpoint keeps exactly the sample set it started with even if a newer list
appeared meanwhile; a run started afresh takes the newest.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from megatron_qwen_image.fsutil import create_exclusive

from .format import (BUCKET_PREFIX, EXCLUSIONS_DIR, FORMAT_NAME, FORMAT_VERSION, TMP_DIR, CacheFormatError,
                     check_version, work_unit_id)
from .manifest import ManifestLog

_NAME = re.compile(r"^(\d{6})\.json$")


@dataclass
class Exclusions:
    number: int                                  # 0: no list (nothing excluded)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # shard path (relative) -> sorted row indexes
    info: dict = field(default_factory=dict)     # what made the list (tool, reasons, counts)

    @property
    def num_samples(self) -> int:
        return int(sum(len(r) for r in self.rows.values()))

    def by_bucket(self) -> dict[str, int]:
        """Excluded samples per bucket name ("640x480"), from the shard paths' bucket directories."""
        out: dict[str, int] = {}
        for path, rows in self.rows.items():
            name = os.path.dirname(path).removeprefix(BUCKET_PREFIX)
            out[name] = out.get(name, 0) + len(rows)
        return out

    def same_rows(self, samples: dict[str, list[int]]) -> bool:
        """Whether `samples` (shard path -> rows) lists exactly the rows this list does."""
        other = {p: np.unique(np.asarray(r, dtype=np.int64)) for p, r in samples.items() if len(r)}
        return other.keys() == self.rows.keys() and all(np.array_equal(other[p], self.rows[p]) for p in other)


def _path(root: str, number: int) -> str:
    return os.path.join(root, EXCLUSIONS_DIR, f"{number:06d}.json")


def latest_number(root: str) -> int:
    try:
        names = os.listdir(os.path.join(root, EXCLUSIONS_DIR))
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for m in map(_NAME.match, names) if m), default=0)


def read_exclusions(root: str, number: int | None = None) -> Exclusions:
    """List `number` (default: the newest; 0 or none yet: an empty list). Refuses unknown versions."""
    number = latest_number(root) if number is None else int(number)
    if number == 0:
        return Exclusions(0)
    path = _path(root, number)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise CacheFormatError(f"{path}: exclusion list {number} does not exist (a loader state refers to it; "
                               "exclusion lists are never deleted)") from None
    except ValueError as e:
        raise CacheFormatError(f"{path}: unreadable exclusion list: {e}") from None
    if doc.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{path}: not a {FORMAT_NAME} exclusion list")
    check_version(doc.get("format_version"), path)
    rows = {p: np.unique(np.asarray(r, dtype=np.int64)) for p, r in doc["samples"].items() if r}
    return Exclusions(number, rows, doc.get("info", {}))


def write_exclusions(root: str, samples: dict[str, list[int]], info: dict) -> int:
    """Publish a new complete list (shard path -> rows); returns its number. Safe against a concurrent
    writer: each number is created exclusively, the later one simply gets the next number."""
    os.makedirs(os.path.join(root, EXCLUSIONS_DIR), exist_ok=True)
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_unix": time.time(), "info": info,
           "samples": {p: sorted(int(r) for r in rows) for p, rows in sorted(samples.items()) if rows}}
    data = json.dumps(doc, indent=None, separators=(",", ":")).encode()
    number = latest_number(root) + 1
    while not create_exclusive(_path(root, number), data, os.path.join(root, TMP_DIR)):
        number += 1
    return number


@dataclass(frozen=True)
class Superseded:
    """Work units that a later counting entry supersedes, and every row of their counting entries' shards."""
    work_units: frozenset[str]
    samples: dict[str, list[int]]  # shard path -> rows


def superseded(log: ManifestLog) -> Superseded:
    """What a complete exclusion list must cover of the log `log` has read so far."""
    names = {e.supersedes for e in log.entries if e.corrupt is None and not e.duplicate and e.supersedes}
    wuids = {work_unit_id(n) for n in names}
    samples = {s.path: list(range(s.num_samples))
               for e in log.entries if e.corrupt is None and not e.duplicate and e.wuid in wuids for s in e.shards}
    return Superseded(frozenset(names), samples)


def covers(ex: Exclusions, work_units) -> bool:
    """Whether list `ex` excludes every row of these superseded work units (by the names it records)."""
    return set(work_units) <= set(ex.info.get("superseded", ()))


def with_superseded(samples: dict[str, list[int]], sup: Superseded) -> dict[str, list[int]]:
    """`samples` (shard path -> rows) plus every superseded row."""
    out = {p: list(r) for p, r in samples.items()}
    for p, rows in sup.samples.items():
        out[p] = sorted(set(out.get(p, ())) | set(rows))
    return out


def publish_superseded(root: str, log: ManifestLog) -> int | None:
    """Publish the current list plus every superseded work unit's rows (reading the entries that appeared in
    the log since `log` last looked), unless the current list covers them already. Returns the new list's
    number, or None if none was needed."""
    log.refresh()
    sup = superseded(log)
    current = read_exclusions(root)
    if covers(current, sup.work_units):
        return None
    info = {**current.info, "superseded": sorted(sup.work_units | set(current.info.get("superseded", ())))}
    return write_exclusions(root, with_superseded({p: r.tolist() for p, r in current.rows.items()}, sup), info)
