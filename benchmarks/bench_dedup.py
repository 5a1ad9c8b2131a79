"""Cross-shard dedup index (`producer.dedup`): time and memory per sample, against the dict index it replaced.

    python -m benchmarks.bench_dedup [--samples 200000 1000000] [--max-distance 4]

Both sides get the same values a cache scan yields (per sample: the blake2b hex digest, the 64-bit pHash
and the sample's place), on synthetic data with 10 % repeated files and 10 % near copies (1-4 bits):
- baseline: the one-at-a-time index the first version used: a dict of digest strings, the banded
  `NearDuplicateIndex` of the per-shard filter and a dict pHash -> key;
- vectorised: the arrays `find_duplicates` keeps (~34 bytes per sample) and `greedy_duplicates`.
Reading the cache (one JSON meta per sample) costs the same for both and is left out. Peak memory is
tracemalloc's (numpy reports its buffers to it). Both must find the same duplicates.
"""
from __future__ import annotations

import argparse
import hashlib
import time
import tracemalloc

import numpy as np

from benchmarks.common import environment, print_table, save_results


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
        cols.add(b2, h, i // 1000, i % 1000, 640)
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--max-distance", type=int, default=4)
    args = p.parse_args(argv)
    import producer.dedup  # noqa: F401  (imports are not part of either index's memory)
    import producer.filters  # noqa: F401
    out = {"command": "python -m benchmarks.bench_dedup " + " ".join(argv or []), "environment": environment(),
           "max_distance": args.max_distance, "runs": {}}
    rows = []
    for n in args.samples:
        digests, hashes = synthetic(n)
        # Timing under tracemalloc slows Python code more than numpy: time a second, untraced run too.
        base = measure(baseline, digests, hashes, args.max_distance)
        vec = measure(vectorised, digests, hashes, args.max_distance)
        for r, fn in ((base, baseline), (vec, vectorised)):
            t0 = time.perf_counter()
            fn(digests, hashes, args.max_distance)
            r["seconds_untraced"] = time.perf_counter() - t0
        if base["duplicates"] != vec["duplicates"]:
            raise SystemExit(f"the two indexes disagree on {n} samples: {base['duplicates']} vs {vec['duplicates']}")
        run = {"baseline": base, "vectorised": vec,
               "bytes_per_sample": {"baseline": base["peak_bytes"] / n, "vectorised": vec["peak_bytes"] / n},
               "memory_ratio_baseline_over_vectorised": base["peak_bytes"] / vec["peak_bytes"],
               "speedup_untraced": base["seconds_untraced"] / vec["seconds_untraced"]}
        out["runs"][str(n)] = run
        rows.append([n, base["duplicates"], round(run["bytes_per_sample"]["baseline"]),
                     round(run["bytes_per_sample"]["vectorised"]), run["memory_ratio_baseline_over_vectorised"],
                     base["seconds_untraced"], vec["seconds_untraced"], run["speedup_untraced"]])
    print_table(["samples", "duplicates", "B/sample dict", "B/sample arrays", "memory ratio", "dict s",
                 "arrays s", "speed-up"], rows)
    print("results ->", save_results("dedup", out))
    return out


if __name__ == "__main__":
    main()
