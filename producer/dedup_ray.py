"""Cross-shard dedup on Ray: `python -m producer.dedup CACHE --workers N [--address auto]`.

The same result as the one-process `find_duplicates` (producer/dedup.py), with the samples spread over Ray
tasks so that adding nodes adds capacity; no process holds them all:

- Scan: one task per group of consecutive shards of one base resolution (about a million samples) reads
  their meta JSON into hash columns (25 bytes a sample), which stay in the object store; the driver gets
  the rows per shard and counts only.
- Relations (`Relations`), for each base resolution, by hash-partitioned shuffles. Each one is a select
  task per group (the rows that take part), a split task per group (those rows, by partition of their key)
  and a reduce task per partition, which sees every row with its keys and no other:
    1. the digest                                -> (follower, first) of each digest group
    2. the pHash, of digest firsts               -> (follower, first) of each pHash group
    3. the band key, one shuffle per band combination, of pHash firsts
                                                 -> the close pairs first found on that combination
  with the kernels the one-process path runs (`_first_of_equal`, `combination_pairs`). Reduce tasks return
  only those relations: duplicates and candidate pairs, small next to the samples.
- Decide: the driver runs the one keep pass (`decide`) over the relations.

Memory: a reduce task holds its partition's rows (16 bytes each) and their sort: ~75 bytes per cache sample
divided by the partitions; a split task holds its group's. The driver holds the relations (16 bytes per
duplicate and per candidate pair) and the decisions, no array with an entry per sample, and runs the keep
pass. The object store holds the hash columns throughout and two band combinations' shuffles at most.
Measured: benchmarks/bench_dedup.py (section ray); sizing: docs/operations.md.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import ray

from megatron_qwen_image.cache.manifest import ShardInfo
from producer.dedup import (NO_PAIRS, Decisions, Pairs, Relations, _cat, _first_of_equal, _followers,
                            band_combinations, combination_pairs, decide, scan_shards, sort_pairs)
from producer.pipeline import ray_session

log = logging.getLogger("producer.dedup")

GROUP_SAMPLES = 1 << 20     # samples per scan task at most: ~25 MB of columns, ~50 MB for its split tasks
COMBINATIONS_IN_FLIGHT = 2  # band-combination shuffles under way at once: what the object store holds of them
ALL_BITS = (1 << 64) - 1


@dataclass(frozen=True)
class Group:
    """One scan task's samples: consecutive in scan order and of one base resolution, columns in the object store
    (a dict of `HashColumns.TYPES` arrays)."""
    base: int | None
    start: int  # index of its first sample in scan order
    size: int
    columns: ray.ObjectRef


def decide_on_ray(root: str, shards: list[ShardInfo], max_distance: int | None, workers: int,
                  address: str | None = None, partitions: int | None = None,
                  progress_every_s: float = 10.0) -> tuple[Decisions, list[int], Counter]:
    """`find_duplicates`' work on Ray: (the duplicates, rows read per shard, counts). Joins `address` (or
    RAY_ADDRESS), else starts a local Ray with `workers` CPUs; `workers` also sizes the scan groups, and
    `partitions` (default 2 per worker) each shuffle."""
    if workers < 1 or (partitions is not None and partitions < 1):
        raise ValueError(f"workers and partitions must be >= 1, got {workers} and {partitions}")
    partitions = partitions or 2 * workers
    with ray_session(address, num_cpus=workers):
        groups, rows, counts = scan_on_ray(root, shards, workers, progress_every_s)
        by_base: dict = {}
        for g in groups:
            by_base.setdefault(g.base, []).append(g)
        found = []
        for base, gs in by_base.items():  # the same image in two stages is intended: judge each stage alone
            t0 = time.time()
            rel = relations_on_ray(gs, max_distance, partitions, progress_every_s)
            found.append(decide(rel))
            log.info("dedup: base %s: %d samples, %d digest and %d pHash followers, %d close pairs (%.1f s)", base,
                     sum(g.size for g in gs), len(rel.exact[0]), len(rel.same_phash[0]), len(rel.near[0]),
                     time.time() - t0)
    return Decisions.merge(found), rows, counts


def group_target(samples: int, workers: int) -> int:
    """Samples per scan group: about four groups per worker, for balance, and GROUP_SAMPLES at most."""
    return max(1, min(GROUP_SAMPLES, math.ceil(samples / (4 * workers))))


def scan_on_ray(root: str, shards: list[ShardInfo], workers: int,
                progress_every_s: float = 10.0) -> tuple[list[Group], list[int], Counter]:
    """Read the hashes of `shards` in parallel: (groups, rows read per shard, counts). A group ends at a change
    of base resolution or once it has `group_target` samples."""
    target = group_target(sum(s.num_samples for s in shards), workers)
    plan: list[list[int]] = []  # shard numbers per group
    for k, s in enumerate(shards):
        if not plan or s.base_resolution != shards[plan[-1][0]].base_resolution or size >= target:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += s.num_samples
    tasks = [_scan.remote(root, [shards[i] for i in p]) for p in plan]
    pending, t0 = [meta for meta, _ in tasks], time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=progress_every_s)
        log.info("dedup: %d/%d scan tasks done (%.0f s)", len(tasks) - len(pending), len(tasks), time.time() - t0)
    groups, rows, counts, start = [], [], Counter(), 0
    for p, (meta, columns) in zip(plan, tasks):
        part_rows, part_counts = ray.get(meta)
        rows += part_rows
        counts.update(part_counts)
        groups.append(Group(shards[p[0]].base_resolution, start, sum(part_rows), columns))
        start += sum(part_rows)
    return groups, rows, counts


def relations_on_ray(groups: list[Group], max_distance: int | None, partitions: int,
                     progress_every_s: float = 10.0) -> Relations:
    """The `Relations` among the samples of `groups` (one base resolution), equal to what `find_relations` finds
    in one process, by shuffles of `partitions` partitions."""
    exact = _followers_on_ray(groups, 1, NO_PAIRS[0], ("b2_hi", "b2_lo"), partitions)
    if max_distance is None:
        return Relations(exact, NO_PAIRS, NO_PAIRS)
    # pHash relations are among the firsts of digests only, and close pairs among the firsts of pHashes too.
    same = _followers_on_ray(groups, 2, np.sort(exact[0]), ("ph",), partitions)
    near = NO_PAIRS
    if max_distance:
        near = _near_pairs_on_ray(groups, np.sort(np.concatenate([exact[0], same[0]])), max_distance, partitions,
                                  progress_every_s)
    return Relations(exact, same, near)


def _followers_on_ray(groups: list[Group], need: int, drop: np.ndarray, keys: tuple[str, ...],
                      partitions: int) -> Pairs:
    """(follower, first) of the samples with flag `need`, not in `drop` (sorted sample indices), grouped by equal
    `keys`: a shuffle on the first key, then `_first_of_equal` per partition."""
    rows = [_select.remote(g.columns, g.start, need, _within(drop, g), keys) for g in groups]
    splits = [_split_refs(r, keys[0], ALL_BITS, partitions) for r in rows]
    found = ray.get([_groups_of_equal.remote(keys, *(s[p] for s in splits)) for p in range(partitions)])
    return _cat([f for f, _ in found]), _cat([r for _, r in found])


def _near_pairs_on_ray(groups: list[Group], drop: np.ndarray, max_distance: int, partitions: int,
                       progress_every_s: float) -> Pairs:
    """`near_pairs` of the pHashes of the samples not in `drop`: for each band combination a shuffle on the masked
    pHash, then `combination_pairs` per partition; pairs sorted by (later, earlier) for the keep pass."""
    rows = [_select.remote(g.columns, g.start, 2, _within(drop, g), ("ph",)) for g in groups]
    masks = band_combinations(max_distance)
    pending, found, t0 = deque(), [], time.time()
    last = t0
    for t, mask in enumerate(masks):
        splits = [_split_refs(r, "ph", mask, partitions) for r in rows]
        pending.append([_combination_pairs.remote(t, max_distance, *(s[p] for s in splits))
                        for p in range(partitions)])
        if len(pending) >= COMBINATIONS_IN_FLIGHT:
            found += ray.get(pending.popleft())
        if time.time() - last >= progress_every_s:
            last = time.time()
            log.info("dedup: band combination %d/%d, %d close pairs so far (%.0f s)", t + 1, len(masks),
                     sum(len(i) for i, _ in found), last - t0)
    while pending:
        found += ray.get(pending.popleft())
    return sort_pairs(_cat([i for i, _ in found]), _cat([j for _, j in found]))


def _within(idx: np.ndarray, g: Group) -> np.ndarray:
    """The part of sorted sample indices `idx` that falls in group g."""
    return idx[np.searchsorted(idx, g.start):np.searchsorted(idx, g.start + g.size)]


def _split_refs(rows: ray.ObjectRef, key: str, mask: int, partitions: int) -> list[ray.ObjectRef]:
    refs = _split.options(num_returns=partitions).remote(rows, key, mask, partitions)
    return refs if partitions > 1 else [refs]


def _partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """A partition number per key: splitmix64's finaliser, so that masked and skewed keys spread evenly too."""
    x = keys.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)  # wraps modulo 2^64, as intended
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    # Small integers: numpy's stable sort of them in `_split` is a radix sort.
    return (x % np.uint64(partitions)).astype(np.uint16 if partitions <= 1 << 16 else np.int64)


