"""Deduplicate a latent cache across work units: `python -m producer.dedup CACHE_DIR`.

The CPU actors drop duplicates within each input shard as they go: a shard redone after a crash must
make exactly the same decisions, so they cannot depend on what other shards did first. Duplicates
across shards are found here, afterwards, from the hashes every sample's meta carries (`blake2b` of
the file bytes, 64-bit `phash`): samples are taken in manifest order, the first of each group is kept
and the others are published as the cache's next exclusion list (docs/cache_format.md → Exclusions),
which every loader skips. The result depends only on the cache, so a rerun on an unchanged cache
publishes nothing; run it again after more shards are committed.

Duplicates are judged within one base resolution: the same image in the 256p and the 640p stage is
intended. Samples without hashes (filters.dedup_exact / dedup_near_max_distance off) are never
excluded, only counted. Superseded work-unit versions (redone because their input changed,
producer/committed.py) are not judged: their rows stay on the list, which must keep covering them.

How: equal digests and equal pHashes are grouped by sorting; pHash pairs within the distance are found
by sorting on band combinations (`near_pairs`, no all-pairs comparison); one pass over those pairs in
sample order then decides which are kept (`greedy_duplicates`). Time grows as n log n and memory peaks
at ~140 bytes per sample (benchmarks/bench_dedup.py): about 14 GB for 100 million samples.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass

import numpy as np

from megatron_qwen_image.cache import CacheFormatError, CacheReader, CorruptShardError
from megatron_qwen_image.cache.exclusions import (Superseded, read_exclusions, superseded, with_superseded,
                                                  write_exclusions)
from producer.config import FilterConfig

log = logging.getLogger("producer.dedup")


@dataclass(frozen=True)
class Duplicates:
    """What `find_duplicates` found: the samples to exclude, counts, and a few examples for the report."""
    samples: dict[str, list[int]]  # shard path -> rows of duplicates
    superseded: Superseded         # versions replaced by a redo: not judged, excluded as a whole
    counts: Counter                # scanned, shards, exact_duplicate, near_duplicate, unhashed, corrupt_shards
    examples: list[dict]           # the first (duplicate, kept) pairs in manifest order
    seconds: float


class HashColumns:
    """Per sample, in scan order: a 128-bit digest of its `blake2b` string, its 64-bit pHash, which of the
    two it has, and its place (shard number, row, base resolution), in flat arrays: ~34 bytes a sample."""

    TYPES = {"b2_hi": ("Q", np.uint64), "b2_lo": ("Q", np.uint64), "ph": ("Q", np.uint64),
             "flags": ("B", np.uint8), "shard": ("i", np.int32), "row": ("i", np.int32), "base": ("i", np.int32)}

    def __init__(self):
        self.cols = {name: array(code) for name, (code, _) in self.TYPES.items()}

    def __len__(self) -> int:
        return len(self.cols["row"])

    def add(self, blake2b: str | None, phash: int | None, shard: int, row: int, base: int) -> int:
        """Append one sample; returns its flags (bit 0: has a digest, bit 1: has a pHash)."""
        flags = (blake2b is not None) | (phash is not None) << 1
        # A fixed-size digest of the stored digest string: any string works, equal strings stay equal.
        d = hashlib.blake2b(blake2b.encode(), digest_size=16).digest() if blake2b is not None else bytes(16)
        c = self.cols
        c["b2_hi"].append(int.from_bytes(d[:8], "little"))
        c["b2_lo"].append(int.from_bytes(d[8:], "little"))
        c["ph"].append(phash or 0)
        c["flags"].append(flags)
        c["shard"].append(shard)
        c["row"].append(row)
        c["base"].append(base)
        return flags

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as numpy arrays (views, no copy)."""
        return {name: np.frombuffer(self.cols[name], dtype=dt) if len(self) else np.zeros(0, dt)
                for name, (_, dt) in self.TYPES.items()}


