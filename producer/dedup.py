"""Deduplicate a latent cache across work units: `python -m producer.dedup CACHE_DIR [--workers N]`.

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
by sorting on band combinations (`near_pairs`, no all-pairs comparison). What that finds (`Relations`:
duplicates and candidate pairs, no per-sample array) goes to one pass in sample order that decides which
are kept (`decide`). In one process time grows as n log n and memory peaks at ~95 bytes per sample
(benchmarks/bench_dedup.py): about 10 GB for 100 million samples. With `--workers N` the same relations
come from Ray tasks instead (producer/dedup_ray.py: parallel scan, shuffles partitioned by key), each
holding a share of the samples, and the same pass decides: the result is the same.
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
from megatron_qwen_image.cache.manifest import ShardInfo
from megatron_qwen_image.cache.shard import ShardFile
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
    """Per sample, in scan order: a 128-bit digest of its `blake2b` string, its 64-bit pHash and which of the
    two it has, in flat arrays: 25 bytes a sample. Where a sample is follows from the rows each shard had."""

    TYPES = {"b2_hi": ("Q", np.uint64), "b2_lo": ("Q", np.uint64), "ph": ("Q", np.uint64), "flags": ("B", np.uint8)}

    def __init__(self):
        self.cols = {name: array(code) for name, (code, _) in self.TYPES.items()}

    def __len__(self) -> int:
        return len(self.cols["flags"])

    def add(self, blake2b: str | None, phash: int | None) -> int:
        """Append one sample; returns its flags (bit 0: has a digest, bit 1: has a pHash)."""
        flags = (blake2b is not None) | (phash is not None) << 1
        # A fixed-size digest of the stored digest string: any string works, equal strings stay equal.
        d = hashlib.blake2b(blake2b.encode(), digest_size=16).digest() if blake2b is not None else bytes(16)
        c = self.cols
        c["b2_hi"].append(int.from_bytes(d[:8], "little"))
        c["b2_lo"].append(int.from_bytes(d[8:], "little"))
        c["ph"].append(phash or 0)
        c["flags"].append(flags)
        return flags

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as numpy arrays (views, no copy)."""
        return {name: np.frombuffer(self.cols[name], dtype=dt) if len(self) else np.zeros(0, dt)
                for name, (_, dt) in self.TYPES.items()}


@dataclass(frozen=True)
class Scan:
    """The hashes of some shards in scan order, and how many rows each shard gave (0: corrupt, skipped)."""
    columns: dict[str, np.ndarray]  # HashColumns.arrays()
    rows: list[int]
    counts: Counter                 # unhashed, corrupt_shards


def scan_shards(root: str, shards: list[ShardInfo], progress_every_s: float | None = None) -> Scan:
    """Read the hashes in the meta JSON of `shards`, in order: for the whole cache in one process, or for one
    Ray scan task's share."""
    cols, rows, counts = HashColumns(), [], Counter()
    t0 = last = time.time()
    for k, info in enumerate(shards):
        try:
            metas = ShardFile(root, info, verify="none").column("meta")
        except CorruptShardError as e:  # loaders skip it too; nothing of it can be kept or excluded
            log.warning("dedup: skipping corrupt shard: %s", e)
            counts["corrupt_shards"] += 1
            rows.append(0)
            continue
        for meta_json in metas:
            meta = json.loads(meta_json or "{}")
            ph = meta.get("phash")
            if not cols.add(meta.get("blake2b"), int(ph, 16) if ph is not None else None):
                counts["unhashed"] += 1
        rows.append(len(metas))
        if progress_every_s is not None and time.time() - last >= progress_every_s:
            last = time.time()
            log.info("dedup: %d/%d shards, %d samples read (%.0f samples/s)", k + 1, len(shards),
                     len(cols), len(cols) / max(1e-9, last - t0))
    return Scan(cols.arrays(), rows, counts)


Pairs = tuple[np.ndarray, np.ndarray]  # two int64 arrays of sample indices, element by element
NO_PAIRS: Pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass(frozen=True)
class Relations:
    """What the keep pass needs to know about a set of samples, as sample indices: duplicates and candidate
    pairs only, so it is small next to the samples. Found by sorting (`find_relations`, one process) or by
    hash-partitioned shuffles (producer/dedup_ray.py)."""
    exact: Pairs       # (follower, first): the same digest as an earlier sample; the first of that digest
    same_phash: Pairs  # (follower, first): among the firsts of digests, the same pHash as an earlier one
    near: Pairs        # (earlier, later): the firsts of both, distinct pHashes within max_distance bits,
                       # sorted by (later, earlier)


