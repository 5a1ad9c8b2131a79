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
excluded, only counted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter

from megatron_qwen_image.cache import CacheFormatError, CacheReader, CorruptShardError
from megatron_qwen_image.cache.exclusions import read_exclusions, write_exclusions
from producer.config import FilterConfig
from producer.filters import NearDuplicateIndex

log = logging.getLogger("producer.dedup")


def find_duplicates(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                    progress_every_s: float = 10.0) -> dict:
    """Scan the cache; returns {"samples": {shard path: [rows]}, "counts": Counter, "examples": [...]}."""
    reader = CacheReader(root, verify="none")
    shards = reader.shards()
    exact: dict = {}   # base resolution -> {blake2b hex: key}
    near: dict = {}    # base resolution -> (NearDuplicateIndex, {phash: key})
    samples: dict[str, list[int]] = {}
    counts: Counter = Counter()
    examples: list[dict] = []  # a few (duplicate, kept) pairs for the report
    t0 = last = time.time()
    for k, info in enumerate(shards):
        try:
            sf = reader.open(info)
            rows = list(zip(sf.column("key"), sf.column("meta")))
        except CorruptShardError as e:  # loaders skip it too; nothing of it can be kept or excluded
            log.warning("dedup: skipping corrupt shard: %s", e)
            counts["corrupt_shards"] += 1
            continue
        seen_exact = exact.setdefault(info.base_resolution, {})
        index, owners = near.setdefault(info.base_resolution, (
            NearDuplicateIndex(max_distance) if max_distance is not None else None, {}))
        for row, (key, meta_json) in enumerate(rows):
            counts["scanned"] += 1
            meta = json.loads(meta_json or "{}")
            b2, ph = meta.get("blake2b"), meta.get("phash")
            h = int(ph, 16) if ph is not None and index is not None else None
            if b2 is None and ph is None:
                counts["unhashed"] += 1
                continue
            reason, kept = None, None
            if b2 is not None and b2 in seen_exact:
                reason, kept = "exact_duplicate", seen_exact[b2]
            elif h is not None:
                match = index.find(h)
                if match is not None:
                    reason, kept = "near_duplicate", owners[match]
            if reason:
                counts[reason] += 1
                samples.setdefault(info.path, []).append(row)
                if len(examples) < 20:
                    examples.append({"key": key, "reason": reason, "duplicate_of": kept, "shard": info.path,
                                     "row": row})
                continue
            if b2 is not None:
                seen_exact[b2] = key
            if h is not None:
                index.add(h)
                owners.setdefault(h, key)
        if time.time() - last >= progress_every_s:
            last = time.time()
            log.info("dedup: %d/%d shards, %d samples, %d duplicates (%.0f samples/s)", k + 1, len(shards),
                     counts["scanned"], counts["exact_duplicate"] + counts["near_duplicate"],
                     counts["scanned"] / max(1e-9, last - t0))
    counts["shards"] = len(shards)
    return {"samples": samples, "counts": counts, "examples": examples, "seconds": time.time() - t0}


def dedup_cache(root: str, max_distance: int | None = FilterConfig.dedup_near_max_distance,
                dry_run: bool = False) -> dict:
    """Find cross-work-unit duplicates and publish them as a new exclusion list unless it equals the
    current one. Returns a report (counts, the list number in force, a few examples)."""
    found = find_duplicates(root, max_distance)
    current = read_exclusions(root)
    unchanged = current.same_rows(found["samples"])
    number = current.number
    if not dry_run and not unchanged:
        number = write_exclusions(root, found["samples"], {
            "tool": "producer.dedup", "max_distance": max_distance,
            "counts": {k: v for k, v in found["counts"].items() if k in ("exact_duplicate", "near_duplicate")}})
    c = found["counts"]
    return {"cache_dir": root, "shards": c["shards"], "samples": c["scanned"],
            "exact_duplicate": c["exact_duplicate"], "near_duplicate": c["near_duplicate"],
            "unhashed": c["unhashed"], "corrupt_shards": c["corrupt_shards"],
            "excluded": sum(map(len, found["samples"].values())),
            "max_distance": max_distance, "exclusion_list": number, "previous_list": current.number,
            "changed": not unchanged, "written": not dry_run and not unchanged, "dry_run": dry_run,
            "seconds": round(found["seconds"], 3), "examples": found["examples"]}


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
