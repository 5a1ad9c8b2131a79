"""Cross-shard dedup (`producer.dedup`): time and memory per sample, in one process and on Ray.

    python -m benchmarks.bench_dedup [--sections index ray] [--samples 200000 1000000] [--max-distance 4]
                                     [--ray-samples 10000000] [--ray-workers 1 2]

Every side gets the same values a cache scan yields, on synthetic data with 10 % repeated files and 10 %
near copies (1-4 bits). Reading the cache (one JSON meta per sample) is left out everywhere.

Section `index` (results "runs"), against the dict index it replaced: both get per sample the blake2b hex
digest, the 64-bit pHash and the sample's place (`synthetic`):
- baseline: the one-at-a-time index the first version used: a dict of digest strings, the banded
  `NearDuplicateIndex` of the per-shard filter and a dict pHash -> key;
- vectorised: the arrays `find_duplicates` keeps (25 bytes per sample) and `greedy_duplicates`.
Peak memory is tracemalloc's (numpy reports its buffers to it). Both must find the same duplicates.

Section `ray` (results "ray"): the hash columns of --ray-samples samples (`synthetic_arrays`, the same mix,
vectorised), deduplicated by `greedy_duplicates` in this process and by producer/dedup_ray.py's shuffles
(`relations_on_ray`, then the same `decide`) on a fresh local Ray of 1, 2, ... workers, the columns put in
its object store beforehand in the groups a scan would make. Wall time of the dedup alone (workers are
started and warm, as the scan leaves them). Memory: high-water RSS (VmHWM, reset through
/proc/PID/clear_refs) of this process during the one-process call, and of each Ray worker process and
of the driver during the Ray run, above their RSS when it started (an idle worker has imported
producer.dedup and with it torch: that is reported as idle RSS). A worker's RSS counts the object-store
pages it read. Object-store peak: the raylet's own figure, sampled every 0.2 s. All must agree.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import numpy as np

from benchmarks.common import RESULTS_DIR, environment, print_table, save_results


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """n (digest hex, pHash) pairs: 80 % new images, 10 % repeats of an earlier file, 10 % near copies."""
    rng = np.random.default_rng(seed)
    digests, hashes = [], []
    kinds = rng.random(n)
    for i in range(n):
        if i and kinds[i] < 0.1:
            j = int(rng.integers(0, i))
            digests.append(digests[j])
            hashes.append(hashes[j])
        elif i and kinds[i] < 0.2:
            h = hashes[int(rng.integers(0, i))]
            for bit in rng.choice(64, size=int(rng.integers(1, 5)), replace=False).tolist():
                h ^= 1 << bit
            digests.append(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest())
            hashes.append(h)
        else:
            digests.append(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest())
            hashes.append(int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)))
    return digests, hashes


def synthetic_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`synthetic`'s mix as hash columns (`HashColumns.arrays()`), vectorised: 80 % new images, 10 % repeats of
    an earlier file (its digest and pHash), 10 % near copies of an earlier one (its pHash, 1-4 distinct bits
    flipped, new bytes). Random 128-bit digests stand in for the digests of digest strings."""
    rng = np.random.default_rng(seed)
    kind = rng.random(n)
    kind[0] = 1.0  # the first is new
    i = np.arange(n)
    source = (rng.random(n) * i).astype(np.int64)  # an earlier sample, uniformly
    repeat, near = kind < 0.1, (kind >= 0.1) & (kind < 0.2)
    nbits, bits = rng.integers(1, 5, n), np.zeros((4, n), np.int64)
    for k in range(4):  # 4 distinct bit positions per sample, of which the first nbits flip
        bits[k] = rng.integers(0, 64, n)
        while (clash := np.flatnonzero((bits[:k] == bits[k]).any(0))).size:
            bits[k, clash] = rng.integers(0, 64, clash.size)
    flips = np.bitwise_or.reduce(np.where(np.arange(4)[:, None] < nbits, np.uint64(1) << bits.astype(np.uint64),
                                          np.uint64(0)), axis=0)
    new = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    # A copy's pHash is its source's XOR a delta (0 for a repeat): follow sources to a new image, XORing deltas.
    ph = np.where(repeat, np.uint64(0), np.where(near, flips, new))
    parent = np.where(repeat | near, source, i)
    while (m := np.flatnonzero(parent[parent] != parent)).size:
        ph[m] ^= ph[parent[m]]
        parent[m] = parent[parent[m]]
    ph = np.where(parent == i, ph, ph ^ ph[parent])
    first = np.where(repeat, source, i)  # the file a repeat is a copy of
    while (m := np.flatnonzero(first[first] != first)).size:
        first[m] = first[first[m]]
    digest = rng.integers(0, 2**63, (2, n), dtype=np.uint64)[:, first]
    return {"b2_hi": digest[0], "b2_lo": digest[1], "ph": ph, "flags": np.full(n, 3, np.uint8)}