@dataclass(frozen=True)
class Decisions:
    """The duplicates among a set of samples, by ascending index: reason 1 exact, 2 near; dup_of the kept sample
    each one duplicates."""
    index: np.ndarray
    reason: np.ndarray
    dup_of: np.ndarray

    @staticmethod
    def merge(parts: list[Decisions]) -> Decisions:
        """Decisions about disjoint samples, as one, by index."""
        cat = [np.concatenate([np.zeros(0, dt)] + [getattr(p, f) for p in parts])
               for f, dt in (("index", np.int64), ("reason", np.int8), ("dup_of", np.int64))]
        order = np.argsort(cat[0], kind="stable")
        return Decisions(*(c[order] for c in cat))

    def fate(self, idx: np.ndarray, kept_reason: int) -> tuple[np.ndarray, np.ndarray]:
        """(reason, dup_of) a sample that follows each of `idx` takes: theirs if they are duplicates here, else
        (kept_reason, the sample itself)."""
        if not len(self.index):
            return np.full(len(idx), kept_reason, np.int8), idx
        pos = np.minimum(np.searchsorted(self.index, idx), len(self.index) - 1)
        dup = self.index[pos] == idx
        return np.where(dup, self.reason[pos], kept_reason).astype(np.int8), np.where(dup, self.dup_of[pos], idx)