def find_duplicates(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                    progress_every_s: float = 10.0) -> Duplicates:
    """Scan the cache for duplicates across work units. The scan keeps only `HashColumns`; key names are
    read back for the report's examples alone."""
    reader = CacheReader(root, verify="none")
    sup = superseded(reader.log)
    shards = [s for s in reader.shards() if s.work_unit not in sup.work_units]
    cols = HashColumns()
    counts: Counter = Counter()
    t0 = last = time.time()
    for k, info in enumerate(shards):
        try:
            metas = reader.open(info).column("meta")
        except CorruptShardError as e:  # loaders skip it too; nothing of it can be kept or excluded
            log.warning("dedup: skipping corrupt shard: %s", e)
            counts["corrupt_shards"] += 1
            continue
        for row, meta_json in enumerate(metas):
            meta = json.loads(meta_json or "{}")
            ph = meta.get("phash")
            if not cols.add(meta.get("blake2b"), int(ph, 16) if ph is not None else None, k, row,
                            info.base_resolution):
                counts["unhashed"] += 1
        if time.time() - last >= progress_every_s:
            last = time.time()
            log.info("dedup: %d/%d shards, %d samples read (%.0f samples/s)", k + 1, len(shards),
                     len(cols), len(cols) / max(1e-9, last - t0))
    a = cols.arrays()
    counts["scanned"] = len(a["row"])
    counts["shards"] = len(shards)
    dup_of = np.full(len(a["row"]), -1, np.int64)
    reason = np.zeros(len(a["row"]), np.int8)  # 0 kept, 1 exact, 2 near
    for base in np.unique(a["base"]):  # the same image in two stages is intended: judge each stage alone
        idx = np.flatnonzero(a["base"] == base)
        r, d = greedy_duplicates(a["b2_hi"][idx], a["b2_lo"][idx], a["ph"][idx], a["flags"][idx], max_distance)
        reason[idx] = r
        dup_of[idx] = np.where(d >= 0, idx[np.maximum(d, 0)], -1)
    counts["exact_duplicate"] = int((reason == 1).sum())
    counts["near_duplicate"] = int((reason == 2).sum())
    samples: dict[str, list[int]] = {}
    for i in np.flatnonzero(reason):
        samples.setdefault(shards[a["shard"][i]].path, []).append(int(a["row"][i]))
    examples = []  # the first few (duplicate, kept) pairs in manifest order, for the report
    key_cache: dict = {}

    def key_of(i):
        shard = int(a["shard"][i])
        if shard not in key_cache:
            key_cache[shard] = reader.open(shards[shard]).column("key")
        return key_cache[shard][int(a["row"][i])]

    for i in np.flatnonzero(reason)[:20]:
        examples.append({"key": key_of(i), "reason": ("exact_duplicate", "near_duplicate")[reason[i] - 1],
                         "duplicate_of": key_of(dup_of[i]), "shard": shards[a["shard"][i]].path,
                         "row": int(a["row"][i])})
    return Duplicates(samples, sup, counts, examples, time.time() - t0)


def greedy_duplicates(b2_hi: np.ndarray, b2_lo: np.ndarray, ph: np.ndarray, flags: np.ndarray,
                      max_distance: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which samples (in order) duplicate an earlier *kept* one. Returns (reason, dup_of): reason 0 kept,
    1 exact (same bytes digest), 2 near (pHash within `max_distance` bits; None: no near check); dup_of
    the index of the kept sample it duplicates, -1 if kept. flags: bit 0 has a digest, bit 1 has a pHash.

    Equivalent to taking samples one by one and keeping each that matches no kept sample so far, with
    one rule made explicit: samples with the same bytes digest share the fate of the first of them.
    """
    n = len(flags)
    pos = np.arange(n)
    reason, dup_of = np.zeros(n, np.int8), np.full(n, -1, np.int64)
    has_b2, has_ph = (flags & 1).astype(bool), (flags & 2).astype(bool) & (max_distance is not None)
    # 1. Same digest: every sample after the first of its group follows that first one ("exact rep").
    first_of = _first_of_equal(n, np.flatnonzero(has_b2), (b2_hi, b2_lo))
    reps = first_of == pos
    # 2. Among exact reps with a pHash: the same pHash again follows its first ("pHash rep"): it is within
    #    0 bits of it, and as close to whatever that one duplicates.
    ph_first = _first_of_equal(n, np.flatnonzero(reps & has_ph), (ph,))
    # 3. Distinct pHashes: candidate pairs within max_distance, then the greedy pass in sample order.
    uniq = np.flatnonzero(reps & has_ph & (ph_first == pos))
    kept = np.ones(n, bool)
    if len(uniq) > 1 and max_distance:
        earlier, later = near_pairs(ph[uniq], max_distance)
        for i, j in zip(uniq[earlier].tolist(), uniq[later].tolist()):  # sorted by later, then earlier
            if kept[j] and kept[i]:
                kept[j], reason[j], dup_of[j] = False, 2, i
    # Followers of a pHash rep: near duplicates of it if it is kept, else of what it duplicates.
    f = np.flatnonzero(reps & has_ph & (ph_first != pos))
    r = ph_first[f]
    reason[f], dup_of[f], kept[f] = 2, np.where(kept[r], r, dup_of[r]), False
    # Followers of an exact rep: exact duplicates of it if it is kept, else they share its fate.
    f = np.flatnonzero(~reps)
    r = first_of[f]
    reason[f] = np.where(kept[r], 1, reason[r])
    dup_of[f] = np.where(kept[r], r, dup_of[r])
    return reason, dup_of


def _first_of_equal(n: int, idx: np.ndarray, keys: tuple) -> np.ndarray:
    """first[i]: the smallest index in `idx` whose keys all equal i's, for i in `idx`; i elsewhere."""
    first = np.arange(n)
    order = idx[np.lexsort((idx, *(k[idx] for k in keys)))]  # grouped by keys, each group by index
    if len(order):
        new_group = np.zeros(len(order), bool)
        new_group[0] = True
        for k in keys:
            sk = k[order]
            new_group[1:] |= sk[1:] != sk[:-1]
        first[order] = order[np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))]
    return first


