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

Snapshots (compaction): `manifest_snapshots/NNNNNNNNNNNN.json` holds what readers take from entries
0..N-1 in one file, so that opening a log of 10^6 entries is one large read plus the tail. Entries are
never removed for it (the dense prefix stays; readers that do not know snapshots read entries as before),
and a snapshot that fails its checks is ignored, so a snapshot can only ever make reading faster.
"""
from __future__ import annotations

import gc
import io
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .format import (CACHE_FILE, ENTRY_DIGITS, FORMAT_NAME, FORMAT_VERSION, MANIFEST_DIR, SEALED_FILE,
                     SNAPSHOT_DIR, TMP_DIR, WORKUNITS_DIR, CacheFormatError, CondShapes, bucket_name, check_version,
                     crc32, file_crc32, new_cache_file_content, parse_bucket_name, read_cache_file)
from ..fsutil import atomic_replace, create_exclusive, fsync_dir, link_exclusive, unique_tmp_name, write_durable

log = logging.getLogger(__name__)

SNAPSHOT_KIND = "manifest-snapshot"
SNAPSHOTS_KEPT = 2  # the newest few stay, so a reader that listed the directory a moment ago finds its pick
SNAPSHOT_CHUNK = 1000  # records per line of a snapshot
ENTRY_CRC_CHUNK = 1 << 16  # read buffer for an entry file's CRC: entries are small, file_crc32's default is 16 MiB


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
    cond_shapes: CondShapes = ()   # (C, h, w) of each row's condition images (image editing); (): text-to-image

    @staticmethod
    def from_json(d: dict, seq: int, work_unit: str, base_resolution) -> "ShardInfo":
        return ShardInfo(path=d["path"], bucket=parse_bucket_name(d["bucket"]), num_samples=int(d["num_samples"]),
                         bytes=int(d["bytes"]), crc32=int(d["crc32"]), latent_shape=tuple(d["latent_shape"]),
                         latent_dtype=d["latent_dtype"], text_dim=int(d["text_dim"]), text_dtype=d["text_dtype"],
                         base_resolution=base_resolution, seq=seq, work_unit=work_unit,
                         cond_shapes=_parse_cond_shapes(d.get("cond_shapes", ())))  # absent (version 1): none

    def to_json(self) -> dict:
        """The entry's description of this shard again (from_json of it gives an equal ShardInfo)."""
        return {"path": self.path, "bucket": bucket_name(*self.bucket), "num_samples": self.num_samples,
                "bytes": self.bytes, "crc32": self.crc32, "latent_shape": list(self.latent_shape),
                "latent_dtype": self.latent_dtype, "text_dim": self.text_dim, "text_dtype": self.text_dtype,
                **({"cond_shapes": [list(c) for c in self.cond_shapes]} if self.cond_shapes else {})}


def _parse_cond_shapes(value) -> CondShapes:
    """The manifest's `cond_shapes`, [[16, h, w], ...], as a tuple of (C, h, w); ValueError if malformed
    (the entry then counts as unreadable, like any bad field)."""
    shapes = tuple(tuple(int(d) for d in shape) for shape in value)
    if any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
        raise ValueError(f"cond_shapes {value!r}: each must be [C, h, w] of positive sizes")
    return shapes


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
    return entry_from_json(root, seq, d)


def entry_from_json(root: str, seq: int, d: dict) -> LogEntry:
    """The reader's view of a (version-checked) entry: an entry file's content or a snapshot's record."""
    try:
        base = d.get("base_resolution")
        shards = [ShardInfo.from_json(s, seq, d["work_unit"], base) for s in d["shards"]]
        return LogEntry(seq, work_unit=d["work_unit"], wuid=d["work_unit_id"], shards=shards,
                        supersedes=d.get("supersedes"))
    except (KeyError, TypeError, ValueError) as e:
        return LogEntry(seq, corrupt=f"{entry_path(root, seq)}: missing/bad field {e}")


def entry_to_record(root: str, e: LogEntry) -> dict:
    """What a snapshot stores of an entry: its fields readers use (entry_from_json of it gives `e` back),
    or why it is unreadable, without the path (the cache may be opened under another path)."""
    if e.corrupt is not None:
        return {"corrupt": e.corrupt.removeprefix(entry_path(root, e.seq) + ": ")}
    rec = {"work_unit": e.work_unit, "work_unit_id": e.wuid, "shards": [s.to_json() for s in e.shards]}
    if e.shards:  # an entry's shards share its base resolution; without shards it shows nowhere
        rec["base_resolution"] = e.shards[0].base_resolution
    if e.supersedes is not None:
        rec["supersedes"] = e.supersedes
    return rec


