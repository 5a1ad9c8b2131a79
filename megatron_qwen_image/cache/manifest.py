"""The manifest: an append-only, totally ordered commit log of small JSON files.

`manifest/000000000000.json`, `000000000001.json`, ... Each entry is one committed work unit and
lists its shards. A writer appends by writing its entry to a private temp file, fsyncing it and
link()ing it to the lowest free sequence number; link() fails if that name exists, so concurrent
writers on one shared filesystem never overwrite each other and each entry appears complete or not
at all. Entries are never modified or deleted, so the existing names always form a dense prefix
0..n-1 and readers find new ones by probing `n`.

Exactly-once: if the same work unit is ever committed twice (a crashed writer's rerun, a zombie
actor), readers use only its FIRST entry in log order and ignore later ones. Because the log is
totally ordered, every reader (every rank) makes the same choice.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from .format import (CACHE_FILE, ENTRY_DIGITS, MANIFEST_DIR, SEALED_FILE, TMP_DIR, WORKUNITS_DIR,
                     CacheFormatError, check_version, new_cache_file_content, parse_bucket_name,
                     read_cache_file)
from ..fsutil import atomic_replace, create_exclusive, fsync_dir, link_exclusive, unique_tmp_name, write_durable


def entry_path(root: str, seq: int) -> str:
    return os.path.join(root, MANIFEST_DIR, f"{seq:0{ENTRY_DIGITS}d}.json")


def ensure_cache_dirs(root: str) -> dict:
    """Create the cache skeleton if needed (safe to race) and return CACHE.json's content."""
    for d in (root, os.path.join(root, MANIFEST_DIR), os.path.join(root, WORKUNITS_DIR),
              os.path.join(root, TMP_DIR)):
        os.makedirs(d, exist_ok=True)
    if not os.path.exists(os.path.join(root, CACHE_FILE)):
        create_exclusive(os.path.join(root, CACHE_FILE), new_cache_file_content(), os.path.join(root, TMP_DIR))
    return read_cache_file(root)