def find_duplicates(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                    progress_every_s: float = 10.0, workers: int | None = None, address: str | None = None,
                    partitions: int | None = None) -> Duplicates:
    """Scan the cache for duplicates across work units: in this process, or on Ray with `workers` (at `address`,
    else a local Ray of that many CPUs; `partitions` per shuffle, default 2 per worker), with the same result.
    Only hashes are kept; key names are read back for the report's examples alone."""
    t0 = time.time()
    reader = CacheReader(root, verify="none")
    sup = superseded(reader.log)
    shards = [s for s in reader.shards() if s.work_unit not in sup.work_units]
    if workers is None:
        scan = scan_shards(reader.root, shards, progress_every_s)
        rows, counts = scan.rows, scan.counts
        found = _decide_per_base(scan, shards, max_distance)
    else:
        # Imported here, not above: the Ray path imports this module, and Ray's start is no part of the baseline.
        from producer.dedup_ray import decide_on_ray
        found, rows, counts = decide_on_ray(reader.root, shards, max_distance, workers, address, partitions,
                                            progress_every_s)
    offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    counts["scanned"] = int(offsets[-1])
    counts["shards"] = len(shards)
    counts["exact_duplicate"] = int((found.reason == 1).sum())
    counts["near_duplicate"] = int((found.reason == 2).sum())

    def place(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (shard number, row) of sample indices
        shard = np.searchsorted(offsets, i, "right") - 1  # "right": past shards that gave no rows
        return shard, i - offsets[shard]

    shard_of, row_of = place(found.index)
    samples: dict[str, list[int]] = {}
    for shard, row in zip(shard_of.tolist(), row_of.tolist()):
        samples.setdefault(shards[shard].path, []).append(row)
    key_cache: dict = {}

    def key_of(shard, row):
        shard, row = int(shard), int(row)
        if shard not in key_cache:
            key_cache[shard] = reader.open(shards[shard]).column("key")
        return key_cache[shard][row]

    examples = []  # the first few (duplicate, kept) pairs in manifest order, for the report
    for k in range(min(20, len(found.index))):
        examples.append({"key": key_of(shard_of[k], row_of[k]),
                         "reason": ("exact_duplicate", "near_duplicate")[found.reason[k] - 1],
                         "duplicate_of": key_of(*place(found.dup_of[k])), "shard": shards[shard_of[k]].path,
                         "row": int(row_of[k])})
    return Duplicates(samples, sup, counts, examples, time.time() - t0)


def _decide_per_base(scan: Scan, shards: list[ShardInfo], max_distance: int | None) -> Decisions:
    """The one-process path: relations and the keep pass for each base resolution on its own (the same image in
    two stages is intended)."""
    a = scan.columns
    codes = {b: k for k, b in enumerate(dict.fromkeys(s.base_resolution for s in shards))}
    base = np.repeat(np.array([codes[s.base_resolution] for s in shards], np.int32), scan.rows)
    parts = []
    for code in codes.values():
        idx = np.flatnonzero(base == code)
        d = decide(find_relations(a["b2_hi"][idx], a["b2_lo"][idx], a["ph"][idx], a["flags"][idx], max_distance))
        parts.append(Decisions(idx[d.index], d.reason, idx[d.dup_of]))
    return Decisions.merge(parts)


def greedy_duplicates(b2_hi: np.ndarray, b2_lo: np.ndarray, ph: np.ndarray, flags: np.ndarray,
                      max_distance: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which samples (in order) duplicate an earlier *kept* one. Returns (reason, dup_of): reason 0 kept,
    1 exact (same bytes digest), 2 near (pHash within `max_distance` bits; None: no near check); dup_of
    the index of the kept sample it duplicates, -1 if kept. flags: bit 0 has a digest, bit 1 has a pHash.

    Equivalent to taking samples one by one and keeping each that matches no kept sample so far, with
    one rule made explicit: samples with the same bytes digest share the fate of the first of them.
    """
    d = decide(find_relations(b2_hi, b2_lo, ph, flags, max_distance))
    reason, dup_of = np.zeros(len(flags), np.int8), np.full(len(flags), -1, np.int64)
    reason[d.index], dup_of[d.index] = d.reason, d.dup_of
    return reason, dup_of


def find_relations(b2_hi: np.ndarray, b2_lo: np.ndarray, ph: np.ndarray, flags: np.ndarray,
                   max_distance: int | None) -> Relations:
    """The `Relations` among samples 0..n-1, by sorting in this process (arguments as `greedy_duplicates`')."""
    n = len(flags)
    pos = np.arange(n)
    has_b2, has_ph = (flags & 1).astype(bool), (flags & 2).astype(bool) & (max_distance is not None)
    # 1. Same digest: every sample after the first of its group follows that first one.
    first_of = _first_of_equal(n, np.flatnonzero(has_b2), (b2_hi, b2_lo))
    firsts = first_of == pos
    # 2. Among those firsts, with a pHash: the same pHash again follows its first: it is within 0 bits of it,
    #    and as close to whatever that one duplicates.
    ph_first = _first_of_equal(n, np.flatnonzero(firsts & has_ph), (ph,))
    # 3. Distinct pHashes: candidate pairs within max_distance.
    uniq = np.flatnonzero(firsts & has_ph & (ph_first == pos))
    near = NO_PAIRS
    if len(uniq) > 1 and max_distance:
        i, j = near_pairs(ph[uniq], max_distance)
        near = uniq[i], uniq[j]
    return Relations(_followers(first_of), _followers(ph_first), near)


def decide(rel: Relations) -> Decisions:
    """The keep pass, in sample order, from the relations alone (both paths end here): a sample close to an
    earlier *kept* one is a near duplicate of the first such one; then the followers of a group's first take
    its fate, or are its duplicates if it is kept."""
    ei, ej = rel.near
    # Only samples in some pair can lose their place to a pHash: flags for those alone, not one per sample.
    nodes = np.unique(np.concatenate([ei, ej]))
    kept, hits = bytearray(b"\x01") * len(nodes), array("q")
    # Sorted by later sample: when b's pairs come, the fate of every earlier a is settled. In chunks: as Python
    # ints the indices take ~36 bytes each.
    for lo in range(0, len(ei), 1 << 20):
        ca, cb = (np.searchsorted(nodes, e[lo:lo + (1 << 20)]).tolist() for e in (ei, ej))
        for p, (a, b) in enumerate(zip(ca, cb), lo):
            if kept[b] and kept[a]:
                kept[b] = 0
                hits.append(p)
    hits = np.frombuffer(hits, np.int64)
    near = Decisions(ej[hits], np.full(len(hits), 2, np.int8), ei[hits])  # ascending: each later sample once
    # Followers of a pHash's first: near duplicates of it if it is kept, else of what it duplicates.
    f, r = rel.same_phash
    so_far = Decisions.merge([near, Decisions(f, np.full(len(f), 2, np.int8), near.fate(r, 2)[1])])
    # Followers of a digest's first: exact duplicates of it if it is kept, else they share its fate.
    f, r = rel.exact
    return Decisions.merge([so_far, Decisions(f, *so_far.fate(r, 1))])


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


def _followers(first: np.ndarray) -> Pairs:
    """(follower, first) for every i whose first[i] is not i itself."""
    f = np.flatnonzero(first != np.arange(len(first)))
    return f, first[f]


def band_combinations(max_distance: int) -> list[int]:
    """The masks `near_pairs` sorts the hashes on: one per combination of k of the d + k bands (see there)."""
    d = max_distance
    k = max(1, math.ceil(0.6 * d))
    m = d + k
    edges = [round(i * 64 / m) for i in range(m + 1)]
    band_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:])]
    return [sum(combo) for combo in itertools.combinations(band_masks, k)]


