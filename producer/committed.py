"""What the cache already holds of an input shard, and whether the input changed since it was committed.

A work unit's commit records the input's fingerprint as it was when the attempt began
(`sources.InputFingerprint`: files, bytes, newest mtime). A later run compares: an input that changed
(a truncated download completed, a file replaced) is reported, and with `sources.redo_changed` redone
as the work unit's next version, `NAME#2`, `NAME#3`, ... (a new work unit to the cache, so each version
is committed exactly once). Committed shard files are immutable, so the older version's samples are not
deleted: the new version's entry names it (`supersedes`) and the cache's exclusion list takes all its
rows (docs/cache_format.md → Superseded work units).

A work unit committed before fingerprints were recorded counts as changed when its input's newest
mtime is later than its commit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_qwen_image.cache import CacheWriter
from megatron_qwen_image.cache.format import work_unit_id
from megatron_qwen_image.cache.manifest import committed_entry
from producer.sources import InputFingerprint


def version_name(work_unit: str, version: int) -> str:
    """The work-unit name of version `version` (1: the unit's own name)."""
    return work_unit if version == 1 else f"{work_unit}#{version}"


@dataclass(frozen=True)
class CommittedVersion:
    """The latest committed version of an input shard's work unit."""

    work_unit: str  # the input's work unit (version 1's name)
    version: int
    input: InputFingerprint | None  # None: committed before inputs were recorded
    committed_unix: float

    @property
    def name(self) -> str:
        return version_name(self.work_unit, self.version)

    def older_versions(self) -> list[str]:
        """The names this version superseded, directly or not."""
        return [version_name(self.work_unit, v) for v in range(1, self.version)]

    def change(self, now: InputFingerprint) -> str | None:
        """How the input differs from what this version was committed from, or None if it does not."""
        if self.input is None:
            return "modified after its commit" if now.mtime_ns > self.committed_unix * 1e9 else None
        if now == self.input:
            return None
        was, diff = self.input, []
        if now.files != was.files:
            diff.append(f"{was.files} -> {now.files} files")
        if now.bytes != was.bytes:
            diff.append(f"{was.bytes:,} -> {now.bytes:,} bytes")
        if now.mtime_ns != was.mtime_ns:
            diff.append("modified")
        return ", ".join(diff)

    def next_version(self) -> str:
        return version_name(self.work_unit, self.version + 1)


def latest_committed(root: str, work_unit: str) -> CommittedVersion | None:
    """The highest committed version of `work_unit` (one stat per version, one read of its entry), or None."""
    if not CacheWriter.is_committed(root, work_unit):
        return None
    version = 1
    while CacheWriter.is_committed(root, version_name(work_unit, version + 1)):
        version += 1
    entry = committed_entry(root, work_unit_id(version_name(work_unit, version)))
    fingerprint = InputFingerprint(**entry["input"]) if "input" in entry else None
    return CommittedVersion(work_unit, version, fingerprint, entry["created_unix"])


def fingerprint_record(fp: InputFingerprint) -> dict:
    """The fingerprint as a commit records it (the manifest entry's `input`)."""
    return asdict(fp)