def baseline(digests, hashes, max_distance: int) -> int:
    from producer.filters import NearDuplicateIndex

    seen_exact, owners, index, dups = {}, {}, NearDuplicateIndex(max_distance), 0
    for i, (b2, h) in enumerate(zip(digests, hashes)):
        key = f"{i // 1000:05d}/{i % 1000:04d}"  # the cache keys it held: shard/row-like strings
        if b2 in seen_exact or index.find(h) is not None:
            dups += 1
            continue
        seen_exact[b2] = key
        index.add(h)
        owners.setdefault(h, key)
    return dups


def vectorised(digests, hashes, max_distance: int) -> int:
    from producer.dedup import HashColumns, greedy_duplicates

    cols = HashColumns()  # what find_duplicates keeps per sample
    for i, (b2, h) in enumerate(zip(digests, hashes)):
        cols.add(b2, h)
    a = cols.arrays()
    reason, _ = greedy_duplicates(a["b2_hi"], a["b2_lo"], a["ph"], a["flags"], max_distance)
    return int((reason > 0).sum())


def measure(fn, *args) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    dups = fn(*args)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_bytes": peak, "duplicates": dups}


def index_section(samples: list[int], max_distance: int) -> tuple[dict, list[list]]:
    """The sort-based arrays against the dict index, at each size: (results, table rows)."""
    runs, rows = {}, []
    for n in samples:
        digests, hashes = synthetic(n)
        # Timing under tracemalloc slows Python code more than numpy: time a second, untraced run too.
        base = measure(baseline, digests, hashes, max_distance)
        vec = measure(vectorised, digests, hashes, max_distance)
        for r, fn in ((base, baseline), (vec, vectorised)):
            t0 = time.perf_counter()
            fn(digests, hashes, max_distance)
            r["seconds_untraced"] = time.perf_counter() - t0
        if base["duplicates"] != vec["duplicates"]:
            raise SystemExit(f"the two indexes disagree on {n} samples: {base['duplicates']} vs {vec['duplicates']}")
        run = {"baseline": base, "vectorised": vec,
               "bytes_per_sample": {"baseline": base["peak_bytes"] / n, "vectorised": vec["peak_bytes"] / n},
               "memory_ratio_baseline_over_vectorised": base["peak_bytes"] / vec["peak_bytes"],
               "speedup_untraced": base["seconds_untraced"] / vec["seconds_untraced"]}
        runs[str(n)] = run
        rows.append([n, base["duplicates"], round(run["bytes_per_sample"]["baseline"]),
                     round(run["bytes_per_sample"]["vectorised"]), run["memory_ratio_baseline_over_vectorised"],
                     base["seconds_untraced"], vec["seconds_untraced"], run["speedup_untraced"]])
    return runs, rows


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS; returns that RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status(pid, "VmRSS")


