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
- Batch groups: the samples of one bucket split further by their condition images' shapes (image editing,
  cache format v2), since one batch's tensors need one shape each: a text-to-image group is planned exactly as a
  bucket was before (its seeds come from the bucket alone); an edit group's seeds add its condition shapes.
- Task weights (e.g. {"t2i": 0.8, "ti2i": 0.2}): like family weights, after the cut: each task (text-to-image:
  groups without condition images; ti2i: with) supplies round(weight share x batches) of the epoch's batches, so
  the task is picked per global batch. With family weights too, each (family, task) pair weighs the product of
  its two weights; pairs without batches are left out and the others share their weight.
- Streaming mode (producers still writing): the log is consumed in "rounds". Round r takes the next
  entries in log order until it has at least `round_samples` new samples and some bucket can fill a
  global batch (waiting for producers if the log is not that long yet); its samples plus the previous
  round's leftovers are planned like an epoch; what does not fill a batch carries over. When the
  cache is sealed the last round takes what is left and the loader continues in epoch mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_TAG_EPOCH, _TAG_ROUND, _TAG_ORDER, _TAG_REPLACE, _TAG_FAMILY, _TAG_CATEGORY, _TAG_COND = (
    0xE90C, 0x5EAA, 0x0DE5, 0xBAD5, 0xFA41, 0xCA7E, 0xC0D1)

TASKS = ("t2i", "ti2i")  # text-to-image; text-and-image-to-image (editing: a batch with condition images)


_NO_IDS = np.zeros(0, dtype=np.int64)


def sample_ids(shard_id: int, num_samples: int) -> np.ndarray:
    return (np.int64(shard_id) << np.int64(32)) | np.arange(num_samples, dtype=np.int64)


def split_id(sample_id: int) -> tuple[int, int]:
    return int(sample_id) >> 32, int(sample_id) & 0xFFFFFFFF


class BatchGroup(NamedTuple):
    """Samples that may share a batch: one bucket (target size) and one layout of condition images."""
    bucket: tuple[int, int]
    cond_shapes: tuple = ()  # (C, h, w) of each condition image; (): text-to-image

    @property
    def task(self) -> str:
        return "ti2i" if self.cond_shapes else "t2i"

    @classmethod
    def of(cls, shard) -> "BatchGroup":
        """The group of a shard's samples (a manifest ShardInfo: its bucket and condition shapes)."""
        return cls(shard.bucket, shard.cond_shapes)


def _group_code(group: BatchGroup) -> list[int]:
    """A group's part of its seeds: the bucket alone for text-to-image (the plans of caches without edit samples
    are those of format version 1), plus the condition shapes for an edit group."""
    code = [int(group.bucket[0]), int(group.bucket[1])]
    if group.cond_shapes:
        code += [_TAG_COND, *(int(x) for shape in group.cond_shapes for x in shape)]
    return code