def count_entries(root: str, hint: int = 0) -> int:
    """Length of the dense prefix of the log, in O(log n) stat calls (gallop from `hint`, then bisect)."""
    def exists(i: int) -> bool:
        return os.path.exists(entry_path(root, i))

    lo = hint if hint > 0 and exists(hint - 1) else 0  # every index < lo exists
    hi, step = lo, 1
    while exists(hi):
        lo = hi + 1
        hi += step
        step *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if exists(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def append_entry(root: str, entry: dict, hint: int = 0) -> int:
    """Append one entry (a JSON-able dict) to the log; return its sequence number."""
    tmp_dir = os.path.join(root, TMP_DIR)
    tmp = unique_tmp_name(tmp_dir, "entry")
    write_durable(tmp, json.dumps(entry, indent=1, sort_keys=True).encode())
    try:
        seq = count_entries(root, hint)
        while not link_exclusive(tmp, entry_path(root, seq)):
            seq += 1  # another writer took it; the next free number is higher
    finally:
        os.unlink(tmp)
    fsync_dir(os.path.join(root, MANIFEST_DIR))
    return seq


def sealed_count(root: str) -> int | None:
    """Number of log entries the cache was sealed with, or None while it is open for writing."""
    try:
        with open(os.path.join(root, SEALED_FILE), "rb") as f:
            return int(json.loads(f.read())["num_entries"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CacheFormatError(f"{os.path.join(root, SEALED_FILE)} is unreadable: {e}") from None


def seal(root: str) -> int:
    """Declare the log complete: streaming readers finish at this entry count; writers refuse to
    commit afterwards. Returns the sealed entry count. Idempotent."""
    read_cache_file(root)
    existing = sealed_count(root)
    if existing is not None:
        return existing
    n = count_entries(root)
    atomic_replace(os.path.join(root, SEALED_FILE),
                   json.dumps({"num_entries": n, "sealed_unix": time.time()}).encode(),
                   os.path.join(root, TMP_DIR))
    return n


def read_entry(root: str, seq: int) -> dict:
    with open(entry_path(root, seq), "rb") as f:
        return json.loads(f.read())


def workunit_hint_path(root: str, wuid: str) -> str:
    return os.path.join(root, WORKUNITS_DIR, f"{wuid}.json")


def hinted_seq(root: str, wuid: str) -> int | None:
    """The entry the work unit's hint names, or None while the work unit is not committed."""
    try:
        with open(workunit_hint_path(root, wuid), "rb") as f:
            return int(json.loads(f.read())["seq"])
    except FileNotFoundError:
        return None


def committed_entry(root: str, wuid: str) -> dict | None:
    """The committed entry of a work unit (with its `seq`), found through its hint; None if not committed."""
    seq = hinted_seq(root, wuid)
    return None if seq is None else {**read_entry(root, seq), "seq": seq}


def write_workunit_hint(root: str, wuid: str, work_unit: str, seq: int) -> int:
    """Written after the entry: its presence means the work unit is in the log (is_committed). Returns the
    entry the hint names afterwards: `seq`, or an earlier entry of the work unit another writer's hint
    named already. A hint that names a later entry than `seq` (a duplicate's writer was faster) is
    replaced, so that the hint names the entry readers use."""
    path, tmp_dir = workunit_hint_path(root, wuid), os.path.join(root, TMP_DIR)
    data = json.dumps({"work_unit": work_unit, "seq": seq, "host": socket.gethostname()}).encode()
    if create_exclusive(path, data, tmp_dir):
        return seq
    hinted = hinted_seq(root, wuid)
    if hinted is not None and hinted > seq:
        atomic_replace(path, data, tmp_dir)
        return seq
    return seq if hinted is None else hinted


def first_entry_of(root: str, wuid: str, start: int, seq: int) -> int:
    """The lowest sequence number in [start, seq] of an entry of `wuid`, where `seq` is one: entries
    start..seq-1 are read (a writer passes the log length it saw before its own append as `start`, so
    this is what other writers appended meanwhile, usually nothing)."""
    for i in range(start, seq):  # all exist: the log is a dense prefix
        with open(entry_path(root, i), "rb") as f:
            e = parse_entry(root, i, f.read())
        if e.corrupt is None and e.wuid == wuid:
            return i
    return seq


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard as the manifest describes it (all a planner needs; no file access)."""
    path: str                      # relative to the cache root
    bucket: tuple[int, int]        # pixel (width, height)
    num_samples: int
    bytes: int
    crc32: int
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    text_dim: int
    text_dtype: str
    base_resolution: int | None
    seq: int                       # the log entry that committed it
    work_unit: str

    @staticmethod
    def from_json(d: dict, seq: int, work_unit: str, base_resolution) -> "ShardInfo":
        return ShardInfo(path=d["path"], bucket=parse_bucket_name(d["bucket"]), num_samples=int(d["num_samples"]),
                         bytes=int(d["bytes"]), crc32=int(d["crc32"]), latent_shape=tuple(d["latent_shape"]),
                         latent_dtype=d["latent_dtype"], text_dim=int(d["text_dim"]), text_dtype=d["text_dtype"],
                         base_resolution=base_resolution, seq=seq, work_unit=work_unit)


@dataclass
class LogEntry:
    seq: int
    work_unit: str = ""
    wuid: str = ""
    shards: list = field(default_factory=list)   # list[ShardInfo]
    supersedes: str | None = None                # the work unit this entry's unit replaces (an older version)
    duplicate: bool = False                      # a later commit of an already committed work unit
    corrupt: str | None = None                   # why the entry file could not be parsed


def parse_entry(root: str, seq: int, raw: bytes) -> LogEntry:
    path = entry_path(root, seq)
    try:
        d = json.loads(raw)
        version = d.get("format_version")
    except (ValueError, AttributeError) as e:
        return LogEntry(seq, corrupt=f"{path}: {e}")
    check_version(version, path)  # an unknown version is refused, never skipped
    try:
        base = d.get("base_resolution")
        shards = [ShardInfo.from_json(s, seq, d["work_unit"], base) for s in d["shards"]]
        return LogEntry(seq, work_unit=d["work_unit"], wuid=d["work_unit_id"], shards=shards,
                        supersedes=d.get("supersedes"))
    except (KeyError, TypeError, ValueError) as e:
        return LogEntry(seq, corrupt=f"{path}: missing/bad field {e}")


class ManifestLog:
    """A reader's incremental view of the log: entries 0..n-1, with duplicates marked."""

    def __init__(self, root: str):
        self.root = root
        self.info = read_cache_file(root)
        self.entries: list[LogEntry] = []
        self._committed_wuids: set[str] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def sealed_count(self) -> int | None:
        return sealed_count(self.root)

    def refresh(self, limit: int | None = None) -> int:
        """Read entries that appeared since the last call (up to `limit` in total); return how many."""
        added = 0
        while limit is None or len(self.entries) < limit:
            seq = len(self.entries)
            try:
                with open(entry_path(self.root, seq), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                break
            e = parse_entry(self.root, seq, raw)
            if e.corrupt is None:
                if e.wuid in self._committed_wuids:
                    e.duplicate = True
                else:
                    self._committed_wuids.add(e.wuid)
            self.entries.append(e)
            added += 1
        return added

    def live_shards(self, upto: int | None = None) -> list[ShardInfo]:
        """Shards of the first `upto` entries that count (not duplicate, not corrupt), in log order."""
        out = []
        for e in self.entries[:upto]:
            if e.corrupt is None and not e.duplicate:
                out.extend(e.shards)
        return out