def _concat(parts: tuple[dict, ...]) -> dict[str, np.ndarray]:
    """One partition's rows from every group, in group order: ascending sample index, as in one process."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@ray.remote(num_returns=2)
def _scan(root: str, shards: list[ShardInfo]):
    """One group's hashes: ((rows per shard, counts), columns); only the first comes to the driver."""
    scan = scan_shards(root, shards)
    return (scan.rows, scan.counts), scan.columns


@ray.remote
def _select(columns: dict, start: int, need: int, drop: np.ndarray, keys: tuple[str, ...]) -> dict:
    """The rows of one group with flag `need` and not in `drop` (sample indices): their indices and `keys`."""
    take = (columns["flags"] & need).astype(bool)
    take[drop - start] = False
    rows = np.flatnonzero(take)
    return {"idx": rows + start, **{k: columns[k][rows] for k in keys}}


@ray.remote
def _split(rows: dict, key: str, mask: int, partitions: int):
    """One group's rows by partition of `key` & `mask` (one return each), each in sample order."""
    part = _partition_of(rows[key] & np.uint64(mask), partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    out = [{k: v[order[lo:hi]] for k, v in rows.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]
    return out if partitions > 1 else out[0]  # num_returns=1 takes the value itself


@ray.remote
def _groups_of_equal(keys: tuple[str, ...], *parts: dict) -> Pairs:
    """(follower, first) sample indices among one partition's rows with equal `keys`."""
    rows = _concat(parts)
    n = len(rows["idx"])
    follower, first = _followers(_first_of_equal(n, np.arange(n), tuple(rows[k] for k in keys)))
    return rows["idx"][follower], rows["idx"][first]


@ray.remote
def _combination_pairs(t: int, max_distance: int, *parts: dict) -> Pairs:
    """The close pairs (earlier, later) first found on band combination t among one partition's rows."""
    rows = _concat(parts)
    i, j = combination_pairs(rows["ph"], max_distance, band_combinations(max_distance), t)
    return rows["idx"][i], rows["idx"][j]
