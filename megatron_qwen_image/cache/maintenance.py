"""Offline tools over a cache: summary (inspect), integrity (verify), garbage collection (cleanup),
manifest snapshots (compact is manifest.compact; verify_snapshots checks them)."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from .format import BUCKET_PREFIX, SHARD_SUFFIX, TMP_DIR, CorruptShardError, group_name
from .exclusions import read_exclusions
from .manifest import ManifestLog, SnapshotCorrupt, list_snapshots, read_snapshot, snapshot_path
from .reader import CacheReader

TEXT_LEN_BINS = (1, 33, 65, 129, 257, 513, 1025)


def inspect_cache(root: str, text_lengths: bool = True) -> dict:
    """Buckets, sample counts, bytes per sample and a text-length histogram (per bucket). A bucket's image-editing
    samples are listed apart, per condition group ("640x480 +cond 16x80x60", with its "cond_shapes")."""
    r = CacheReader(root, verify="none")
    buckets = {}
    for s in r.shards():
        b = buckets.setdefault(group_name(s.bucket, s.cond_shapes), {
            "shards": 0, "samples": 0, "bytes": 0, "latent_shape": list(s.latent_shape),
            **({"cond_shapes": [list(c) for c in s.cond_shapes]} if s.cond_shapes else {}),
            "latent_dtypes": set(), "text_dims": set(), "base_resolutions": set(), "text_lengths": []})
        b["shards"] += 1
        b["samples"] += s.num_samples
        b["bytes"] += s.bytes
        b["latent_dtypes"].add(s.latent_dtype)
        b["text_dims"].add(s.text_dim)
        b["base_resolutions"].add(s.base_resolution)
        if text_lengths:
            try:
                b["text_lengths"].append(r.open(s).text_lengths())
            except CorruptShardError as e:
                b.setdefault("unreadable", []).append(str(e))
    for b in buckets.values():
        b["bytes_per_sample"] = b["bytes"] / max(1, b["samples"])
        for k in ("latent_dtypes", "text_dims", "base_resolutions"):
            b[k] = sorted(b[k], key=str)
        lens = np.concatenate(b.pop("text_lengths")) if text_lengths and b["samples"] else np.zeros(0)
        if len(lens):
            counts, _ = np.histogram(lens, bins=list(TEXT_LEN_BINS) + [np.inf])
            b["text_len"] = {"min": int(lens.min()), "mean": float(lens.mean()), "max": int(lens.max()),
                             "histogram": {f"{lo}-{hi - 1}" if hi != np.inf else f">={lo}": int(c)
                                           for lo, hi, c in zip(TEXT_LEN_BINS, list(TEXT_LEN_BINS[1:]) + [np.inf],
                                                                counts)}}
    entries = r.log.entries
    ex = read_exclusions(root)
    return {
        "exclusion_list": ex.number, "excluded_samples": ex.num_samples,
        "root": r.root, "format_version": r.log.info["format_version"], "sealed": r.sealed,
        "entries": len(entries), "snapshot_entries": r.log.from_snapshot,
        "duplicate_entries": sum(e.duplicate for e in entries),
        "corrupt_entries": [e.corrupt for e in entries if e.corrupt],
        "work_units": sum(1 for e in entries if not e.duplicate and e.corrupt is None),
        "samples": sum(b["samples"] for b in buckets.values()),
        "bytes": sum(b["bytes"] for b in buckets.values()),
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1]["samples"])),
    }


def cleanup(root: str, grace_s: float = 3600.0, dry_run: bool = False) -> dict:
    """Delete what no reader will ever use: temp files of dead writers, and shard files that no
    counting manifest entry references (a writer killed between rename and log append, or the losing
    attempt of a work unit committed twice). Only files older than `grace_s` are touched, so a live
    writer (whose files are seconds old at that stage) is never disturbed."""
    r = CacheReader(root, verify="none")
    referenced = {s.path for s in r.shards()}
    now = time.time()
    removed = {"temp_files": [], "unreferenced_shards": []}

    def old(path):
        try:
            return now - os.path.getmtime(path) >= grace_s
        except FileNotFoundError:
            return False

    tmp_dir = os.path.join(r.root, TMP_DIR)
    for name in sorted(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else []:
        p = os.path.join(tmp_dir, name)
        if old(p):
            removed["temp_files"].append(p)
    for d in sorted(os.listdir(r.root)):
        if not d.startswith(BUCKET_PREFIX):
            continue
        for name in sorted(os.listdir(os.path.join(r.root, d))):
            rel = f"{d}/{name}"
            p = os.path.join(r.root, d, name)
            if name.endswith(SHARD_SUFFIX) and rel not in referenced and old(p):
                removed["unreferenced_shards"].append(p)
    if not dry_run:
        for p in removed["temp_files"] + removed["unreferenced_shards"]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return removed


def verify_snapshots(root: str) -> list[str]:
    """Every manifest snapshot against the entry files it stands for (readers must get the same entries
    from either). Returns the problems found; a damaged snapshot is one (readers ignore it)."""
    snapshots = list_snapshots(root)
    if not snapshots:
        return []
    files = ManifestLog(root, use_snapshots=False)
    files.refresh()
    problems = []
    for n in snapshots:
        try:
            entries = read_snapshot(root, n)
        except FileNotFoundError:
            continue  # pruned meanwhile by a compaction
        except (OSError, SnapshotCorrupt) as e:
            problems.append(f"{e} (readers ignore it and read the entries; safe to delete)")
            continue
        # duplicate flags are not stored: every reader derives them from the log order
        differ = [e.seq for e, f in zip(entries, files.entries) if e != replace(f, duplicate=False)]
        if differ:
            problems.append(f"{snapshot_path(root, n)}: differs from manifest entries {differ[:5]}"
                            f"{' ...' if len(differ) > 5 else ''}: readers use it, delete it")
    return problems