def _ray_workers() -> list[int]:
    """Pids of the Ray worker processes below this one (a local Ray's raylet starts them; titled ray::...)."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile
            pass
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - below
        below |= frontier
    workers = []
    for pid in sorted(below):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::"):
                    workers.append(pid)
        except OSError:
            pass
    return workers


class PrivateMemorySampler(threading.Thread):
    """Peak RssAnon (private memory: not the object-store pages a worker maps) of each Ray worker, sampled
    every `interval` s. VmHWM has no private-only counterpart."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in _ray_workers():
                try:
                    self.peak[pid] = max(self.peak.get(pid, 0), _status(pid, "RssAnon"))
                except (OSError, AttributeError):
                    pass
            self.stop.wait(self.interval)


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _digest(d) -> str:
    """A fingerprint of a `Decisions`, to compare runs in other processes."""
    return hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in vars(d).values())).hexdigest()


def child_one_process(path: str, max_distance: int) -> dict:
    """In a fresh process: what find_duplicates runs per base resolution, on the columns in `path`."""
    from producer.dedup import decide, find_relations

    cols = _load(path)
    before = _reset_peak(os.getpid())
    t0 = time.perf_counter()
    rel = find_relations(cols["b2_hi"], cols["b2_lo"], cols["ph"], cols["flags"], max_distance)
    t1 = time.perf_counter()
    got = decide(rel)
    t2 = time.perf_counter()
    peak = _status(os.getpid(), "VmHWM") - before
    return {"seconds": t2 - t0, "decide_seconds": t2 - t1, "peak_above_start_bytes": peak,
            "duplicates": len(got.index), "close_pairs": len(rel.near[0]), "decisions_sha256": _digest(got)}


def child_ray(path: str, max_distance: int, workers: int) -> dict:
    """In a fresh process with a fresh local Ray of `workers` CPUs: the shuffles and the same keep pass."""
    import ray

    from benchmarks.bench_producer_memory import ObjectStoreSampler
    from producer.dedup import decide
    from producer.dedup_ray import Group, group_target, relations_on_ray
    from producer.pipeline import init_ray

    cols = _load(path)
    n = len(cols["flags"])
    init_ray(num_cpus=workers)
    try:
        partitions, target = 2 * workers, group_target(n, workers)
        groups = [Group(640, a, min(target, n - a), ray.put({k: v[a:a + target] for k, v in cols.items()}))
                  for a in range(0, n, target)]
        small = ray.put({k: v[:2000] for k, v in cols.items()})
        del cols
        for _ in range(2):  # warm-up: start the workers and import the dedup code in them, as the scan would
            relations_on_ray([Group(640, 0, 2000, small)], max_distance, partitions)
        idle = {pid: _reset_peak(pid) for pid in _ray_workers()}
        idle_private = {pid: _status(pid, "RssAnon") for pid in idle}
        driver_before = _reset_peak(os.getpid())
        store, private = ObjectStoreSampler(), PrivateMemorySampler()
        store.start()
        private.start()
        t0 = time.perf_counter()
        rel = relations_on_ray(groups, max_distance, partitions)
        t1 = time.perf_counter()
        got = decide(rel)
        t2 = time.perf_counter()
        driver = _status(os.getpid(), "VmHWM") - driver_before
        peaks = {pid: _status(pid, "VmHWM") for pid in _ray_workers()}
        time.sleep(1.5)  # the raylet's statistics lag by about a second
        for s in (store, private):
            s.stop.set()
            s.join()
    finally:
        ray.shutdown()
    above = {pid: peak - idle.get(pid, 0) for pid, peak in peaks.items()}
    private_above = {pid: peak - idle_private.get(pid, 0) for pid, peak in private.peak.items()}
    return {"workers": workers, "partitions": partitions, "groups": len(groups), "seconds": t2 - t0,
            "decide_seconds": t2 - t1, "worker_processes": len(peaks),
            "worker_idle_rss_bytes": max(idle.values()),
            "worker_peak_rss_above_idle_bytes": sorted(above.values()),
            "worker_peak_private_above_idle_bytes": sorted(private_above.values()),
            "driver_peak_above_start_bytes": driver, "object_store_peak_bytes": store.peak,
            "duplicates": len(got.index), "close_pairs": len(rel.near[0]), "decisions_sha256": _digest(got)}