@dataclass(frozen=True, slots=True)
class GlobalBatch:
    """One global batch: its group (bucket and condition shapes) and the ids of its samples (all DP ranks')."""
    group: BatchGroup
    sample_ids: np.ndarray   # [its group's global batch size] int64

    @property
    def bucket(self) -> tuple[int, int]:
        return self.group.bucket


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of one epoch or one streaming round."""
    batches: list[GlobalBatch]                   # in the order training takes them
    pools: dict[BatchGroup, np.ndarray]     # group -> all sample ids of this epoch/round (for replacements)
    leftover: dict[BatchGroup, np.ndarray]  # group -> ids that did not fill a batch


def plan_batches(pools: dict, seed: int, tag: int, index: int, global_batch_size, family_weights=None,
                 family_of=None, categories=None, carried=None, task_weights=None) -> BatchPlan:
    """Permute each group's ids (`pools`: BatchGroup -> ids), cut into global batches, shuffle the batch order.
    Deterministic. `global_batch_size`: samples per global batch, or a function of the group giving them
    (compute-balanced batches, batching.BalancedBatches). `family_weights` {base resolution: weight} with
    `family_of(bucket)`: the share of the batches each family supplies; `task_weights` {"t2i" | "ti2i": weight}:
    each task's share, alone or with the families'; `categories` (group_of, group_weights): each category's share
    of the samples, drawn from `pools` (weigh_categories) before `carried` (a streaming round's leftovers, drawn
    in their own round) joins them (module docstring)."""
    size_of = global_batch_size if callable(global_batch_size) else (lambda group, n=global_batch_size: n)
    if categories is not None:
        pools = weigh_categories(pools, seed, tag, index, *categories, family_of=family_of)
    if carried:
        pools = {b: np.concatenate([carried.get(b, _NO_IDS), pools.get(b, _NO_IDS)]) for b in set(carried) | set(pools)}
    batches, leftover = [], {}
    for group in sorted(pools):
        size = size_of(group)
        ids = pools[group]
        perm = np.random.default_rng([seed, tag, index, *_group_code(group)]).permutation(ids)
        k = len(perm) // size
        batches.extend(GlobalBatch(group, perm[j * size:(j + 1) * size]) for j in range(k))
        if len(perm) > k * size:
            leftover[group] = perm[k * size:]
    if family_weights or task_weights:
        key_of, weights = _batch_weights(family_weights, family_of, task_weights)
        batches = _weigh_batches(batches, key_of, weights, np.random.default_rng([seed, _TAG_FAMILY, tag, index]))
    order = np.random.default_rng([seed, _TAG_ORDER, tag, index]).permutation(len(batches))
    return BatchPlan([batches[i] for i in order], pools, leftover)


def draw(rng, have: int, want: int) -> np.ndarray:
    """`want` indices into `have` items: distinct ones in a random order if want <= have; else every item as
    often as the others, to one more time (a random few): a weighted family or category short of items repeats
    them all evenly."""
    repeats, rest = divmod(want, have)
    return np.concatenate([*(rng.permutation(have) for _ in range(repeats)), rng.permutation(have)[:rest]])


def _batch_weights(family_weights, family_of, task_weights):
    """(key of a batch, {key: weight}) for _weigh_batches: by family, by task, or by (family, task) pair with the
    product of the two weights."""
    if not task_weights:
        return (lambda b: family_of(b.bucket)), family_weights
    if not family_weights:
        return (lambda b: b.group.task), task_weights
    return ((lambda b: (family_of(b.bucket), b.group.task)),
            {(f, t): fw * tw for f, fw in family_weights.items() for t, tw in task_weights.items()})


def _weigh_batches(batches: list, key_of, weights: dict, rng) -> list:
    """The batches of each key (a family, a task, or both) in proportion to its weight (keys without batches left
    out), as many in all as there were batches."""
    by_key: dict = {}
    for b in batches:
        by_key.setdefault(key_of(b), []).append(b)
    present = {k: float(w) for k, w in sorted(weights.items()) if by_key.get(k)}
    total = sum(present.values())
    if total <= 0:
        return batches
    out = []
    for key, weight in present.items():
        have = by_key[key]
        out.extend(have[i] for i in draw(rng, len(have), int(round(len(batches) * weight / total))))
    return out


def weigh_categories(pools: dict, seed: int, tag: int, index: int, group_of, group_weights: np.ndarray,
                     family_of=None) -> dict:
    """Redraw each family's samples (`family_of(bucket)`, None: one family; `pools`: BatchGroup -> ids) so that
    category group g of `group_of(ids)` supplies round(n x its weight share) of its n samples (groups without
    samples left out of the shares; module docstring). Returns BatchGroup -> ids; groups left without samples are
    left out. Deterministic."""
    rng = np.random.default_rng([seed, _TAG_CATEGORY, tag, index])
    family_of = family_of or (lambda bucket: None)
    by_family: dict = {}
    for group in sorted(pools):
        by_family.setdefault(family_of(group.bucket), []).append(group)
    out = {}
    for family, members in sorted(by_family.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        ids = np.concatenate([pools[m] for m in members])
        where = np.repeat(np.arange(len(members)), [len(pools[m]) for m in members])  # id -> its batch group
        groups = group_of(ids)  # id -> its category group
        present = [g for g in range(len(group_weights)) if group_weights[g] > 0 and np.any(groups == g)]
        total = sum(group_weights[g] for g in present)
        picked = []
        for g in present:
            have = np.flatnonzero(groups == g)
            picked.append(have[draw(rng, len(have), int(round(len(ids) * group_weights[g] / total)))])
        picked = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
        for j, member in enumerate(members):
            mine = ids[picked[where[picked] == j]]
            if len(mine):
                out[member] = mine
    return out


def plan_epoch_batches(pools: dict, seed: int, epoch: int, global_batch_size, **families) -> BatchPlan:
    return plan_batches(pools, seed, _TAG_EPOCH, epoch, global_batch_size, **families)


def plan_round_batches(pools: dict, seed: int, round_index: int, global_batch_size, **families) -> BatchPlan:
    return plan_batches(pools, seed, _TAG_ROUND, round_index, global_batch_size, **families)


def replacement_candidates(pool: np.ndarray, seed: int, key: tuple, n: int = 32) -> np.ndarray:
    """Deterministic stand-ins for a corrupt sample (same group), so the batch keeps its size and the
    run stays reproducible without any coordination between ranks."""
    rng = np.random.default_rng([seed, _TAG_REPLACE, *[int(k) for k in key]])
    return pool[rng.integers(0, len(pool), size=min(n, max(1, len(pool))))]