def record_to_entry(root: str, seq: int, rec: dict) -> LogEntry:
    if "corrupt" in rec:
        return LogEntry(seq, corrupt=f"{entry_path(root, seq)}: {rec['corrupt']}")
    return entry_from_json(root, seq, rec)


def snapshot_path(root: str, num_entries: int) -> str:
    return os.path.join(root, SNAPSHOT_DIR, f"{num_entries:0{ENTRY_DIGITS}d}.json")


def list_snapshots(root: str) -> list[int]:
    """Entry counts of the snapshots present, newest (largest) first."""
    try:
        names = os.listdir(os.path.join(root, SNAPSHOT_DIR))
    except FileNotFoundError:
        return []
    return sorted((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit() and int(n[:-5]) > 0),
                  reverse=True)


class SnapshotCorrupt(ValueError):
    """A snapshot failed a check (truncated, garbage, not of this log): readers ignore it."""


def encode_snapshot(root: str, entries: list[LogEntry]) -> bytes:
    """Header line (JSON: what it covers, checksums), then the entries' records in log order, as lines
    that each hold a JSON array of up to SNAPSHOT_CHUNK records (one parse call per line is faster than
    one per record; a line at a time keeps a reader's extra memory small)."""
    n = len(entries)
    body = b"".join(json.dumps([entry_to_record(root, e) for e in entries[i:i + SNAPSHOT_CHUNK]],
                               separators=(",", ":")).encode() + b"\n" for i in range(0, n, SNAPSHOT_CHUNK))
    header = {"format": FORMAT_NAME, "kind": SNAPSHOT_KIND, "format_version": FORMAT_VERSION, "num_entries": n,
              # ties the snapshot to this log: a log rebuilt under the same root fails the check
              "last_entry_crc32": file_crc32(entry_path(root, n - 1), chunk=ENTRY_CRC_CHUNK),
              "body_bytes": len(body), "body_crc32": crc32(body), "created_unix": time.time()}
    return json.dumps(header).encode() + b"\n" + body


def read_snapshot(root: str, num_entries: int) -> list[LogEntry]:
    """Entries 0..num_entries-1 from their snapshot. Raises SnapshotCorrupt if it fails a check,
    CacheFormatError if it is of an unknown format version, OSError if it cannot be read (gone)."""
    path = snapshot_path(root, num_entries)
    with open(path, "rb") as f:
        head = f.readline()
        body = f.read()  # the one large read
    try:
        h = json.loads(head)
        if not head.endswith(b"\n") or h.get("format") != FORMAT_NAME or h.get("kind") != SNAPSHOT_KIND:
            raise ValueError("not a manifest snapshot")
    except (ValueError, AttributeError) as e:
        raise SnapshotCorrupt(f"{path}: bad header ({e})") from None
    check_version(h.get("format_version"), path)  # like entries: an unknown version is refused, never skipped
    if h.get("num_entries") != num_entries or h.get("body_bytes") != len(body) or h.get("body_crc32") != crc32(body):
        raise SnapshotCorrupt(f"{path}: truncated or damaged (size/CRC-32 differ from its header)")
    try:
        last_crc = file_crc32(entry_path(root, num_entries - 1), chunk=ENTRY_CRC_CHUNK)
    except FileNotFoundError:
        last_crc = None
    if last_crc != h.get("last_entry_crc32"):
        raise SnapshotCorrupt(f"{path}: does not match manifest entry {num_entries - 1} (a snapshot of another log)")
    entries = []
    try:
        for line in io.BytesIO(body):
            entries.extend([record_to_entry(root, seq, rec) for seq, rec in enumerate(json.loads(line), len(entries))])
    except (ValueError, TypeError, AttributeError) as e:  # only a buggy writer gets past the CRC with these
        raise SnapshotCorrupt(f"{path}: bad record ({e})") from None
    if len(entries) != num_entries:
        raise SnapshotCorrupt(f"{path}: {len(entries)} records, header says {num_entries}")
    return entries


def load_newest_snapshot(root: str) -> list[LogEntry]:
    """Entries from the newest snapshot that passes its checks ([] if none does); warns about bad ones."""
    for n in list_snapshots(root):
        try:
            return read_snapshot(root, n)
        except FileNotFoundError:
            continue  # pruned by a compaction since we listed the directory; an older one will do
        except (OSError, SnapshotCorrupt) as e:
            log.warning("ignoring manifest snapshot (reading the entries instead): %s", e)
    return []


