"""CacheWriter: the producer side. Exactly-once, atomic commits of one work unit's samples.

Life of a work unit (docs/cache_format.md, "Writing"):
1. `add()` routes each sample to its group — its bucket (by latent size) and the shapes of its condition
   latents (image editing; none for text-to-image), since all rows of a shard share both — and appends it
   to that group's temp shard file in `_tmp/` (record batches of ~flush_bytes; a new shard every
   max_shard_bytes). Nothing in `_tmp/` is ever read. Temp files of earlier, killed attempts of the same
   work unit are deleted on start.
2. `commit()` finishes and fsyncs every temp shard, renames each into its bucket directory under a
   name derived from the work unit id plus this attempt's random suffix (so an attempt never
   overwrites a file another attempt may have committed), then appends ONE manifest entry listing all
   of the work unit's shards (manifest.py). Only that entry makes them visible. Last, a hint file
   marks the work unit committed, so reruns skip it.
3. A rerun after a crash either finds the hint (and does nothing) or commits again; if an entry for
   the work unit already made it into the log, readers ignore the later one (first entry wins), so
   no sample is ever duplicated. Unreferenced files are removed by `cleanup()`.
4. Two live writers of one work unit: the one that finds the other's hint before renaming discards
   its attempt; if both reach the log, the one whose entry is not the first sees that (the entries
   other writers appended since it looked, and the hint) and deletes the shard files it renamed into
   place at once. Either way it ends `already_committed` (committed elsewhere), and only its own files
   (named by its attempt id) are touched.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from . import manifest
from .buckets import ASPECT_RATIOS, bucket_of_latent, buckets_for_base
from .format import (FORMAT_VERSION, TMP_DIR, CacheFormatError, CondShapes, bucket_dir, bucket_name, cond_file_tag,
                     cond_numel, file_crc32, sample_crc, shard_schema, storage_dtype, tensor_to_numpy, work_unit_id)
from ..fsutil import fsync_dir, fsync_file

log = logging.getLogger(__name__)


class CacheSealedError(RuntimeError):
    """The cache was sealed (its log declared complete); no more commits are accepted."""


@dataclass
class _OpenShard:
    """The temp shard file a bucket is appending record batches to."""
    tmp_path: str
    sink: pa.OSFile
    writer: pa.ipc.RecordBatchFileWriter
    rows: int = 0


@dataclass
class _FinishedShard:
    """A complete, fsynced temp shard and the manifest's description of it (docs/cache_format.md)."""
    tmp_path: str | None   # None once commit() moves it into its bucket directory
    entry: dict            # path (relative to the root), bucket, num_samples, bytes, crc32, shapes, dtypes


