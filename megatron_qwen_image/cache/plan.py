"""Deterministic batch planning: which samples form global batch t, from the manifest alone.

The plan depends only on (seed, global batch size, filters, manifest entries) -- never on timing,
file contents or the rank -- so every rank (every DP rank, every TP rank) computes the same sequence
of global batches, and a resumed run recomputes it from a tiny state.

Sample ids are int64: shard_id << 32 | row, where shard_id is the shard's index among the live shards
of the manifest log in log order (the same numbering in streaming and epoch mode).

- Epoch mode (a finished cache): for epoch e, every bucket's samples are permuted with
  rng(seed, e, bucket) and cut into full global batches (the remainder, < G samples per bucket, waits
  for the next epoch's permutation); the batches of all buckets are then shuffled together with
  rng(seed, e). A bucket thus supplies batches in proportion to its size.
- Family weights (several bucket families in one stage, e.g. {640: 0.7, 1328: 0.3}): after the buckets
  are cut into batches, each family supplies round(weight share x batches of the epoch) of them: its batches
  drawn without repeats in an order from rng(seed, epoch), or each repeated evenly if it has fewer (draw). With
  compute-balanced batches every step costs about the same, so the weights are shares of the compute.
- Category weights (categories.py, e.g. {"portrait": 0.2, "*": 0.8}): before the buckets are cut, each family's
  samples of the epoch/round are redrawn so that each category supplies round(weight share x the family's
  samples) of them, drawn the same way. A category thus moves samples between buckets (portraits live in the
  tall ones).
- Streaming mode (producers still writing): the log is consumed in "rounds". Round r takes the next
  entries in log order until it has at least `round_samples` new samples and some bucket can fill a
  global batch (waiting for producers if the log is not that long yet); its samples plus the previous
  round's leftovers are planned like an epoch; what does not fill a batch carries over. When the
  cache is sealed the last round takes what is left and the loader continues in epoch mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG_EPOCH, _TAG_ROUND, _TAG_ORDER, _TAG_REPLACE, _TAG_FAMILY, _TAG_CATEGORY = (0xE90C, 0x5EAA, 0x0DE5, 0xBAD5,
                                                                             0xFA41, 0xCA7E)


_NO_IDS = np.zeros(0, dtype=np.int64)


def sample_ids(shard_id: int, num_samples: int) -> np.ndarray:
    return (np.int64(shard_id) << np.int64(32)) | np.arange(num_samples, dtype=np.int64)


def split_id(sample_id: int) -> tuple[int, int]:
    return int(sample_id) >> 32, int(sample_id) & 0xFFFFFFFF


def _bucket_code(bucket: tuple[int, int]) -> list[int]:
    return [int(bucket[0]), int(bucket[1])]


@dataclass(frozen=True, slots=True)
class GlobalBatch:
    """One global batch: its bucket and the ids of its samples (all DP ranks' together)."""
    bucket: tuple[int, int]
    sample_ids: np.ndarray   # [its bucket's global batch size] int64


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of one epoch or one streaming round."""
    batches: list[GlobalBatch]                   # in the order training takes them
    pools: dict[tuple[int, int], np.ndarray]     # bucket -> all sample ids of this epoch/round (for replacements)
    leftover: dict[tuple[int, int], np.ndarray]  # bucket -> ids that did not fill a batch


def plan_batches(pools: dict, seed: int, tag: int, index: int, global_batch_size, family_weights=None,
                 family_of=None, categories=None, carried=None) -> BatchPlan:
    """Permute each bucket's ids, cut into global batches, shuffle the batch order. Deterministic.
    `global_batch_size`: samples per global batch, or a function of the bucket giving them (compute-balanced
    batches, batching.BalancedBatches). `family_weights` {base resolution: weight} with `family_of(bucket)`:
    the share of the batches each family supplies; `categories` (group_of, group_weights): each category's share
    of the samples, drawn from `pools` (weigh_categories) before `carried` (a streaming round's leftovers, drawn
    in their own round) joins them (module docstring)."""
    size_of = global_batch_size if callable(global_batch_size) else (lambda bucket, n=global_batch_size: n)
    if categories is not None:
        pools = weigh_categories(pools, seed, tag, index, *categories, family_of=family_of)
    if carried:
        pools = {b: np.concatenate([carried.get(b, _NO_IDS), pools.get(b, _NO_IDS)]) for b in set(carried) | set(pools)}
    batches, leftover = [], {}
    for bucket in sorted(pools):
        size = size_of(bucket)
        ids = pools[bucket]
        perm = np.random.default_rng([seed, tag, index, *_bucket_code(bucket)]).permutation(ids)
        k = len(perm) // size
        batches.extend(GlobalBatch(bucket, perm[j * size:(j + 1) * size]) for j in range(k))
        if len(perm) > k * size:
            leftover[bucket] = perm[k * size:]
    if family_weights:
        batches = _weigh_families(batches, family_of, family_weights,
                                  np.random.default_rng([seed, _TAG_FAMILY, tag, index]))
    order = np.random.default_rng([seed, _TAG_ORDER, tag, index]).permutation(len(batches))
    return BatchPlan([batches[i] for i in order], pools, leftover)


def draw(rng, have: int, want: int) -> np.ndarray:
    """`want` indices into `have` items: distinct ones in a random order if want <= have; else every item as
    often as the others, to one more time (a random few): a weighted family or category short of items repeats
    them all evenly."""
    repeats, rest = divmod(want, have)
    return np.concatenate([*(rng.permutation(have) for _ in range(repeats)), rng.permutation(have)[:rest]])


def _weigh_families(batches: list, family_of, weights: dict, rng) -> list:
    """The batches of each family in proportion to its weight (families without batches left out), as many in
    all as there were batches."""
    by_family: dict = {}
    for b in batches:
        by_family.setdefault(family_of(b.bucket), []).append(b)
    present = {f: float(w) for f, w in sorted(weights.items()) if by_family.get(f)}
    total = sum(present.values())
    if total <= 0:
        return batches
    out = []
    for family, weight in present.items():
        have = by_family[family]
        out.extend(have[i] for i in draw(rng, len(have), int(round(len(batches) * weight / total))))
    return out


def weigh_categories(pools: dict, seed: int, tag: int, index: int, group_of, group_weights: np.ndarray,
                     family_of=None) -> dict:
    """Redraw each family's samples (`family_of(bucket)`, None: one family) so that group g of `group_of(ids)`
    supplies round(n x its weight share) of its n samples (groups without samples left out of the shares;
    module docstring). Returns bucket -> ids; buckets left without samples are left out. Deterministic."""
    rng = np.random.default_rng([seed, _TAG_CATEGORY, tag, index])
    family_of = family_of or (lambda bucket: None)
    by_family: dict = {}
    for bucket in sorted(pools):
        by_family.setdefault(family_of(bucket), []).append(bucket)
    out = {}
    for family, buckets in sorted(by_family.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        ids = np.concatenate([pools[b] for b in buckets])
        where = np.repeat(np.arange(len(buckets)), [len(pools[b]) for b in buckets])  # id -> its bucket
        groups = group_of(ids)
        present = [g for g in range(len(group_weights)) if group_weights[g] > 0 and np.any(groups == g)]
        total = sum(group_weights[g] for g in present)
        picked = []
        for g in present:
            have = np.flatnonzero(groups == g)
            picked.append(have[draw(rng, len(have), int(round(len(ids) * group_weights[g] / total)))])
        picked = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
        for j, bucket in enumerate(buckets):
            mine = ids[picked[where[picked] == j]]
            if len(mine):
                out[bucket] = mine
    return out


def plan_epoch_batches(pools: dict, seed: int, epoch: int, global_batch_size, **families) -> BatchPlan:
    return plan_batches(pools, seed, _TAG_EPOCH, epoch, global_batch_size, **families)


def plan_round_batches(pools: dict, seed: int, round_index: int, global_batch_size, **families) -> BatchPlan:
    return plan_batches(pools, seed, _TAG_ROUND, round_index, global_batch_size, **families)


def replacement_candidates(pool: np.ndarray, seed: int, key: tuple, n: int = 32) -> np.ndarray:
    """Deterministic stand-ins for a corrupt sample (same bucket), so the batch keeps its size and the
    run stays reproducible without any coordination between ranks."""
    rng = np.random.default_rng([seed, _TAG_REPLACE, *[int(k) for k in key]])
    return pool[rng.integers(0, len(pool), size=min(n, max(1, len(pool))))]
