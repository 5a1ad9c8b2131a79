"""Manifest snapshots (compaction): readers get exactly what the entries give, also while writers append."""
import json
import logging
import multiprocessing as mp
import os
import shutil
from dataclasses import replace

import pytest
import torch

from megatron_qwen_image.cache import CacheFormatError, CacheReader, CacheWriter
from megatron_qwen_image.cache.__main__ import main
from megatron_qwen_image.cache.format import FORMAT_VERSION, work_unit_id
from megatron_qwen_image.cache.maintenance import verify_snapshots
from megatron_qwen_image.cache.manifest import (ManifestLog, append_entry, compact, encode_snapshot, ensure_cache_dirs,
                                                entry_path, list_snapshots, snapshot_path)


def open_log(root, use_snapshots=True, limit=None) -> ManifestLog:
    ml = ManifestLog(root, use_snapshots=use_snapshots)
    ml.refresh(limit)
    return ml


def entry(unit: str, shards: int = 1, **extra) -> dict:
    """A manifest entry as CacheWriter.commit writes it (without shard files: the log alone is tested)."""
    wuid = work_unit_id(unit)
    return {"format_version": FORMAT_VERSION, "work_unit": unit, "work_unit_id": wuid, "attempt": "a1b2c3d4",
            "base_resolution": 256, "num_samples": 3 * shards, "host": "h", "pid": os.getpid(),
            "shards": [{"path": f"bucket=256x256/wu-{wuid}.a1b2c3d4.{k:04d}.arrow", "bucket": "256x256",
                        "num_samples": 3, "bytes": 1000 + k, "crc32": 12345 + k, "latent_shape": [16, 32, 32],
                        "latent_dtype": "fp16", "text_dim": 8, "text_dtype": "bf16"} for k in range(shards)],
            **extra}


def raw_entry(root, data: bytes) -> int:
    """Put arbitrary bytes into the log as its next entry (what a damaged entry file looks like)."""
    seq = len(open_log(root, use_snapshots=False))
    with open(entry_path(root, seq), "wb") as f:
        f.write(data)
    return seq


def mixed_cache(root) -> None:
    """Real committed work units (one a newer version of another), a duplicate, an entry with no shards,
    an unparseable entry and one with a missing field."""
    for unit, supersedes in (("unit-0", None), ("unit-1", None), ("unit-1#2", "unit-1")):
        w = CacheWriter(root, unit, latent_dtype="fp16", base_resolution=256, max_shard_samples=2)
        for i in range(3):
            w.add(f"{unit}-{i}", torch.randn(16, *((32, 32) if i % 2 else (24, 42))), torch.randn(2 + i, 8))
        w.commit(supersedes=supersedes)
    append_entry(root, entry("unit-0"))  # a duplicate: readers ignore it
    append_entry(root, {**entry("empty"), "shards": [], "base_resolution": None})
    raw_entry(root, b'{"format_version": 1, "work_unit": "tor')  # cut off
    raw_entry(root, json.dumps({k: v for k, v in entry("no-id").items() if k != "work_unit_id"}).encode())
    append_entry(root, entry("last", shards=2))


def test_reader_from_a_snapshot_equals_a_reader_from_the_entries(tmp_path):
    root = str(tmp_path / "c")
    mixed_cache(root)
    files = open_log(root, use_snapshots=False)
    assert [e.duplicate for e in files.entries] == [False] * 3 + [True] + [False] * 4
    assert [e.corrupt is not None for e in files.entries] == [False] * 5 + [True, True, False]
    c = compact(root)
    assert (c.num_entries, c.created, c.from_snapshot) == (8, True, 0) and c.path == snapshot_path(root, 8)
    snap = open_log(root)
    assert snap.from_snapshot == 8 and snap.entries == files.entries
    assert [e.supersedes for e in snap.entries][:3] == [None, None, "unit-1"]
    assert snap.live_shards() == files.live_shards() and len(snap.live_shards()) == 3 * 2 + 2
    assert os.listdir(os.path.join(root, "_tmp")) == []  # compaction's temp file is gone

    # Opened under another path, corrupt reasons name that path, exactly as reading the entries would.
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved)
    snap_moved, files_moved = open_log(moved), open_log(moved, use_snapshots=False)
    assert snap_moved.from_snapshot == 8 and snap_moved.entries == files_moved.entries
    assert snap_moved.entries[5].corrupt.startswith(entry_path(moved, 5) + ": ")

    # The tail after a snapshot is read from entry files; a limit cuts the snapshot like the entries.
    append_entry(root, entry("unit-1"))  # another duplicate, in the tail
    assert open_log(root).entries == open_log(root, use_snapshots=False).entries
    assert [e.duplicate for e in open_log(root).entries][-1]
    for limit in (0, 3, 8, 9):
        assert open_log(root, limit=limit).entries == open_log(root, use_snapshots=False, limit=limit).entries
    part = open_log(root, limit=4)
    part.refresh()  # continues after the limit: the rest of the snapshot comes from the entry files
    assert len(part) == 9 and part.entries == open_log(root, use_snapshots=False).entries


