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
  drawn without repeats in an order from rng(seed, epoch), then with repeats if it has fewer. With
  compute-balanced batches every step costs about the same, so the weights are shares of the compute.
- Streaming mode (producers still writing): the log is consumed in "rounds". Round r takes the next
  entries in log order until it has at least `round_samples` new samples and some bucket can fill a
  global batch (waiting for producers if the log is not that long yet); its samples plus the previous
  round's leftovers are planned like an epoch; what does not fill a batch carries over. When the
  cache is sealed the last round takes what is left and the loader continues in epoch mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG_EPOCH, _TAG_ROUND, _TAG_ORDER, _TAG_REPLACE, _TAG_FAMILY = 0xE90C, 0x5EAA, 0x0DE5, 0xBAD5, 0xFA41


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
                 family_of=None) -> BatchPlan:
    """Permute each bucket's ids, cut into global batches, shuffle the batch order. Deterministic.
    `global_batch_size`: samples per global batch, or a function of the bucket giving them (compute-balanced
    batches, batching.BalancedBatches). `family_weights` {base resolution: weight} with `family_of(bucket)`:
    the share of the batches each family supplies (module docstring)."""
    size_of = global_batch_size if callable(global_batch_size) else (lambda bucket, n=global_batch_size: n)
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
        have, want = by_family[family], int(round(len(batches) * weight / total))
        picks = rng.permutation(len(have))[:want]
        if want > len(have):  # a family short of batches repeats some of them
            picks = np.concatenate([picks, rng.integers(0, len(have), size=want - len(have))])
        out.extend(have[i] for i in picks)
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
