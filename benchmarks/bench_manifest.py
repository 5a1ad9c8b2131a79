"""Manifest open time: reading every entry file against a compacted snapshot plus a short tail.

    python -m benchmarks.bench_manifest [--work-units 10000 100000] [--tail 100] [--repeats 3]

(benchmarks/results/manifest.json is from `--work-units 10000 100000 1000000`: about 12 minutes on 2 cores,
5 GiB of /tmp and ~8 GiB of memory at 10^6.)

For each size N a synthetic log is written straight into a temp cache under /tmp (entries as
`CacheWriter.commit` writes them: the same fields and indented JSON, one or two shards of a 640-family
bucket each, one in 200 a duplicate of an earlier work unit; no shard files, no fsync, so generating 10^6
is quick) and removed afterwards. Timed: `ManifestLog(root).refresh()` in a fresh object, which is what a
loader or reader does on open,
- before: entries only (`use_snapshots=False`): N opens and parses; twice: as the code before snapshots
  did it (the cyclic GC running meanwhile) and as refresh does it now (GC paused while it reads);
- after: `compact` wrote a snapshot of the first N - tail entries, then `tail` more were appended; the
  reader takes the snapshot (one large read) and reads the tail entries.
Both must give the same entries. The page cache is warm for both (every file was just written; best of
`--repeats`, the previous run's objects freed before the clock starts): this measures the file-system calls
and parsing, not the disk; a cold or NFS open of the entries is slower still (a round trip per file). Compaction's own time (from entries, and incremental from
the previous snapshot) is reported too.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import environment, print_table, save_results
from megatron_qwen_image.cache.format import FORMAT_VERSION, bucket_name, work_unit_id
from megatron_qwen_image.cache import manifest
from megatron_qwen_image.cache.manifest import ManifestLog, compact, ensure_cache_dirs, entry_path

BUCKETS = [(640, 640), (736, 560), (560, 736), (784, 528), (528, 784), (848, 480), (480, 848)]


def entry_json(i: int) -> bytes:
    """Entry i of the synthetic log, with the content and layout manifest.append_entry writes."""
    unit = f"/data/raw/{i - 100 if i % 200 == 199 else i:07d}.tar-1a2b3c4d@640"  # 1 in 200: a duplicate
    wuid, attempt = work_unit_id(unit), f"{i * 2654435761 % 2**32:08x}"
    shards = []
    for k in range(1 + i % 2):
        w, h = BUCKETS[(i + k) % len(BUCKETS)]
        shards.append({"path": f"bucket={bucket_name(w, h)}/wu-{wuid}.{attempt}.{k:04d}.arrow",
                       "bucket": bucket_name(w, h), "num_samples": 40 + i % 17, "bytes": 65_712_344 + i,
                       "crc32": i * 40503 % 2**32, "latent_shape": [16, h // 8, w // 8], "latent_dtype": "bf16",
                       "text_dim": 3584, "text_dtype": "bf16"})
    entry = {"format_version": FORMAT_VERSION, "work_unit": unit, "work_unit_id": wuid, "attempt": attempt,
             "base_resolution": 640, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
             "created_unix": 1.7e9 + i, "host": f"node{i % 64:02d}", "pid": 4000 + i % 1000,
             "input": {"files": 1, "bytes": 10_000_000 + i, "mtime_ns": 1_700_000_000_000_000_000 + i}}
    return json.dumps(entry, indent=1, sort_keys=True).encode()


def write_entries(root: str, start: int, stop: int) -> None:
    for i in range(start, stop):
        fd = os.open(entry_path(root, i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, entry_json(i))
        finally:
            os.close(fd)


def open_log(root: str, use_snapshots: bool) -> ManifestLog:
    ml = ManifestLog(root, use_snapshots=use_snapshots)
    ml.refresh()
    return ml


@contextlib.contextmanager
def gc_left_on():
    """Open as refresh did before snapshots came: with the cyclic GC running while it reads."""
    saved = manifest._gc_paused
    manifest._gc_paused = contextlib.nullcontext
    try:
        yield
    finally:
        manifest._gc_paused = saved


def time_open(root: str, use_snapshots: bool, repeats: int) -> tuple[ManifestLog, dict]:
    """Best/median of `repeats` opens; the previous run's log is freed before the clock starts (freeing
    10^6 entries takes seconds and is no part of opening)."""
    runs, ml = [], None
    for _ in range(repeats):
        ml = None
        gc.collect()
        t0 = time.perf_counter()
        ml = open_log(root, use_snapshots)
        runs.append(time.perf_counter() - t0)
    return ml, {"best_s": min(runs), "median_s": statistics.median(runs), "runs_s": runs}


def measure(n: int, tail: int, repeats: int, tmp_root: str) -> dict:
    root = tempfile.mkdtemp(prefix=f"bench_manifest_{n}_", dir=tmp_root)
    try:
        ensure_cache_dirs(root)
        t0 = time.perf_counter()
        write_entries(root, 0, n - tail)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = compact(root, full=True)
        compact_s = time.perf_counter() - t0
        write_entries(root, n - tail, n)
        snapshot_bytes = os.path.getsize(first.path)
        # No warm-up needed: every file was just written, so it is in the page cache.
        with gc_left_on():
            old, before_gc = time_open(root, False, repeats)
        old = None
        b, before = time_open(root, False, repeats)
        a, after = time_open(root, True, repeats)
        if a.from_snapshot != n - tail or len(a) != n or a.entries != b.entries:
            raise SystemExit(f"N={n}: the snapshot reader disagrees with the entries reader")
        t0 = time.perf_counter()
        second = compact(root)  # incremental: the previous snapshot plus the tail
        incremental_s = time.perf_counter() - t0
        if second.num_entries != n or second.from_snapshot != n - tail:
            raise SystemExit(f"N={n}: incremental compaction covered {second.num_entries} entries")
        return {"work_units": n, "tail": tail, "generate_s": gen_s, "entries_only_gc_on": before_gc,
                "entries_only": before, "snapshot": after, "speedup": before["best_s"] / after["best_s"],
                "speedup_vs_gc_on": before_gc["best_s"] / after["best_s"], "snapshot_bytes": snapshot_bytes,
                "entry_bytes_mean": sum(len(entry_json(i)) for i in range(0, n, max(1, n // 1000)))
                / len(range(0, n, max(1, n // 1000))),
                "compact_full_s": compact_s, "compact_incremental_s": incremental_s,
                "duplicates": sum(e.duplicate for e in b.entries)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-units", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--tail", type=int, default=100, help="entries appended after the snapshot")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", default="/tmp", help="where the temp caches go (needs ~5 KiB per work unit)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    out = {"command": "python -m benchmarks.bench_manifest " + " ".join(argv), "environment": environment(),
           "page_cache": "warm", "runs": {}}
    rows = []
    for n in args.work_units:
        r = measure(n, min(args.tail, n // 2), args.repeats, args.tmp)
        out["runs"][str(n)] = r
        print(f"  {n} work units: entries {r['entries_only_gc_on']['best_s']:.3g} s (GC on), "
              f"{r['entries_only']['best_s']:.3g} s; snapshot {r['snapshot']['best_s']:.3g} s", flush=True)
        rows.append([n, r["tail"], r["entries_only_gc_on"]["best_s"], r["entries_only"]["best_s"],
                     r["snapshot"]["best_s"], r["speedup_vs_gc_on"], r["speedup"], round(r["snapshot_bytes"] / n),
                     r["compact_full_s"], r["compact_incremental_s"]])
    print_table(["work units", "tail", "entries s (GC on)", "entries s", "snapshot s", "speed-up vs GC on",
                 "speed-up", "snapshot B/entry", "compact s", "compact incr s"], rows)
    print("results ->", save_results("manifest", out))
    return out


if __name__ == "__main__":
    main()