class _GroupShards:
    """The temp shard files of one group of samples within one work unit: one bucket, one set of condition
    shapes (a shard's rows share both)."""

    def __init__(self, w: "CacheWriter", bucket, latent_shape, text_dim: int, cond_shapes: CondShapes):
        self.w, self.bucket, self.latent_shape, self.text_dim = w, bucket, tuple(latent_shape), text_dim
        self.cond_shapes = cond_shapes
        self.tag = cond_file_tag(cond_shapes)  # file names stay unique per (bucket, cond shapes) in an attempt
        self.schema = shard_schema(w.latent_dt, latent_shape, w.text_dt, text_dim,
                                   {"bucket": bucket_name(*bucket), "work_unit": w.work_unit,
                                    "base_resolution": w.base_resolution}, cond_shapes)
        self.rows: list[tuple] = []
        self.buffered = 0
        self.index = 0
        self.current: _OpenShard | None = None
        self.finished: list[_FinishedShard] = []

    def add(self, key, lat, cond, txt, caption, source, meta_json, crc):
        """`cond`: the row's condition latents, flat, one image after another (None without conditions)."""
        self.rows.append((key, lat, cond, txt, caption, source, meta_json, crc))
        self.buffered += lat.nbytes + txt.nbytes + (0 if cond is None else cond.nbytes)
        if self.buffered >= self.w.flush_bytes:
            self.flush()

    def _record_batch(self) -> pa.RecordBatch:
        keys, lats, conds, txts, caps, srcs, metas, crcs = zip(*self.rows)
        lat = np.concatenate([a.reshape(-1) for a in lats])
        txt = np.concatenate([a.reshape(-1) for a in txts])
        if self.w.latent_dt.name == "bf16":
            lat = lat.view(np.uint16)
        if self.w.text_dt.name == "bf16":
            txt = txt.view(np.uint16)
        lens = np.array([a.shape[0] for a in txts], dtype=np.int32)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens.astype(np.int64) * self.text_dim, out=offsets[1:])
        cond_column = []
        if self.cond_shapes:
            cond = np.concatenate(conds)
            if self.w.latent_dt.name == "bf16":
                cond = cond.view(np.uint16)
            cond_column = [pa.FixedSizeListArray.from_arrays(pa.array(cond), cond_numel(self.cond_shapes))]
        arrays = [
            pa.array(keys, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(lat), int(np.prod(self.latent_shape))),
            *cond_column,
            pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(txt)),
            pa.array(lens),
            pa.array(caps, pa.large_string()),
            pa.array(srcs, pa.string()),
            pa.array(metas, pa.large_string()),
            pa.array(np.array(crcs, dtype=np.uint32)),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def flush(self):
        if not self.rows:
            return
        if self.current is None:
            name = f"{self.w.tmp_stem}.{bucket_name(*self.bucket)}{self.tag}.{self.index:04d}.arrow.tmp"
            tmp = os.path.join(self.w.tmp_dir, name)
            sink = pa.OSFile(tmp, "wb")
            self.current = _OpenShard(tmp, sink, pa.ipc.new_file(sink, self.schema))
        batch = self._record_batch()
        self.current.writer.write_batch(batch)
        self.current.rows += batch.num_rows
        self.rows, self.buffered = [], 0
        if self.current.sink.tell() >= self.w.max_shard_bytes or self.current.rows >= self.w.max_shard_samples:
            self.close_current()

    def close_current(self):
        shard = self.current
        shard.writer.close()
        shard.sink.close()
        tmp = shard.tmp_path
        fsync_file(tmp)
        final = os.path.join(bucket_dir(*self.bucket), f"{self.w.file_stem}{self.tag}.{self.index:04d}.arrow")
        self.finished.append(_FinishedShard(tmp, {
            "path": final, "bucket": bucket_name(*self.bucket), "num_samples": shard.rows,
            "bytes": os.path.getsize(tmp), "crc32": file_crc32(tmp), "latent_shape": list(self.latent_shape),
            "latent_dtype": self.w.latent_dt.name, "text_dim": self.text_dim, "text_dtype": self.w.text_dt.name,
            **({"cond_shapes": [list(c) for c in self.cond_shapes]} if self.cond_shapes else {}),
        }))
        self.current = None
        self.index += 1

    def finish(self):
        self.flush()
        if self.current is not None:
            self.close_current()

    def discard(self):
        if self.current is not None:
            try:
                self.current.writer.close()
                self.current.sink.close()
            except Exception:  # already broken; we are deleting it anyway
                pass
            _unlink_quiet(self.current.tmp_path)
            self.current = None
        for s in self.finished:
            if s.tmp_path is not None:  # not yet renamed into a bucket dir
                _unlink_quiet(s.tmp_path)
        self.rows = []


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class CacheWriter:
    """Write the samples of ONE producer work unit (e.g. one input shard) into the cache.

    with CacheWriter(root, work_unit="s3://bucket/raw/00042.tar", latent_dtype="bf16", base_resolution=640) as w:
        for s in samples:
            w.add(s.key, latent[16, h, w], text_embed[L, D], caption, source, meta)
            # an image-editing sample also gives its condition (source) images' latents:
            # w.add(key, target[16, h, w], text_embed[L, D], caption, source, meta, cond_latents=[src[16, ch, cw]])
    # leaving the block commits (or, on an exception, discards everything of this attempt)

    If the work unit is already committed, `already_committed` is True, `add()` does nothing and
    `commit()` returns the existing entry, so a rerun never duplicates samples.
    """

    def __init__(self, root: str, work_unit: str, latent_dtype="bf16", base_resolution: int | None = None, *,
                 text_dtype="bf16", aspect_ratios=ASPECT_RATIOS, max_shard_bytes: int = 256 << 20,
                 max_shard_samples: int = 1 << 30, flush_bytes: int = 16 << 20, stale_temp_grace_s: float = 3600.0):
        self.root = os.path.abspath(root)
        self.work_unit = work_unit
        self.wuid = work_unit_id(work_unit)
        self.latent_dt = storage_dtype(latent_dtype)
        self.text_dt = storage_dtype(text_dtype)
        self.base_resolution = base_resolution
        self.allowed_buckets = set(buckets_for_base(base_resolution, aspect_ratios)) if base_resolution else None
        if max_shard_bytes <= 0 or max_shard_samples <= 0 or flush_bytes <= 0:
            raise ValueError("max_shard_bytes, max_shard_samples and flush_bytes must be positive")
        self.max_shard_bytes, self.max_shard_samples, self.flush_bytes = max_shard_bytes, max_shard_samples, flush_bytes
        self.stale_temp_grace_s = stale_temp_grace_s
        manifest.ensure_cache_dirs(self.root)
        self.tmp_dir = os.path.join(self.root, TMP_DIR)
        self.attempt = uuid.uuid4().hex[:8]
        self.file_stem = f"wu-{self.wuid}.{self.attempt}"
        self.tmp_stem = f"{self.file_stem}.{_HOST}.{os.getpid()}"  # who owns a temp file: see _stale_temp
        self.text_dim: int | None = None
        self.num_samples = 0
        self._groups: dict[tuple[tuple[int, int], CondShapes], _GroupShards] = {}  # by (bucket, cond shapes)
        self._keys: set[str] = set()
        self.state = "committed_elsewhere" if self.is_committed(self.root, work_unit) else "open"
        if self.already_committed:
            log.info("work unit %r is already committed to %s; skipping its samples", work_unit, self.root)
        else:
            self._remove_stale_temps()

    # ---------------------------------------------------------------- public API
    @staticmethod
    def is_committed(root: str, work_unit: str) -> bool:
        """True once `work_unit` has been committed to the cache at `root` (producers skip it)."""
        return os.path.exists(manifest.workunit_hint_path(root, work_unit_id(work_unit)))

    def add(self, key: str, latent: torch.Tensor, text_embed: torch.Tensor, caption: str = "", source: str = "",
            meta: dict | None = None, *, cond_latents=None) -> None:
        """One sample: `latent` [C, h, w] (its pixel size picks the bucket), the unpadded `text_embed` [L, D], and
        for image editing `cond_latents`, a list of [C, ch, cw] tensors, one per condition (source) image (None or
        empty: text-to-image). Latents and condition latents are stored in latent_dtype, text in text_dtype."""
        if self.state != "open":
            if self.already_committed:
                return
            raise RuntimeError(f"CacheWriter for work unit {self.work_unit!r} is {self.state}; add() is closed")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in work unit {self.work_unit!r}")
        if not isinstance(latent, torch.Tensor) or latent.dim() != 3:
            raise ValueError(f"latent for {key!r} must be a torch.Tensor [C, h, w], got "
                             f"{getattr(latent, 'shape', type(latent))}")
        if not isinstance(text_embed, torch.Tensor) or text_embed.dim() != 2 or text_embed.shape[0] < 1:
            raise ValueError(f"text_embed for {key!r} must be an unpadded torch.Tensor [L>=1, D], got "
                             f"{getattr(text_embed, 'shape', type(text_embed))}")
        if self.text_dim is None:
            self.text_dim = int(text_embed.shape[1])
        elif text_embed.shape[1] != self.text_dim:
            raise ValueError(f"text_embed for {key!r} is {text_embed.shape[1]} wide; this work unit's are {self.text_dim}")
        bucket = bucket_of_latent((latent.shape[1], latent.shape[2]))
        if self.allowed_buckets is not None and bucket not in self.allowed_buckets:
            raise ValueError(f"latent {tuple(latent.shape)} of {key!r} is pixel size {bucket_name(*bucket)}, not a "
                             f"bucket of base resolution {self.base_resolution}: {sorted(self.allowed_buckets)}")
        try:
            meta_json = json.dumps(meta or {}, sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta of {key!r} is not JSON-serialisable: {e}") from None
        conds = self._cond_arrays(key, latent, cond_latents)
        lat = tensor_to_numpy(latent, self.latent_dt)
        txt = tensor_to_numpy(text_embed, self.text_dt)
        cond_shapes = tuple(tuple(a.shape) for a in conds)
        cond = np.concatenate([a.reshape(-1) for a in conds]) if conds else None
        series = self._groups.get((bucket, cond_shapes))
        if series is None:
            series = self._groups[bucket, cond_shapes] = _GroupShards(self, bucket, lat.shape, self.text_dim,
                                                                      cond_shapes)
        elif lat.shape != series.latent_shape:
            raise ValueError(f"latent of {key!r} has {lat.shape[0]} channels; bucket {bucket_name(*bucket)} has "
                             f"{series.latent_shape[0]}")
        series.add(key, lat, cond, txt, str(caption), str(source), meta_json, sample_crc(key, lat, txt, cond))
        self._keys.add(key)
        self.num_samples += 1

    def commit(self, input_fingerprint: dict | None = None, supersedes: str | None = None) -> dict:
        """Make every sample added so far visible, atomically (one manifest entry). Returns the entry.

        `input_fingerprint` (what the input looked like when the attempt began) and `supersedes` (the older
        version of this work unit that this one replaces) are recorded in the entry for producers
        (docs/cache_format.md). If another writer committed the work unit first, this attempt's files are
        deleted at once, `already_committed` becomes True and the other writer's entry is returned."""
        if self.state in ("committed", "committed_elsewhere"):
            return self._existing_entry()
        if self.state != "open":
            raise RuntimeError(f"cannot commit work unit {self.work_unit!r}: writer is {self.state}")
        try:
            for series in self._groups.values():
                series.finish()
            shards = [s for series in self._groups.values() for s in series.finished]
            if manifest.sealed_count(self.root) is not None:
                raise CacheSealedError(f"cache {self.root} is sealed; cannot commit work unit {self.work_unit!r}")
            log_start = manifest.count_entries(self.root)  # entries after this are other writers' or ours
            if self.is_committed(self.root, self.work_unit):  # a concurrent attempt won; ours is redundant
                return self._discard(None)
            for s in shards:  # visible in the bucket dirs but unreferenced until the entry lands
                tmp, s.tmp_path = s.tmp_path, None  # abort() no longer deletes it; see _discard and cleanup()
                os.makedirs(os.path.join(self.root, os.path.dirname(s.entry["path"])), exist_ok=True)
                os.rename(tmp, os.path.join(self.root, s.entry["path"]))
            for d in {os.path.dirname(s.entry["path"]) for s in shards}:
                fsync_dir(os.path.join(self.root, d))
            entry = {
                "format_version": FORMAT_VERSION, "work_unit": self.work_unit, "work_unit_id": self.wuid,
                "attempt": self.attempt, "base_resolution": self.base_resolution,
                "num_samples": sum(s.entry["num_samples"] for s in shards), "shards": [s.entry for s in shards],
                "created_unix": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                **({"input": input_fingerprint} if input_fingerprint is not None else {}),
                **({"supersedes": supersedes} if supersedes is not None else {}),
            }
            seq = manifest.append_entry(self.root, entry, hint=log_start)
            sealed = manifest.sealed_count(self.root)
            if sealed is not None and seq >= sealed:
                raise CacheSealedError(f"cache {self.root} was sealed at {sealed} entries while work unit "
                                       f"{self.work_unit!r} committed as entry {seq}; readers ignore it")
            # Two writers that both passed the check above both reach the log; readers use the first entry.
            first = manifest.first_entry_of(self.root, self.wuid, log_start, seq)
            first = manifest.write_workunit_hint(self.root, self.wuid, self.work_unit, first)
            if first != seq:
                return self._discard(shards)
        except BaseException:
            if self.state == "open":
                self.abort()
            raise
        self.state = "committed"
        log.info("committed work unit %r: %d samples in %d shards (entry %d)", self.work_unit,
                 entry["num_samples"], len(shards), seq)
        return {**entry, "seq": seq}

    @property
    def already_committed(self) -> bool:
        """Another writer committed this work unit (before this one started, or first): nothing of this
        writer's is visible, and `add()` and `commit()` do nothing."""
        return self.state == "committed_elsewhere"

    def _discard(self, renamed: list[_FinishedShard] | None) -> dict:
        """Another writer committed the work unit first: delete this attempt's own files (its temp files, and
        the shard files it renamed into place, which only its own duplicate entry names) and return the
        other writer's entry."""
        log.warning("work unit %r was committed by another writer meanwhile; discarding this attempt",
                    self.work_unit)
        self.abort()
        for s in renamed or ():
            _unlink_quiet(os.path.join(self.root, s.entry["path"]))
        self.state = "committed_elsewhere"
        return self._existing_entry()

    def abort(self) -> None:
        """Discard everything this attempt wrote (temp files); the work unit stays uncommitted."""
        for series in self._groups.values():
            series.discard()
        self._groups.clear()
        if self.state == "open":
            self.state = "aborted"

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.state == "open":
            self.commit()

    # ---------------------------------------------------------------- internals
    def _cond_arrays(self, key: str, latent: torch.Tensor, cond_latents) -> list[np.ndarray]:
        """The condition latents of `add()`, checked and in the storage dtype ([] for text-to-image)."""
        if cond_latents is None:
            return []
        if not isinstance(cond_latents, (list, tuple)):  # a bare tensor is ambiguous (one image, or several stacked?)
            raise ValueError(f"cond_latents for {key!r} must be a list of torch.Tensor [C, h, w] (one per condition "
                             f"image) or None, got {type(cond_latents).__name__}")
        out = []
        for k, c in enumerate(cond_latents):
            if not isinstance(c, torch.Tensor) or c.dim() != 3 or min(c.shape) < 1:
                raise ValueError(f"cond_latents[{k}] for {key!r} must be a torch.Tensor [C, h, w], got "
                                 f"{getattr(c, 'shape', type(c))}")
            if c.shape[0] != latent.shape[0]:
                raise ValueError(f"cond_latents[{k}] for {key!r} has {c.shape[0]} channels; its latent has "
                                 f"{latent.shape[0]}")
            out.append(tensor_to_numpy(c, self.latent_dt))
        return out

    def _existing_entry(self) -> dict:
        return manifest.committed_entry(self.root, self.wuid)

    def _remove_stale_temps(self) -> None:
        """Delete temp files that earlier, dead attempts of this work unit left behind (killed writers).

        A temp file is stale if its owner process (host and pid are in its name) is gone, or, for
        another host whose processes we cannot see, if it is older than stale_temp_grace_s. A live
        concurrent attempt of the same work unit is left alone (both may commit; readers keep the first).
        """
        prefix = f"wu-{self.wuid}."
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            if name.startswith(prefix) and _stale_temp(name, path, self.stale_temp_grace_s):
                log.info("removing temp file %s of a dead writer of work unit %r", name, self.work_unit)
                _unlink_quiet(path)


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _stale_temp(name: str, path: str, grace_s: float) -> bool:
    parts = name.split(".")  # wu-<id>.<attempt>.<host>.<pid>.<bucket>[.cond<shapes>].<n>.arrow.tmp
    if len(parts) >= 4 and parts[2] == _HOST and parts[3].isdigit():
        try:
            os.kill(int(parts[3]), 0)
            return False  # its writer is alive on this host
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    try:
        return time.time() - os.path.getmtime(path) > grace_s
    except FileNotFoundError:
        return False


__all__ = ["CacheWriter", "CacheSealedError", "CacheFormatError"]