@contextmanager
def _gc_paused():
    """Reading a large log allocates millions of objects that all stay alive: the cyclic GC would walk the
    growing list again and again for nothing (it more than doubles the open time of a snapshot)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ManifestLog:
    """A reader's incremental view of the log: entries 0..n-1, with duplicates marked.

    The first refresh starts from the newest valid snapshot if there is one (`use_snapshots`), then
    reads the entries after it one by one, as every later refresh does."""

    def __init__(self, root: str, use_snapshots: bool = True):
        self.root = root
        self.info = read_cache_file(root)
        self.entries: list[LogEntry] = []
        self._committed_wuids: set[str] = set()
        self._try_snapshot = use_snapshots
        self.from_snapshot = 0  # how many entries came from a snapshot

    def __len__(self) -> int:
        return len(self.entries)

    def sealed_count(self) -> int | None:
        return sealed_count(self.root)

    def _add(self, e: LogEntry) -> None:
        if e.corrupt is None:
            if e.wuid in self._committed_wuids:
                e.duplicate = True
            else:
                self._committed_wuids.add(e.wuid)
        self.entries.append(e)

    def refresh(self, limit: int | None = None) -> int:
        """Read entries that appeared since the last call (up to `limit` in total); return how many."""
        with _gc_paused():
            return self._read(limit)

    def _read(self, limit: int | None) -> int:
        added = 0
        if self._try_snapshot and not self.entries and limit != 0:
            self._try_snapshot = False  # only the first look: later ones read just the new tail
            for e in load_newest_snapshot(self.root)[:limit]:
                self._add(e)
            added = self.from_snapshot = len(self.entries)
        while limit is None or len(self.entries) < limit:
            seq = len(self.entries)
            try:
                with open(entry_path(self.root, seq), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                break
            self._add(parse_entry(self.root, seq, raw))
            added += 1
        return added

    def live_shards(self, upto: int | None = None) -> list[ShardInfo]:
        """Shards of the first `upto` entries that count (not duplicate, not corrupt), in log order."""
        out = []
        for e in self.entries[:upto]:
            if e.corrupt is None and not e.duplicate:
                out.extend(e.shards)
        return out


@dataclass
class Compaction:
    """What one compaction did."""
    num_entries: int            # entries the snapshot covers (0: the log is empty, nothing written)
    path: str | None
    created: bool               # False: a valid snapshot of that length was there already (a racing compaction)
    from_snapshot: int          # entries taken from the previous snapshot instead of their files
    removed: list[str]          # older snapshots pruned


def compact(root: str, full: bool = False, keep: int = SNAPSHOTS_KEPT) -> Compaction:
    """Write a snapshot of the committed log (entries 0..n-1 for the n seen now) for readers to start from.

    Safe while writers append: entries 0..n-1 all exist and never change, so the snapshot is exact for
    them, and appends that land meanwhile are simply the tail readers read after it. Safe against a
    racing compaction: a snapshot is created exclusively under its entry count (equal counts mean equal
    entries) and readers take the newest valid one. Starts from the newest snapshot unless `full`."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the new snapshot must be kept")
    ml = ManifestLog(root, use_snapshots=not full)
    ml.refresh()
    n = len(ml)
    if n == 0:
        return Compaction(0, None, False, 0, [])
    os.makedirs(os.path.join(root, SNAPSHOT_DIR), exist_ok=True)
    path, tmp_dir = snapshot_path(root, n), os.path.join(root, TMP_DIR)
    with _gc_paused():
        data = encode_snapshot(root, ml.entries)
    created = create_exclusive(path, data, tmp_dir)
    if not created:
        try:
            read_snapshot(root, n)
        except (OSError, SnapshotCorrupt) as e:  # a damaged one under that name: replace it
            log.warning("replacing manifest snapshot: %s", e)
            atomic_replace(path, data, tmp_dir)
            created = True
    # Prune: older snapshots beyond the newest `keep`, and any numbered past the end of the log (of
    # another log: entries are never deleted). A newer one whose last entry exists is a racing
    # compaction's: readers prefer it, so it stays.
    present = list_snapshots(root)
    stale = [m for m in present[keep:] if m < n] + [m for m in present
                                                     if m > n and not os.path.exists(entry_path(root, m - 1))]
    removed = []
    for m in stale:
        try:
            os.unlink(snapshot_path(root, m))
            removed.append(snapshot_path(root, m))
        except FileNotFoundError:
            pass  # a racing compaction pruned it
    return Compaction(n, path, created, ml.from_snapshot, removed)