def near_pairs(h: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of distinct 64-bit hashes within `max_distance` bits, sorted by (j, i).

    Pigeonhole, generalised: split the bits into d + k bands; d differing bits leave at least k bands
    equal, so every close pair agrees exactly on some k of them. For each k-combination, sort the hashes
    masked to those bands and compare only neighbours with equal keys. k ~ 0.6 d keeps the keys near 27+
    bits wide (few false candidates even for 10^8 hashes) at C(d+k, k) sorts: 35 for d = 4.
    """
    d = max_distance
    k = max(1, math.ceil(0.6 * d))
    m = d + k
    edges = [round(i * 64 / m) for i in range(m + 1)]
    band_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:])]
    found = []
    for combo in itertools.combinations(band_masks, k):
        keys = h & np.uint64(sum(combo))
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        lag = 1
        while lag < len(sk):  # equal keys are adjacent after sorting: pairs at distance 1, 2, ... in a run
            eq = np.flatnonzero(sk[lag:] == sk[:-lag])
            if not len(eq):
                break
            a, b = order[eq], order[eq + lag]
            i, j = np.minimum(a, b), np.maximum(a, b)
            close = np.bitwise_count(h[i] ^ h[j]) <= d
            found.append(j[close].astype(np.uint64) * np.uint64(len(h)) + i[close].astype(np.uint64))
            lag += 1
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    return (codes % np.uint64(len(h))).astype(np.int64), (codes // np.uint64(len(h))).astype(np.int64)


def dedup_cache(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                dry_run: bool = False) -> dict:
    """Find cross-work-unit duplicates and publish them as a new exclusion list unless it equals the
    current one. Returns a report (counts, the list number in force, a few examples)."""
    found = find_duplicates(root, max_distance)
    current = read_exclusions(root)
    samples = with_superseded(found.samples, found.superseded)
    unchanged = current.same_rows(samples)
    number = current.number
    if not dry_run and not unchanged:
        number = write_exclusions(root, samples, {
            "tool": "producer.dedup", "max_distance": max_distance,
            "counts": {k: v for k, v in found.counts.items() if k in ("exact_duplicate", "near_duplicate")},
            "superseded": sorted(found.superseded.work_units)})
    c = found.counts
    return {"cache_dir": root, "shards": c["shards"], "samples": c["scanned"],
            "exact_duplicate": c["exact_duplicate"], "near_duplicate": c["near_duplicate"],
            "unhashed": c["unhashed"], "corrupt_shards": c["corrupt_shards"],
            "excluded": sum(map(len, found.samples.values())),
            "superseded_samples": sum(map(len, found.superseded.samples.values())),
            "max_distance": max_distance, "exclusion_list": number, "previous_list": current.number,
            "changed": not unchanged, "written": not dry_run and not unchanged, "dry_run": dry_run,
            "seconds": round(found.seconds, 3), "examples": found.examples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir")
    p.add_argument("--max-distance", type=int, default=FilterConfig.dedup_near_max_distance,
                   help="pHash Hamming distance for near-duplicates (default %(default)s; -1: exact only)")
    p.add_argument("--dry-run", action="store_true", help="report, do not publish an exclusion list")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.max_distance is not None and not -1 <= args.max_distance < 32:
        p.error(f"--max-distance must be in -1..31, got {args.max_distance}")
    try:
        report = dedup_cache(args.cache_dir, None if args.max_distance == -1 else args.max_distance, args.dry_run)
    except CacheFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['samples']} samples in {report['shards']} shards scanned in {report['seconds']:.1f} s: "
          f"{report['exact_duplicate']} exact and {report['near_duplicate']} near duplicates across work units"
          + (f", {report['unhashed']} without hashes (not judged)" if report["unhashed"] else "")
          + (f", {report['corrupt_shards']} corrupt shards skipped" if report["corrupt_shards"] else ""))
    for ex in report["examples"][:5]:
        print(f"  {ex['key']} ({ex['reason']}) duplicates {ex['duplicate_of']}")
    if report["dry_run"]:
        print("dry run: nothing published")
    elif report["written"]:
        print(f"published exclusion list {report['exclusion_list']} ({report['excluded']} samples); loaders "
              "started from now on skip them (a resumed run keeps the list it started with)")
    else:
        print(f"unchanged: exclusion list {report['exclusion_list']} already lists exactly these samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
