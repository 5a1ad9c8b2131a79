"""BucketedLoader: the consumer side. Global batches from one bucket, split over DP ranks, prefetched.

Threads: a planner thread walks the deterministic plan (plan.py; in streaming mode it is the one that
waits for producers) and submits each of this rank's batches to a small pool of reader threads, which
copy the samples out of the memory-mapped shards straight into the batch tensors (zero-copy up to
that one copy; CRC-32 and torch copies release the GIL). At most `prefetch` batches are in flight.
The train loop only ever takes finished batches from a queue, in order.

Every rank builds the same plan, so DP ranks take disjoint slices of the same global batch
([dp_rank*G/dp_size, (dp_rank+1)*G/dp_size)) and TP ranks with the same dp_rank get identical batches.

Lost shards: when entries are planned, every listed shard of the wanted buckets is stat()ed once; one
that is missing or has another size than the manifest's is left out of the plan (one warning per
planning step, counted in `stats`), and a bucket left with no readable shard drops out of training.
Every rank sees the same files, so every rank leaves out the same shards. Shards that pass this check
but fail their integrity checks while reading are skipped then, their samples replaced (`_build`).

Batch groups: a global batch takes the samples of one bucket whose condition images (image editing, cache format
v2) have the same shapes, so that its tensors stack; the plan keys its pools by plan.BatchGroup (bucket, condition
shapes), and a cache without edit samples is planned exactly as before. Task weights pick text-to-image or edit
per global batch (plan.py).

Held-out samples (holdout_fraction > 0): the samples whose key holdout.held_out selects for validation are
left out of the plan like excluded ones. Category weights (categories.py): each sample's category comes from its
meta JSON, and planning draws each category's share (plan.weigh_categories). Each wanted shard's key and meta
columns are read once, when its entry is first planned, if these need them; a shard that fails to open then is
left out of the plan as unreadable.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .batching import BalancedBatches
from .categories import OTHER, UNWEIGHTED, CategoryGroups, check_category_weights
from .collate import BufferPool, collate
from .exclusions import read_exclusions
from .format import CorruptShardError, group_name, parse_bucket_name
from .holdout import check_fraction, held_out
from .manifest import ManifestLog, ShardInfo
from .plan import (TASKS, BatchGroup, plan_epoch_batches, plan_round_batches, replacement_candidates, sample_ids,
                   split_id)
from .shard import VERIFY_MODES, ShardFile

log = logging.getLogger(__name__)

STATE_VERSION = 1
_END = object()
_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class _Task:
    """This rank's part of one global batch, as the planner hands it to a reader thread."""
    group: BatchGroup
    ids: np.ndarray          # this rank's sample ids
    pool: np.ndarray         # the group's ids of this epoch/round: where replacements come from
    key: tuple               # (1 stream | 2 epoch, round or epoch, step): seeds the replacement choice
    state_after: dict        # the loader position once this batch is consumed


@dataclass(frozen=True)
class _Pipeline:
    """The background machinery of prefetch > 0; `_stop_pipeline()` takes it down."""
    planner: threading.Thread
    out: queue.Queue         # (state_after, future of the batch), then _END or the planner's exception
    stop: threading.Event
    executor: ThreadPoolExecutor


@dataclass
class _RoundWait:
    """How long one streaming round has waited for producers, and when the waiting line was last logged."""
    round: int
    waited_s: float = 0.0
    logged_at_s: float = 0.0   # waited_s at the last 'waiting for producers' line