def _child(*args: str) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "PYTHONWARNINGS": "ignore"}  # Ray's workers import producer.* too
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_dedup", *args], cwd=repo, env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def ray_section(n: int, workers: list[int], max_distance: int) -> tuple[dict, list[list]]:
    """One process against Ray with each worker count, each in a fresh process, on the same n hash columns:
    (results, table rows)."""
    with tempfile.TemporaryDirectory(prefix="bench_dedup_") as tmp:
        path = os.path.join(tmp, "columns.npz")
        np.savez(path, **synthetic_arrays(n))
        one = _child("--child", "one", path, str(max_distance))
        runs = {str(w): _child("--child", "ray", path, str(max_distance), str(w)) for w in workers}
    rows = [["one process", "-", "-", one["seconds"], 1.0, one["decide_seconds"], "-",
             one["peak_above_start_bytes"] / 2**20, "-", one["peak_above_start_bytes"] / n, 1.0, "-", "-"]]
    for w, r in runs.items():
        if r["decisions_sha256"] != one["decisions_sha256"]:
            raise SystemExit(f"Ray with {w} workers disagrees with one process on {n} samples")
        private, total = max(r["worker_peak_private_above_idle_bytes"]), max(r["worker_peak_rss_above_idle_bytes"])
        r["time_ratio_over_one_process"] = r["seconds"] / one["seconds"]
        r["memory_ratio_worker_private_over_one_process"] = private / one["peak_above_start_bytes"]
        rows.append([f"Ray, {w} worker" + "s" * (int(w) > 1), r["partitions"], r["groups"], r["seconds"],
                     r["time_ratio_over_one_process"], r["decide_seconds"], r["worker_idle_rss_bytes"] / 2**20,
                     private / 2**20, total / 2**20, private / n, r["memory_ratio_worker_private_over_one_process"],
                     r["driver_peak_above_start_bytes"] / 2**20, r["object_store_peak_bytes"] / 2**20])
    return {"samples": n, "one_process": one, "ray": runs}, rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=["index", "ray"], default=["index", "ray"],
                   help="which comparisons to run; the others' results are kept in the results file")
    p.add_argument("--samples", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--max-distance", type=int, default=4)
    p.add_argument("--ray-samples", type=int, default=10_000_000)
    p.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # one PATH D | ray PATH D WORKERS
    args = p.parse_args(argv)
    if args.child:
        kind, path, d, *w = args.child
        print(json.dumps(child_one_process(path, int(d)) if kind == "one" else child_ray(path, int(d), int(w[0]))))
        return {}
    import producer.dedup  # noqa: F401  (imports are not part of either index's memory)
    import producer.filters  # noqa: F401
    command = "python -m benchmarks.bench_dedup " + " ".join(sys.argv[1:] if argv is None else argv)
    path = os.path.join(RESULTS_DIR, "dedup.json")
    out = {}
    if os.path.exists(path):  # keep the figures of sections not run now
        with open(path) as f:
            out = json.load(f)
    if "index" in args.sections:
        runs, rows = index_section(args.samples, args.max_distance)
        out.update({"command": command, "environment": environment(), "max_distance": args.max_distance,
                    "runs": runs})
        print_table(["samples", "duplicates", "B/sample dict", "B/sample arrays", "memory ratio", "dict s",
                     "arrays s", "speed-up"], rows)
    if "ray" in args.sections:
        ray_out, rows = ray_section(args.ray_samples, args.ray_workers, args.max_distance)
        out["ray_section"] = {"command": command, "environment": environment(), "max_distance": args.max_distance,
                              **ray_out}
        print(f"\n{args.ray_samples} samples, d = {args.max_distance}: one process vs Ray. Memory: peak above the "
              "start (one process, driver) or above an idle worker (the largest worker's private RssAnon, and its "
              "RSS with the object-store pages it read); ratios to one process")
        print_table(["run", "partitions", "groups", "wall s", "time ratio", "decide s", "idle worker MiB",
                     "worker private MiB", "worker RSS MiB", "B/sample/worker", "memory ratio", "driver MiB",
                     "object store MiB"], rows)
    print("results ->", save_results("dedup", out))
    return out


if __name__ == "__main__":
    main()