def combination_pairs(h: np.ndarray, max_distance: int, masks: list[int], t: int) -> Pairs:
    """Index pairs (i < j) of hashes equal under masks[t], within `max_distance` bits, and equal under no earlier
    mask: each close pair is reported once, by the first combination it agrees on, so that combinations sorted
    apart (another loop turn, another Ray task) need no deduplication of their pairs."""
    keys = h & np.uint64(masks[t])
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    found_i, found_j = [], []
    lag = 1
    while lag < len(sk):  # equal keys are adjacent after sorting: pairs at distance 1, 2, ... in a run
        eq = np.flatnonzero(sk[lag:] == sk[:-lag])
        if not len(eq):
            break
        a, b = order[eq], order[eq + lag]
        i, j = np.minimum(a, b), np.maximum(a, b)
        x = h[i] ^ h[j]
        close = np.flatnonzero(np.bitwise_count(x) <= max_distance)
        i, j, x = i[close], j[close], x[close]
        first = np.ones(len(x), bool)
        for earlier in masks[:t]:
            first &= (x & np.uint64(earlier)) != 0
        found_i.append(i[first])
        found_j.append(j[first])
        lag += 1
    return _cat(found_i), _cat(found_j)


def near_pairs(h: np.ndarray, max_distance: int) -> Pairs:
    """All index pairs (i < j) of distinct 64-bit hashes within `max_distance` bits, sorted by (j, i).

    Pigeonhole, generalised: split the bits into d + k bands; d differing bits leave at least k bands
    equal, so every close pair agrees exactly on some k of them. For each k-combination, sort the hashes
    masked to those bands and compare only neighbours with equal keys (`combination_pairs`). k ~ 0.6 d keeps
    the keys near 27+ bits wide (few false candidates even for 10^8 hashes) at C(d+k, k) sorts: 35 for d = 4.
    """
    masks = band_combinations(max_distance)
    found = [combination_pairs(h, max_distance, masks, t) for t in range(len(masks))]
    return sort_pairs(_cat([i for i, _ in found]), _cat([j for _, j in found]))


def sort_pairs(i: np.ndarray, j: np.ndarray) -> Pairs:
    """The pairs (i, j) sorted by (j, i): the order the keep pass takes them in."""
    order = np.lexsort((i, j))
    return i[order], j[order]


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)


def dedup_cache(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                dry_run: bool = False, workers: int | None = None, address: str | None = None,
                partitions: int | None = None) -> dict:
    """Find cross-work-unit duplicates (in this process, or on Ray with `workers`: `find_duplicates`) and
    publish them as a new exclusion list unless it equals the current one. Returns a report (counts, the
    list number in force, a few examples)."""
    found = find_duplicates(root, max_distance, workers=workers, address=address, partitions=partitions)
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
            "changed": not unchanged, "written": not dry_run and not unchanged, "dry_run": dry_run, "workers": workers,
            "seconds": round(found.seconds, 3), "examples": found.examples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir")
    p.add_argument("--max-distance", type=int, default=FilterConfig.dedup_near_max_distance,
                   help="pHash Hamming distance for near-duplicates (default %(default)s; -1: exact only)")
    p.add_argument("--dry-run", action="store_true", help="report, do not publish an exclusion list")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, help="run on Ray with this many workers (default: in this process)")
    p.add_argument("--address", help="with --workers: the Ray cluster to join (e.g. auto; default RAY_ADDRESS, "
                                     "else a local Ray of --workers CPUs)")
    p.add_argument("--partitions", type=int, help="with --workers: partitions per shuffle (default 2 per worker; "
                                                  "more: less memory per task)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.max_distance is not None and not -1 <= args.max_distance < 32:
        p.error(f"--max-distance must be in -1..31, got {args.max_distance}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.partitions is not None and (args.workers is None or args.partitions < 1):
        p.error(f"--partitions must be >= 1 and comes with --workers, got {args.partitions}")
    if args.address is not None and args.workers is None:
        p.error("--address comes with --workers")
    try:
        report = dedup_cache(args.cache_dir, None if args.max_distance == -1 else args.max_distance, args.dry_run,
                             args.workers, args.address, args.partitions)
    except CacheFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['samples']} samples in {report['shards']} shards scanned in {report['seconds']:.1f} s"
          + (f" on {report['workers']} Ray workers" if report["workers"] else "") + ": "
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