def append_units(root, writer: int, count: int, barrier):
    barrier.wait()  # all writers and compactors start together
    for k in range(count):
        append_entry(root, entry(f"w{writer}-{k:03d}", shards=1 + k % 2))
        if k == count // 2:
            append_entry(root, entry("shared"))  # every writer commits it: exactly one counts


def compact_until(root, barrier, done, results):
    """Compact over and over until `done`; report each compaction's (entries covered, taken from a snapshot)."""
    barrier.wait()
    while not done.is_set():
        c = compact(root)
        results.put((c.num_entries, c.from_snapshot))
    results.put(None)


def test_compaction_while_writer_processes_append(tmp_path):
    root = str(tmp_path / "c")
    ensure_cache_dirs(root)
    writers, count = 4, 50
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_qwen_image.cache.manifest", "tests.test_cache_manifest_snapshot"])
    barrier, done, results = ctx.Barrier(writers + 2), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=append_units, args=(root, w, count, barrier)) for w in range(writers)]
    compactors = [ctx.Process(target=compact_until, args=(root, barrier, done, results)) for _ in range(2)]
    for p in compactors + procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    done.set()
    runs, finished = [], 0
    while finished < len(compactors):
        r = results.get(timeout=120)
        finished += r is None
        runs += [] if r is None else [r]
    for p in compactors:
        p.join(timeout=120)
    assert [p.exitcode for p in procs + compactors] == [0] * (writers + len(compactors))
    total = writers * (count + 1)
    assert runs and all(0 <= n <= total and s <= n for n, s in runs)

    files = open_log(root, use_snapshots=False)
    assert len(files) == total
    snap = open_log(root)
    assert snap.entries == files.entries and snap.from_snapshot == max(n for n, _ in runs)
    units = [e.work_unit for e in snap.entries]
    assert sorted(u for u in units if u != "shared") == sorted(f"w{w}-{k:03d}" for w in range(writers)
                                                                for k in range(count))  # each exactly once
    for w in range(writers):  # each writer's entries in the order it appended them
        mine = [u for u in units if u.startswith(f"w{w}-")]
        assert mine == sorted(mine)
    assert [e.duplicate for e in snap.entries if e.work_unit == "shared"] == [False] + [True] * (writers - 1)
    assert verify_snapshots(root) == []  # every snapshot the racing compactions left is exact
    assert os.listdir(os.path.join(root, "_tmp")) == []

    # More appends, then a second compaction covers them, starting from the previous snapshot.
    for k in range(7):
        append_entry(root, entry(f"late-{k}"))
    c = compact(root)
    assert (c.num_entries, c.from_snapshot, c.created) == (total + 7, total, True)
    assert list_snapshots(root)[0] == total + 7 and len(list_snapshots(root)) == 2  # older ones pruned
    later = open_log(root)
    assert later.from_snapshot == total + 7 and later.entries == open_log(root, use_snapshots=False).entries
    assert compact(root).created is False  # nothing new: the snapshot is there already


