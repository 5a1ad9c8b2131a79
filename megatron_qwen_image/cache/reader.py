"""CacheReader: a read-only view of a cache directory (manifest + shards), for tools, tests and the loader."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

from .format import CorruptShardError, file_crc32
from .manifest import ManifestLog, ShardInfo
from .shard import ShardFile

log = logging.getLogger(__name__)


class CacheReader:
    """Committed shards of the cache at `root` (only what the manifest lists; `_tmp/` is never read).

    Raises CacheFormatError at construction if the cache (or any entry) has an unknown format version.
    """

    def __init__(self, root: str, verify: str = "sample", max_open_shards: int = 64):
        self.root = os.path.abspath(root)
        self.verify = verify
        self.log = ManifestLog(self.root)
        self.log.refresh()
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[str, ShardFile] = OrderedDict()

    def refresh(self) -> int:
        """Pick up entries committed since the last look; returns how many."""
        return self.log.refresh()

    @property
    def sealed(self) -> bool:
        return self.log.sealed_count() is not None

    def shards(self, base_resolution: int | None = None) -> list[ShardInfo]:
        return [s for s in self.log.live_shards()
                if base_resolution is None or s.base_resolution == base_resolution]

    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards())

    def buckets(self) -> dict[tuple[int, int], dict]:
        """(width, height) -> {"shards", "samples", "bytes", "groups"}, where "groups" splits the bucket by the
        shards' condition shapes: {cond_shapes: {"shards", "samples", "bytes"}}, () being text-to-image."""
        out: dict[tuple[int, int], dict] = {}
        for s in self.shards():
            b = out.setdefault(s.bucket, {"shards": 0, "samples": 0, "bytes": 0, "groups": {}})
            g = b["groups"].setdefault(s.cond_shapes, {"shards": 0, "samples": 0, "bytes": 0})
            for counts in (b, g):
                counts["shards"] += 1
                counts["samples"] += s.num_samples
                counts["bytes"] += s.bytes
        for b in out.values():
            b["groups"] = dict(sorted(b["groups"].items()))
        return dict(sorted(out.items()))

    def open(self, info: ShardInfo) -> ShardFile:
        """Open (or reuse) a shard; raises CorruptShardError if it fails the open-time checks."""
        sf = self._open.get(info.path)
        if sf is None:
            sf = ShardFile(self.root, info, self.verify)
            self._open[info.path] = sf
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(info.path)
        return sf

    def iter_records(self):
        """Every committed sample as a dict (copies), in manifest order. Corrupt shards raise."""
        for info in self.shards():
            sf = self.open(info)
            for i in range(sf.num_samples):
                yield sf.record(i)

    def verify_all(self, progress=None) -> dict:
        """Re-check everything: each shard's size and whole-file CRC-32 against the manifest, its Arrow
        structure, and every row's CRC-32. Returns {"ok": n, "bad": [(path, reason)], "samples": n}."""
        ok, bad, samples = 0, [], 0
        shards = self.shards()
        for k, info in enumerate(shards):
            path = os.path.join(self.root, info.path)
            try:
                sf = ShardFile(self.root, info, verify="sample")
                crc = file_crc32(path)
                if crc != info.crc32:
                    raise CorruptShardError(f"{path}: file CRC-32 {crc:#010x} != manifest {info.crc32:#010x}")
                for i in range(sf.num_samples):
                    sf.sample(i)
                ok += 1
                samples += sf.num_samples
            except CorruptShardError as e:
                bad.append((info.path, str(e)))
            if progress:
                progress(k + 1, len(shards))
        corrupt_entries = [e.corrupt for e in self.log.entries if e.corrupt]
        return {"ok": ok, "bad": bad, "samples": samples, "corrupt_entries": corrupt_entries}
