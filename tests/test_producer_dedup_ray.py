"""Cross-shard dedup on Ray (producer/dedup_ray.py) finds what one process finds: on a cache of several shards
and two base resolutions, through the CLI, and, shuffle by shuffle, on arrays with many close pairs where
partitioning matters. One local Ray of 2 CPUs for the module."""
import os

import numpy as np
import pytest
import ray

from megatron_qwen_image.cache import CacheReader
from megatron_qwen_image.cache.exclusions import read_exclusions
from producer.dedup import dedup_cache, decide, find_duplicates, find_relations, main as dedup_main
from producer.dedup_ray import Group, relations_on_ray
from producer.pipeline import init_ray
from tests.test_producer_dedup import hash_arrays, random_samples, write_unit


@pytest.fixture(scope="module")
def ray_session():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def cache(tmp_path):
    """Eight work units (one shard each) over two base resolutions, with duplicates within and across them:
    clustered pHashes (many close pairs), samples without one or both hashes, U4 a re-crawl of U1 (the same
    bytes under other keys), U5 a copy of U0 in base 320 (the same images in another stage: kept), and U7,
    in the middle of the manifest, corrupt (skipped: no rows)."""
    root = str(tmp_path / "cache")
    digests, hashes = random_samples(60, seed=3, centers=6)
    metas = [{**({"blake2b": b} if b is not None else {}), **({"phash": f"{h:016x}"} if h is not None else {})}
             for b, h in zip(digests, hashes)]
    units = [metas[k:k + 12] for k in range(0, 60, 12)]
    units = [*units[:4], units[1], units[0], units[4]]
    for u, samples in enumerate(units):
        write_unit(root, f"U{u}", [(f"u{u}s{i}", m) for i, m in enumerate(samples)], base=256 if u < 5 else 320)
        if u == 2:
            write_unit(root, "U7", [(f"u7s{i}", m) for i, m in enumerate(samples)])
    [victim] = [s for s in CacheReader(root).shards() if s.work_unit == "U7"]
    with open(os.path.join(root, victim.path), "r+b") as f:
        f.truncate(100)
    return root


def test_ray_finds_what_one_process_finds_on_a_cache(ray_session, cache):
    for max_distance in (4, None):
        one = find_duplicates(cache, max_distance)
        two = find_duplicates(cache, max_distance, workers=2)
        assert one.counts["exact_duplicate"] > 3 and (one.counts["near_duplicate"] > 5) == (max_distance == 4)
        assert len(one.samples) >= (5 if max_distance else 3) and one.counts["unhashed"] > 0  # across shards
        assert one.counts["corrupt_shards"] == 1
        assert (two.samples, two.counts, two.examples) == (one.samples, one.counts, one.examples)


def test_the_cli_on_ray_publishes_the_one_process_list(ray_session, cache, capsys):
    expected = find_duplicates(cache, 4).samples
    assert dedup_main([cache, "--max-distance", "4", "--workers", "2"]) == 0
    assert "on 2 Ray workers" in capsys.readouterr().out
    published = read_exclusions(cache)
    assert published.number == 1 and published.same_rows(expected)
    assert not dedup_cache(cache, max_distance=4)["changed"]  # one process: the same rows


@pytest.mark.parametrize("max_distance,partitions", [(4, 3), (2, 1), (0, 2)])
def test_partitioned_relations_equal_one_process_ones(ray_session, max_distance, partitions):
    """Relations from shuffles over uneven groups equal `find_relations`' (followers in any order, close pairs
    exactly); so the keep pass decides the same."""
    hi, lo, ph, flags = hash_arrays(*random_samples(3000, seed=max_distance, centers=40))
    edges = [0, 1, 700, 700, 1900, 3000]  # an empty group and a one-sample one too
    groups = [Group(640, a, b - a, ray.put({"b2_hi": hi[a:b], "b2_lo": lo[a:b], "ph": ph[a:b], "flags": flags[a:b]}))
              for a, b in zip(edges, edges[1:])]
    got = relations_on_ray(groups, max_distance, partitions)
    want = find_relations(hi, lo, ph, flags, max_distance)
    for name in ("exact", "same_phash"):
        assert all(np.array_equal(a, b) for a, b in zip(by_follower(getattr(got, name)), getattr(want, name)))
    assert all(np.array_equal(a, b) for a, b in zip(got.near, want.near))  # near_pairs' pairs, in its order
    assert len(want.exact[0]) > 200 and len(want.same_phash[0]) > 100
    assert (len(want.near[0]) > 1000) == (max_distance > 0)
    assert all(np.array_equal(a, b) for a, b in zip(vars(decide(got)).values(), vars(decide(want)).values()))


def by_follower(pairs):
    order = np.argsort(pairs[0])
    return pairs[0][order], pairs[1][order]