def check_family_weights(weights) -> dict | None:
    """{base resolution: weight} with int keys and weights >= 0 summing to > 0; ValueError naming the problem."""
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"family_weights={weights!r} must be a mapping of base resolution to weight, e.g. "
                         f"{{640: 0.7, 1328: 0.3}}")
    out = {}
    for family, weight in weights.items():
        if isinstance(family, bool) or not isinstance(family, int) and not (isinstance(family, str) and family.isdigit()):
            raise ValueError(f"family_weights: {family!r} is not a base resolution (an integer such as 640)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"family_weights[{family}]={weight!r} must be a number >= 0")
        out[int(family)] = float(weight)
    if sum(out.values()) <= 0:
        raise ValueError(f"family_weights={weights!r}: the weights must sum to a positive number")
    return out


def check_task_weights(weights) -> dict | None:
    """{"t2i" | "ti2i": weight} with weights >= 0 summing to > 0; ValueError naming the problem."""
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"task_weights={weights!r} must be a mapping of task to weight, e.g. {{t2i: 0.8, ti2i: 0.2}}")
    out = {}
    for task, weight in weights.items():
        if task not in TASKS:
            raise ValueError(f"task_weights: {task!r} is not a task; use {' or '.join(TASKS)} (text-to-image; "
                             f"editing: samples with condition images)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"task_weights[{task}]={weight!r} must be a number >= 0")
        out[task] = float(weight)
    if sum(out.values()) <= 0:
        raise ValueError(f"task_weights={weights!r}: the weights must sum to a positive number")
    return out


def bucket_set(buckets) -> set | None:
    """The `buckets` argument ("640x480" names or (width, height) pairs) as a set of pairs; None: all."""
    return None if buckets is None else {parse_bucket_name(b) if isinstance(b, str) else tuple(b) for b in buckets}


def wanted_shard(s: ShardInfo, base_resolution: int | None, buckets: set | None, families) -> bool:
    """Whether a stage reads shard `s`: of its family `base_resolution`, of one of its `buckets`, of one of its
    weighted `families` (each None: any), and not empty. The training loader and the validation loss's
    held-out set select with it alike."""
    return ((base_resolution is None or s.base_resolution == base_resolution)
            and (families is None or s.base_resolution in families)
            and (buckets is None or s.bucket in buckets) and s.num_samples > 0)


class NoTrainableDataError(ValueError):
    """The loader can never give a batch: no bucket has global_batch_size readable samples."""


class MissingFamilyError(NoTrainableDataError):
    """family_weights gives a positive weight to a bucket family the (finished) cache holds no sample of."""


class MissingTaskError(NoTrainableDataError):
    """task_weights gives a positive weight to a task (t2i, ti2i) the (finished) cache holds no sample of."""


class MissingCategoryError(NoTrainableDataError):
    """category_weights gives a positive weight to a category no sample of the (finished) cache has."""


@dataclass
class _Counters:
    """What `stats` counts (updated under the loader's lock)."""
    batches: int = 0
    samples: int = 0
    unreadable_samples: int = 0  # in shards left out of the plan
    skipped_samples: int = 0
    replaced_samples: int = 0
    wait_s: float = 0.0      # seconds waited for producers (streaming)


class BucketedLoader:
    """Iterate this rank's part of each global batch from the latent cache at `root`.

    Args:
      global_batch_size: samples per global batch (all DP ranks together); a multiple of dp_size.
      dp_rank, dp_size: this rank's data-parallel coordinates (TP ranks of one group pass the same).
      seed: the whole sequence is a function of (seed, global_batch_size, filters, manifest).
      streaming: follow the manifest while producers write (see plan.py); else one fixed set of
        entries, epoch after epoch.
      prefetch: batches built ahead in the background (0: build synchronously in next()).
      num_workers: reader threads building batches in parallel.
      output_dtype: dtype of latents and text_embeds (None: as stored).
      base_resolution / buckets: only use shards of that stage / those buckets ("640x480" or (640, 480)).
      verify: "sample" (CRC of every sample on first read), "full" (whole-shard CRC on open), "none".
      stream_round_samples: new samples per streaming round (default 8 x global_batch_size).
      stream_timeout_s: give up (TimeoutError) after waiting this long for producers (None: wait).
      wait_log_interval_s: while waiting for producers, log (INFO) what the round waits for every this
        many seconds.
      num_entries: epoch mode: use exactly the first N manifest entries (default: the sealed count,
        else all visible at construction).
      pin_memory: build latents and text embeddings in pinned host memory, so that the train step's
        non-blocking copies to a GPU are asynchronous (None: when a GPU is visible).
      family_weights: several bucket families in one stage, with the share of the batches each supplies, e.g.
        {640: 0.7, 1328: 0.3} (plan.py); only those families are read. None: every family base_resolution
        and buckets allow, each bucket in proportion to its size.
      batching: compute-balanced global batches (batching.BalancedBatches): each bucket's global batch size is
        batching.global_batch(bucket) instead of global_batch_size, so that every step costs about the same;
        None: global_batch_size for every bucket.
      holdout_fraction: leave out the samples whose key is held out for validation (holdout.held_out: a
        stable hash of the key below this fraction, in [0, 1)); 0: train on every sample.
      category_weights: {category: weight}, the share of each family's samples each category of the samples'
        meta JSON supplies, "*" for all the others (categories.py, plan.weigh_categories); samples of no
        weighted category are left out. None: every sample as it comes.
      task_weights: {"t2i": w, "ti2i": w}: the share of the global batches each task supplies (editing: samples
        with condition images; plan.py), picked per global batch; None: every batch group in proportion to its
        size.
    Batch tensors come from a pool that reuses a buffer only once the caller holds no reference to
    it (collate.BufferPool), so keeping a batch is always safe.
    """

    def __init__(self, root: str, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 streaming: bool = False, prefetch: int = 2, *, num_workers: int = 1,
                 output_dtype: torch.dtype | None = torch.float32, base_resolution: int | None = None,
                 buckets=None, verify: str = "sample", stream_round_samples: int | None = None,
                 poll_interval_s: float = 1.0, stream_timeout_s: float | None = None,
                 wait_log_interval_s: float = 10.0, num_entries: int | None = None, max_open_shards: int = 128,
                 pin_memory: bool | None = None, holdout_fraction: float = 0.0,
                 batching: BalancedBatches | None = None, family_weights: dict | None = None,
                 category_weights: dict | None = None, task_weights: dict | None = None):
        for name, v, lo in (("global_batch_size", global_batch_size, 1), ("dp_size", dp_size, 1),
                            ("prefetch", prefetch, 0), ("num_workers", num_workers, 1),
                            ("max_open_shards", max_open_shards, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}; use one of {VERIFY_MODES}")
        if not wait_log_interval_s > 0:
            raise ValueError(f"wait_log_interval_s={wait_log_interval_s!r} must be > 0")
        self.holdout_fraction = check_fraction(holdout_fraction)
        self.family_weights = check_family_weights(family_weights)
        self.category_weights = check_category_weights(category_weights)
        self.task_weights = check_task_weights(task_weights)
        self._groups = None if self.category_weights is None else CategoryGroups(self.category_weights)
        self.root = os.path.abspath(root)
        if batching is not None and batching.data_parallel_size != dp_size:
            raise ValueError(f"batching.data_parallel_size={batching.data_parallel_size} is not dp_size={dp_size}")
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.batching = batching
        self.seed, self.streaming, self.prefetch, self.num_workers = int(seed), streaming, prefetch, num_workers
        self.output_dtype, self.verify, self.base_resolution = output_dtype, verify, base_resolution
        self.bucket_filter = bucket_set(buckets)
        self.round_samples = stream_round_samples or 8 * global_batch_size
        self.poll_interval_s, self.stream_timeout_s = poll_interval_s, stream_timeout_s
        self.wait_log_interval_s = wait_log_interval_s
        self.max_open_shards = max_open_shards

        self.log = ManifestLog(self.root)  # refuses unknown format versions here
        self.log.refresh()
        self.exclusions = read_exclusions(self.root)  # the newest list; a resumed state brings its own
        self._shards: list[ShardInfo] = []
        self._entry_ranges: list[tuple[int, int]] = []  # entry k -> its shard ids [a, b)
        self._unreadable: dict[str, str] = {}  # shard path -> why it was left out of the plan
        self._dropped_groups: set[BatchGroup] = set()  # batch groups with no readable shard (warned once)
        if streaming:
            self._position = {"mode": "stream", "round": 0, "step": 0}
        else:
            self._position = {"mode": "epoch", "epoch": 0, "step": 0,
                              "num_entries": self._epoch_entry_count(num_entries)}
        self._lock = threading.Lock()
        self._open: OrderedDict[str, ShardFile] = OrderedDict()
        self._bad: dict[str, str] = {}
        self._verified_rows: dict[str, np.ndarray] = {}
        self._held_out: dict[str, np.ndarray] = {}  # shard path -> its held-out rows (read once per shard)
        self._codes: dict[int, np.ndarray] = {}  # shard id -> its rows' category group codes (category_weights)
        self._code_counts = np.zeros(UNWEIGHTED + 1, dtype=np.int64)  # samples per code, over the shards read
        self._counters = _Counters()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._pool = BufferPool(max_buffers=2 * (prefetch + num_workers) + 6, pin_memory=self.pin_memory)
        self._pipeline: _Pipeline | None = None  # call close() when done
        self._sync_gen = None   # prefetch=0

    # ------------------------------------------------------------------ public API
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch == 0:
            return self._next_sync()
        if self._pipeline is None:
            self._start()
        item = self._pipeline.out.get()
        if item is _END:
            self._pipeline.out.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            self._pipeline.out.put(item)
            raise item
        state_after, future = item
        batch, skipped, replaced = future.result()
        self._consumed(state_after, batch, skipped, replaced)
        return batch

    def state_dict(self) -> dict:
        """Position after the last batch returned by next() (prefetched batches are not counted)."""
        return {"version": STATE_VERSION, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "base_resolution": self.base_resolution,
                "buckets": None if self.bucket_filter is None else sorted(list(b) for b in self.bucket_filter),
                "stream_round_samples": self.round_samples, "exclusions": self.exclusions.number,
                "holdout_fraction": self.holdout_fraction,
                "batching": None if self.batching is None else asdict(self.batching),
                "family_weights": None if self.family_weights is None else sorted([f, w] for f, w in
                                                                                   self.family_weights.items()),
                "category_weights": None if self.category_weights is None else sorted(
                    [c, w] for c, w in self.category_weights.items()),
                "task_weights": None if self.task_weights is None else sorted(
                    [t, w] for t, w in self.task_weights.items()),
                "position": dict(self._position)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly after the batch the state was taken at (dp_size may differ; the global
        batches are the same)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r} is not {STATE_VERSION}")
        sd = {"holdout_fraction": 0.0, "batching": None, "family_weights": None, "category_weights": None,
              "task_weights": None, **sd}  # states saved before these
        mine = self.state_dict()
        keys = ["seed", "global_batch_size", "base_resolution", "buckets", "holdout_fraction", "batching",
                "family_weights", "category_weights", "task_weights"]
        if sd["position"].get("mode") == "stream":
            keys.append("stream_round_samples")  # rounds are cut by it
        for key in keys:
            if sd.get(key) != mine[key]:
                raise ValueError(f"cannot resume: loader state has {key}={sd.get(key)!r}, this loader has "
                                 f"{key}={mine[key]!r} (the batch sequence would differ)")
        pos = dict(sd["position"])
        if pos.get("mode") == "stream" and not self.streaming:
            raise ValueError("cannot resume: the state is from a streaming loader; construct with streaming=True")
        self._stop_pipeline()
        self._sync_gen = None
        if sd.get("exclusions", 0) != self.exclusions.number:
            # Planned with another exclusion list: keep that one, or the batch sequence would differ.
            self.exclusions = read_exclusions(self.root, sd.get("exclusions", 0))
        self._position = pos

    @property
    def stats(self) -> dict:
        """Counters: batches/samples returned, shards left out of the plan as unreadable (and why, and
        their samples), corrupt shards skipped while reading (and why), samples skipped and replaced,
        duplicate/corrupt manifest entries, seconds waited for producers, the exclusion list in use
        (its number and how many samples it lists), the held-out samples left out of the shards planned
        so far, and with category_weights the samples of each weighted category in them and those of no
        weighted category (left out)."""
        with self._lock:
            categories = {} if self._groups is None else {
                "category_samples": {n: int(self._code_counts[i]) for i, n in enumerate(self._groups.names)},
                "unweighted_samples": int(self._code_counts[UNWEIGHTED])}
            return {**asdict(self._counters), **categories, "unreadable_shards": len(self._unreadable),
                    "unreadable_shard_reasons": dict(self._unreadable),
                    "corrupt_shards": len(self._bad), "corrupt_shard_reasons": dict(self._bad),
                    "exclusion_list": self.exclusions.number, "excluded_samples": self.exclusions.num_samples,
                    "held_out_samples": int(sum(len(r) for r in self._held_out.values())),
                    "entries": len(self.log), "duplicate_entries": sum(e.duplicate for e in self.log.entries),
                    "corrupt_entries": sum(e.corrupt is not None for e in self.log.entries)}

    def describe_categories(self) -> str | None:
        """The category draw in one line (the samples planned so far), or None without category_weights."""
        if self._groups is None:
            return None
        stats = self.stats
        return self._groups.describe(stats["category_samples"], stats["unweighted_samples"])

    def describe_tasks(self) -> str | None:
        """Text-to-image and edit samples of the shards planned so far, and the task weights, in one line; None
        for a text-to-image-only stage without task_weights."""
        held: dict = {}
        for s in self._shards:
            if self._wanted(s) and s.path not in self._unreadable:
                task = BatchGroup.of(s).task
                held[task] = held.get(task, 0) + s.num_samples
        if self.task_weights is None and set(held) <= {"t2i"}:
            return None
        line = "tasks: " + ", ".join(f"{t} {held.get(t, 0)} samples" for t in TASKS)
        if self.task_weights is None:
            return line + " (no task_weights: each batch group in proportion to its samples)"
        total = sum(self.task_weights.values())
        return line + "; task weights " + ", ".join(f"{t} {100 * w / total:.0f}%" for t, w in
                                                    self.task_weights.items()) + " of the steps"

    def check_trainable(self) -> None:
        """Raise NoTrainableDataError now, before training starts, if this loader can never give a
        batch: in epoch mode, or streaming from a sealed cache, no bucket holds global_batch_size
        readable samples. A stream still open for writing waits for producers instead."""
        n = self._position["num_entries"] if self._position["mode"] == "epoch" else self.log.sealed_count()
        if n is not None:
            self._epoch_pools(n)

    def close(self) -> None:
        self._stop_pipeline()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ planning (one thread)
    def batch_size(self, group: BatchGroup) -> int:
        """Samples of one global batch of `group` (all DP ranks together)."""
        return self.global_batch_size if self.batching is None else self.batching.global_batch(*group)

    def _epoch_entry_count(self, num_entries):
        sealed = self.log.sealed_count()
        n = num_entries if num_entries is not None else sealed if sealed is not None else len(self.log)
        if num_entries is None and sealed is None and n > 0:  # with none, planning refuses the cache anyway
            log.warning("cache %s is not sealed: epoch mode uses the %d manifest entries visible now; every "
                        "rank must see the same ones (pass num_entries= or seal the cache to be sure)",
                        self.root, n)
        self.log.refresh(limit=n)
        if len(self.log) < n:
            raise ValueError(f"num_entries={n} but the manifest of {self.root} has only {len(self.log)} entries")
        return n

    def _index_entries(self, n: int) -> None:
        """Give shard ids to the live shards of entries [0, n) (in log order), and leave the wanted
        shards whose file is missing or of the wrong size out of the plan (one stat call each)."""
        first = len(self._entry_ranges)
        while len(self._entry_ranges) < n:
            e = self.log.entries[len(self._entry_ranges)]
            start = len(self._shards)
            if e.corrupt is not None:
                log.warning("skipping unreadable manifest entry: %s", e.corrupt)
            elif not e.duplicate:
                self._shards.extend(e.shards)
            self._entry_ranges.append((start, len(self._shards)))
        checked = [s for s in self._shards[self._entry_ranges[first][0]:] if self._wanted(s)] if first < n else []
        found = {s.path: why for s in checked if (why := shard_file_problem(self.root, s)) is not None}
        if found:
            with self._lock:
                self._unreadable.update(found)
                self._counters.unreadable_samples += sum(s.num_samples for s in checked if s.path in found)
            shown = "; ".join(list(found.values())[:3]) + ("; ..." if len(found) > 3 else "")
            log.warning("%d of %d shards of manifest entries %d..%d are unreadable and left out of the plan "
                        "(%d so far): %s", len(found), len(checked), first, n - 1, len(self._unreadable), shown)

    def _wanted(self, s: ShardInfo) -> bool:
        return wanted_shard(s, self.base_resolution, self.bucket_filter, self.family_weights)

    def _add_entry_ids(self, k: int, new: dict) -> int:
        a, b = self._entry_ranges[k]
        added = 0
        for sid in range(a, b):
            s = self._shards[sid]
            if not self._wanted(s) or s.path in self._unreadable:
                continue
            left_out = self._planning_rows(sid, s)
            if left_out is None:  # it failed to open: now unreadable
                continue
            excluded = self.exclusions.rows.get(s.path)
            if excluded is not None:
                left_out = np.union1d(left_out, excluded[excluded < s.num_samples])
            ids = np.delete(sample_ids(sid, s.num_samples), left_out)
            new[BatchGroup.of(s)].append(ids)
            added += len(ids)
        return added

    def _planning_rows(self, sid: int, s: ShardInfo) -> np.ndarray | None:
        """The rows of shard `sid` that planning leaves out (sorted): held out for validation, or of no weighted
        category; from its key and meta columns, read once (and its category codes kept). Nothing is opened
        when neither is asked for. None if the shard fails to open: it is then left out of the plan as
        unreadable, on every rank alike (they all see the same file)."""
        if self.holdout_fraction == 0 and self._groups is None:
            return _NO_ROWS
        rows = self._held_out.get(s.path)
        if rows is None:
            try:
                # verify="none": the open-time structure checks still run; the rows' checksums are checked
                # when they are read for a batch, and no shard is hashed whole twice (verify="full").
                shard = ShardFile(self.root, s, "none")
                keys = shard.column("key") if self.holdout_fraction > 0 else []
                codes = None if self._groups is None else self._groups.codes(shard.column("meta"))
            except CorruptShardError as e:
                with self._lock:
                    self._unreadable[s.path] = str(e)
                    self._counters.unreadable_samples += s.num_samples
                log.warning("shard left out of the plan: it fails to open (%d unreadable so far): %s",
                            len(self._unreadable), e)
                return None
            held = np.flatnonzero([held_out(key, self.holdout_fraction) for key in keys]).astype(np.int64)
            rows = held
            if codes is not None:
                rows = np.union1d(held, np.flatnonzero(codes == UNWEIGHTED))
                # Counted without the held-out rows: what training draws from.
                counted = np.bincount(np.delete(codes, held), minlength=UNWEIGHTED + 1)
            with self._lock:  # `stats` reads these from another thread
                self._held_out[s.path] = held
                if codes is not None:
                    self._codes[sid] = codes
                    self._code_counts += counted
        elif self._groups is not None:
            rows = np.union1d(rows, np.flatnonzero(self._codes[sid] == UNWEIGHTED))
        return rows

    def _group_of(self, ids: np.ndarray) -> np.ndarray:
        """The category group code of each sample id (plan.weigh_categories)."""
        out = np.empty(len(ids), dtype=np.uint8)
        shard_ids = ids >> np.int64(32)
        for sid in np.unique(shard_ids):
            mine = shard_ids == sid
            out[mine] = self._codes[int(sid)][ids[mine] & np.int64(0xFFFFFFFF)]
        return out

    def _wait_for_entry(self, k: int, stop: threading.Event | None, wait: _RoundWait, need) -> bool:
        """Block until manifest entry k exists (True) or the sealed log ends before it (False). Every
        wait_log_interval_s of the round's waiting, log what it waits for (`need()`: the round's wants)."""
        t0 = time.monotonic()
        while len(self.log) <= k:
            self.log.refresh()
            if len(self.log) > k:
                break
            sealed = self.log.sealed_count()
            if sealed is not None and k >= sealed:
                return False
            now = time.monotonic()
            if self.stream_timeout_s is not None and now - t0 > self.stream_timeout_s:
                raise TimeoutError(f"streaming loader waited {now - t0:.0f} s for manifest entry {k} of {self.root} "
                                   f"(stream_timeout_s={self.stream_timeout_s}); are producers running?")
            if wait.waited_s - wait.logged_at_s >= self.wait_log_interval_s:
                log.info("waiting for producers: %d shards (%d samples) committed to %s so far; round %d %s; "
                         "waited %.0f s", len(self._shards), sum(s.num_samples for s in self._shards), self.root,
                         wait.round, need(), wait.waited_s)
                wait.logged_at_s = wait.waited_s
            if stop is not None and stop.wait(self.poll_interval_s):
                raise _Stopped()
            if stop is None:
                time.sleep(self.poll_interval_s)
            waited = time.monotonic() - now
            wait.waited_s += waited
            with self._lock:
                self._counters.wait_s += waited
        return True

    def _next_round(self, r: int, next_entry: int, leftover: dict, stop):
        new, counts, added, ended = defaultdict(list), defaultdict(int), 0, False
        for b, ids in leftover.items():
            counts[b] += len(ids)
        wait = _RoundWait(r)

        def need() -> str:
            return (f"has {added} of the {self.round_samples} new samples it takes, and {max(counts.values(), default=0)} "
                    f"of global_batch_size={self.global_batch_size} in its fullest bucket")

        while not (added >= self.round_samples and any(c >= self.batch_size(b) for b, c in counts.items())):
            if not self._wait_for_entry(next_entry, stop, wait, need):
                ended = True
                break
            self._index_entries(next_entry + 1)
            before = {b: sum(map(len, v)) for b, v in new.items()}
            added += self._add_entry_ids(next_entry, new)
            for b, v in new.items():
                counts[b] += sum(map(len, v)) - before.get(b, 0)
            next_entry += 1
        pools = {b: np.concatenate(v) for b, v in new.items()}
        return (plan_round_batches(pools, self.seed, r, self.batch_size, carried=leftover, **self._weights()),
                next_entry, ended)

    def _epoch_pools(self, n: int) -> dict:
        """BatchGroup -> the sample ids of entries [0, n) that an epoch plans; warns once about each group left
        with no readable shard; raises NoTrainableDataError if no group fills a global batch (or a weighted
        family, category or task has no sample)."""
        self.log.refresh(limit=n)
        self._index_entries(n)
        pools = defaultdict(list)
        for k in range(n):
            self._add_entry_ids(k, pools)
        pools = {b: np.concatenate(v) for b, v in pools.items()}
        listed = {BatchGroup.of(s) for s in self._shards[:self._entry_ranges[n - 1][1]]
                  if self._wanted(s)} if n else set()
        for g in sorted(listed - set(pools) - self._dropped_groups):
            self._dropped_groups.add(g)
            log.warning("bucket %s of %s has no readable shard (all are missing or truncated): training without it",
                        group_name(*g), self.root)
        if self.family_weights is not None:
            held = {s.base_resolution for s in self._shards if BatchGroup.of(s) in pools}
            missing = sorted(f for f, w in self.family_weights.items() if w > 0 and f not in held)
            if missing:
                raise MissingFamilyError(f"family_weights names bucket families {missing} that {self.root} holds no "
                                         f"readable sample of (first {n} manifest entries; it holds "
                                         f"{sorted(f for f in held if f is not None)})")
        if self.task_weights is not None:
            self._check_tasks(pools, n)
        if self._groups is not None:
            self._check_categories(pools, n)
        G = self.global_batch_size
        if not any(len(v) >= self.batch_size(b) for b, v in pools.items()):
            sizes = {group_name(*g): len(v) if self.batching is None else f"{len(v)} of {self.batch_size(g)}"
                     for g, v in sorted(pools.items())}
            filters = "".join(f", {k}={v}" for k, v in (("base_resolution", self.base_resolution),
                                                         ("buckets", self.bucket_filter)) if v is not None)
            unreadable = f"; {len(self._unreadable)} shards are unreadable" if self._unreadable else ""
            raise NoTrainableDataError(
                f"no bucket of {self.root} has "
                f"{f'global_batch_size={G}' if self.batching is None else 'its compute-balanced global batch of'} "
                f"readable samples (first {n} manifest entries"
                f"{filters}): {sizes or 'no samples at all'}{unreadable}")
        return pools

    def _tasks(self, pos: dict, stop):
        """Yield this rank's tasks from position `pos` onward, forever (or until a sealed stream ends
        and the cache has no full batch)."""
        if pos["mode"] == "stream":
            leftover, next_entry = {}, 0
            for r in itertools.count():
                batch_plan, next_entry, ended = self._next_round(r, next_entry, leftover, stop)
                leftover = batch_plan.leftover
                if r >= pos["round"]:
                    start = pos["step"] if r == pos["round"] else 0
                    for s in range(start, len(batch_plan.batches)):
                        b = batch_plan.batches[s]
                        yield _Task(b.group, self._my_part(b.sample_ids), batch_plan.pools[b.group], (1, r, s),
                                    {"mode": "stream", "round": r, "step": s + 1})
                if ended:
                    break
            n = self.log.sealed_count()
            log.info("stream of %s is sealed and consumed (%d entries); continuing in epoch mode", self.root, n)
            pos = {"mode": "epoch", "epoch": 0, "step": 0, "num_entries": n}
        n = pos["num_entries"]
        pools = self._epoch_pools(n)
        for e in itertools.count(pos["epoch"]):
            batch_plan = plan_epoch_batches(pools, self.seed, e, self.batch_size, **self._weights())
            start = pos["step"] if e == pos["epoch"] else 0
            for s in range(start, len(batch_plan.batches)):
                b = batch_plan.batches[s]
                yield _Task(b.group, self._my_part(b.sample_ids), batch_plan.pools[b.group], (2, e, s),
                            {"mode": "epoch", "epoch": e, "step": s + 1, "num_entries": n})

    def _weights(self) -> dict:
        """plan.py's family and category arguments: the weights, each bucket's family from the shards planned so
        far (categories are weighed within each family), and each sample's category group."""
        out = {}
        if self.family_weights is not None or self._groups is not None:
            out["family_of"] = {s.bucket: s.base_resolution for s in self._shards}.get
        if self.family_weights is not None:
            out["family_weights"] = self.family_weights
        if self._groups is not None:
            out["categories"] = (self._group_of, self._groups.weights)
        if self.task_weights is not None:
            out["task_weights"] = self.task_weights
        return out

    def _check_tasks(self, pools: dict, n: int) -> None:
        """MissingTaskError if a task of positive weight has no sample in the epoch's pools."""
        held = {g.task: 0 for g in pools}
        for g, ids in pools.items():
            held[g.task] += len(ids)
        missing = [t for t, w in self.task_weights.items() if w > 0 and t not in held]
        if missing:
            hint = ("samples with condition images come from edit triplets (KEY.src.jpg + KEY.jpg + KEY.txt; "
                    "docs/editing.md)" if "ti2i" in missing else "text-to-image samples have no condition image")
            raise MissingTaskError(f"task_weights names tasks {missing} that no readable sample of {self.root} has "
                                   f"(first {n} manifest entries, in the stage's buckets; {hint}); it holds "
                                   f"{', '.join(f'{t}={c}' for t, c in sorted(held.items())) or 'no samples'}")


    def _check_categories(self, pools: dict, n: int) -> None:
        """MissingCategoryError if a named category of positive weight has no sample in the epoch's pools."""
        held = set(np.unique(np.concatenate([self._group_of(v) for v in pools.values()])).tolist()) if pools else set()
        names = self._groups.names
        missing = [c for i, c in enumerate(names) if c != OTHER and self._groups.weights[i] > 0 and i not in held]
        if missing:
            found = ", ".join(f"{c}={self.stats['category_samples'][c]}" for c in names if c not in missing)
            raise MissingCategoryError(
                f"category_weights names categories {missing} that no readable sample of {self.root} has (first {n} "
                f"manifest entries, in the stage's buckets; the samples' meta JSON 'category' field, which the "
                f"producer writes: producer config 'categories'); found {found or 'none of the others either'}, "
                f"{self.stats['unweighted_samples']} samples of no weighted category")

    def _my_part(self, sample_ids: np.ndarray) -> np.ndarray:
        """This DP rank's contiguous 1/dp_size of a global batch."""
        n = len(sample_ids) // self.dp_size
        return sample_ids[self.dp_rank * n:(self.dp_rank + 1) * n]

    # ------------------------------------------------------------------ reading (worker threads)
    def _shard(self, info: ShardInfo) -> ShardFile:
        with self._lock:
            sf = self._open.get(info.path)
            if sf is not None:
                self._open.move_to_end(info.path)
                return sf
        # Outside the lock: opening may read the whole file (verify="full").
        sf = ShardFile(self.root, info, self.verify, verified=self._verified_rows.get(info.path))
        with self._lock:
            self._open[info.path] = sf
            if sf.verified is not None:
                self._verified_rows[info.path] = sf.verified  # survives LRU eviction: each row is hashed once
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return sf

    def _read(self, sample_id):
        shard_id, row = split_id(sample_id)
        info = self._shards[shard_id]
        if info.path in self._bad:
            return None
        try:
            sf = self._shard(info)
            return (*sf.sample(row), sf.conditions(row))  # what collate takes: (key, latent, text, conds)
        except CorruptShardError as e:
            with self._lock:
                if info.path not in self._bad:
                    self._bad[info.path] = str(e)
                    self._open.pop(info.path, None)
                    log.warning("skipping corrupt shard (%d so far): %s", len(self._bad), e)
            return None

    def _build(self, task: _Task):
        samples, skipped, replaced = [], 0, 0
        for slot, sid in enumerate(task.ids):
            got = self._read(sid)
            if got is None:
                skipped += 1
                for cand in replacement_candidates(task.pool, self.seed, (*task.key, self.dp_rank, slot)):
                    got = self._read(cand)
                    if got is not None:
                        replaced += 1
                        break
                else:
                    raise RuntimeError(f"bucket {group_name(*task.group)} of {self.root}: a corrupt "
                                       f"sample and all its replacement candidates are corrupt: "
                                       f"{self.stats['corrupt_shard_reasons']}")
            samples.append(got)
        return collate(samples, self.output_dtype, alloc=self._pool), skipped, replaced

    def _consumed(self, state_after, batch, skipped, replaced):
        self._position = state_after
        with self._lock:
            self._counters.batches += 1
            self._counters.samples += len(batch["keys"])
            self._counters.skipped_samples += skipped
            self._counters.replaced_samples += replaced

    # ------------------------------------------------------------------ pipeline
    def _next_sync(self) -> dict:
        if self._sync_gen is None:
            self._sync_gen = self._tasks(dict(self._position), None)
        task = next(self._sync_gen)  # StopIteration ends the loop
        batch, skipped, replaced = self._build(task)
        self._consumed(task.state_after, batch, skipped, replaced)
        return batch

    def _start(self):
        stop = threading.Event()
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="cache-reader")
        pos = dict(self._position)

        def put(item):
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def planner():
            try:
                for task in self._tasks(pos, stop):
                    if not put((task.state_after, executor.submit(self._build, task))):
                        return
                put(_END)
            except _Stopped:
                pass
            except BaseException as e:  # surfaces in the train loop's next()
                put(e)

        thread = threading.Thread(target=planner, name="cache-planner", daemon=True)
        self._pipeline = _Pipeline(thread, out, stop, executor)
        thread.start()

    def _stop_pipeline(self):
        if self._pipeline is None:
            return
        p = self._pipeline
        p.stop.set()
        p.planner.join()
        while True:
            try:
                p.out.get_nowait()
            except queue.Empty:
                break
        p.executor.shutdown(wait=True, cancel_futures=True)
        self._pipeline = None


class _Stopped(Exception):
    pass


def shard_file_problem(root: str, info: ShardInfo) -> str | None:
    """Why the listed shard cannot be read, from one stat call (missing, or not the manifest's size), or None."""
    path = os.path.join(root, info.path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return f"{path}: missing (the manifest lists it)"
    except OSError as e:
        return f"{path}: {e.strerror}"
    if size != info.bytes:
        return f"{path}: {size} bytes, the manifest says {info.bytes} (truncated or replaced)"
    return None