def test_damaged_snapshots_are_ignored_and_an_unknown_version_is_refused(tmp_path, caplog):
    root = str(tmp_path / "c")
    ensure_cache_dirs(root)
    for k in range(5):
        append_entry(root, entry(f"u{k}"))
    assert compact(root).num_entries == 5
    for k in range(5, 8):
        append_entry(root, entry(f"u{k}"))
    newest = compact(root).path
    files = open_log(root, use_snapshots=False).entries
    good = open(newest, "rb").read()

    def damaged(data: bytes) -> ManifestLog:
        with open(newest, "wb") as f:
            f.write(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_qwen_image.cache.manifest"):
            ml = open_log(root)
        assert ml.entries == files  # never a wrong answer
        assert "ignoring manifest snapshot" in caplog.text and newest in caplog.text
        return ml

    assert damaged(good[:len(good) // 2]).from_snapshot == 5  # truncated: the older snapshot serves
    assert damaged(b"\x00garbage\n" * 10).from_snapshot == 5
    flipped = bytearray(good)
    flipped[-10] ^= 0x01  # one bit in the last record
    assert damaged(bytes(flipped)).from_snapshot == 5
    os.unlink(snapshot_path(root, 5))
    assert damaged(good[:-1]).from_snapshot == 0  # no valid snapshot left: the entry files alone
    assert any("readers ignore it" in p for p in verify_snapshots(root))

    # A snapshot of another log with the same entry count (a rebuilt cache) does not fit this one.
    other = str(tmp_path / "other")
    ensure_cache_dirs(other)
    for k in range(8):
        append_entry(other, entry(f"x{k}"))
    compact(other)
    assert damaged(open(snapshot_path(other, 8), "rb").read()).from_snapshot == 0

    # compact replaces a damaged snapshot of its own count; readers use it again.
    c = compact(root)
    assert c.created and open_log(root).from_snapshot == 8 and verify_snapshots(root) == []

    head, body = good.split(b"\n", 1)
    with open(newest, "wb") as f:
        f.write(json.dumps({**json.loads(head), "format_version": 99}).encode() + b"\n" + body)
    with pytest.raises(CacheFormatError, match=r"000000000008\.json: latent-cache format_version 99 is not supported"):
        open_log(root)
    with pytest.raises(CacheFormatError, match="format_version 99"):
        CacheReader(root)
    assert open_log(root, use_snapshots=False).entries == files  # a snapshot-unaware reader is unaffected


def test_cli_compact_inspect_verify(tmp_path, capsys):
    root = str(tmp_path / "c")
    assert main(["init", root]) == 0
    assert main(["compact", root]) == 0
    assert "nothing to compact" in capsys.readouterr().out and list_snapshots(root) == []
    for unit in ("u0", "u1"):
        with CacheWriter(root, unit, base_resolution=256) as w:
            w.add(f"{unit}-0", torch.randn(16, 32, 32), torch.randn(3, 8))
    assert main(["compact", root]) == 0
    out = capsys.readouterr().out
    assert "snapshot of 2 manifest entries written" in out and "0 taken from the previous snapshot" in out
    assert main(["inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["snapshot_entries"] == 2 and info["work_units"] == 2 and info["samples"] == 2
    assert main(["verify", root, "--quiet"]) == 0
    capsys.readouterr()
    with open(snapshot_path(root, 2), "r+b") as f:
        f.truncate(os.path.getsize(snapshot_path(root, 2)) - 3)
    assert main(["verify", root, "--quiet"]) == 1
    assert "BAD  manifest snapshot" in capsys.readouterr().out
    assert main(["compact", root, "--full"]) == 0  # replaces the damaged one
    assert "written" in capsys.readouterr().out and main(["verify", root, "--quiet"]) == 0
    capsys.readouterr()

    # A snapshot that passes its checks but says something else than the entries (a buggy compactor):
    # readers would use it, so verify must catch it.
    entries = open_log(root).entries
    entries[1].shards[0] = replace(entries[1].shards[0], num_samples=7)
    with open(snapshot_path(root, 2), "wb") as f:
        f.write(encode_snapshot(root, entries))
    assert open_log(root).live_shards()[1].num_samples == 7
    assert main(["verify", root, "--quiet"]) == 1
    assert "differs from manifest entries [1]" in capsys.readouterr().out
