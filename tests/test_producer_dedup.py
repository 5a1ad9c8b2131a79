"""Dedup across work units (producer.dedup) and the exclusion lists the loader honours."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from megatron_qwen_image.cache import BucketedLoader, CacheWriter, seal
from megatron_qwen_image.cache.exclusions import publish_superseded, read_exclusions
from megatron_qwen_image.cache.manifest import ManifestLog
from megatron_qwen_image.cache.maintenance import inspect_cache
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.config import load_config
from producer.dedup import dedup_cache, greedy_duplicates, main as dedup_main, near_pairs
from producer.sources import discover_shards
from producer.synthetic import generate_shards
from producer.workers import CpuWorker, EncoderWorker


def write_unit(root, unit: str, samples: list[tuple[str, dict]], base=256, supersedes=None):
    """A work unit of 256x256 samples (latent 16x32x32) with the given (key, meta)."""
    g = torch.Generator().manual_seed(len(unit))
    side = base // 8
    w = CacheWriter(root, unit, base_resolution=base)
    for key, meta in samples:
        w.add(key, torch.randn(16, side, side, generator=g), torch.randn(3, 8, generator=g), caption=key, meta=meta)
    w.commit(supersedes=supersedes)


def ph(bits: int) -> dict:
    return {"phash": f"{bits:016x}"}


def all_keys(root, **kw) -> list[str]:
    """Every key of one epoch (global batch 1: no key repeats before the next epoch starts)."""
    keys = []
    with BucketedLoader(root, global_batch_size=1, prefetch=0, output_dtype=None, **kw) as loader:
        for batch in loader:
            if batch["keys"][0] in keys:
                return keys
            keys.append(batch["keys"][0])


@pytest.fixture
def cache(tmp_path):
    root = str(tmp_path / "cache")
    write_unit(root, "A", [("a0", {"blake2b": "aa", **ph(0x0F0F)}), ("a1", {"blake2b": "a1", **ph(0xFF00FF00)}),
                           ("a2", {"blake2b": "a2", **ph(0x123456789ABCDEF0)})])
    write_unit(root, "B", [("b0", {"blake2b": "a1", **ph(0x1)}),                 # same bytes as a1
                           ("b1", {"blake2b": "b1", **ph(0x123456789ABCDEF3)}),  # 2 bits from a2
                           ("b2", {"blake2b": "b2", **ph(0x123456789ABC0000)}),  # far from everything
                           ("b3", {})])                                          # no hashes: never judged
    write_unit(root, "C", [("c0", {"blake2b": "aa", **ph(0x0F0F)})], base=640)  # a0 again, another stage
    return root


def test_duplicates_across_work_units_are_listed_and_skipped(cache):
    report = dedup_cache(cache, max_distance=4)
    assert (report["exact_duplicate"], report["near_duplicate"], report["unhashed"]) == (1, 1, 1)
    assert report["written"] and report["exclusion_list"] == 1 and report["samples"] == 8
    assert {(e["key"], e["duplicate_of"]) for e in report["examples"]} == {("b0", "a1"), ("b1", "a2")}
    keys = all_keys(cache, base_resolution=256)
    assert sorted(keys) == ["a0", "a1", "a2", "b2", "b3"]
    assert all_keys(cache, base_resolution=640) == ["c0"]  # a0's bytes, but in another stage
    # Nothing new: nothing published.
    again = dedup_cache(cache, max_distance=4)
    assert not again["changed"] and again["exclusion_list"] == 1
    assert sorted(os.listdir(os.path.join(cache, "exclusions"))) == ["000001.json"]
    assert read_exclusions(cache).by_bucket() == {"256x256": 2}
    info = inspect_cache(cache)
    assert (info["exclusion_list"], info["excluded_samples"], info["samples"]) == (1, 2, 8)


def test_a_superseded_version_stays_excluded_through_dedup(cache):
    """A work unit redone because its input changed (A#2, the same keys and bytes) supersedes A: the list
    leaves out A's rows, so each key is read once; dedup neither judges A#2's samples duplicates of the
    superseded ones nor drops A's rows from the list it publishes. (A#2 comes after B in the log, so B's
    copies of a1 and a2 are now the first ones, and A#2's are the duplicates.)"""
    log = ManifestLog(cache)
    assert publish_superseded(cache, log) is None  # nothing superseded yet
    write_unit(cache, "A#2", [("a0", {"blake2b": "aa", **ph(0x0F0F)}), ("a1", {"blake2b": "a1", **ph(0xFF00FF00)}),
                              ("a2", {"blake2b": "a2", **ph(0x123456789ABCDEF0)}), ("a3", {})], supersedes="A")
    assert publish_superseded(cache, log) == 1
    assert publish_superseded(cache, log) is None  # covered: nothing new
    ex = read_exclusions(cache)
    assert ex.info["superseded"] == ["A"] and ex.num_samples == 3
    assert sorted(all_keys(cache, base_resolution=256)) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]
    report = dedup_cache(cache, max_distance=4)
    assert (report["exact_duplicate"], report["near_duplicate"], report["superseded_samples"]) == (1, 1, 3)
    assert read_exclusions(cache).info["superseded"] == ["A"]
    assert sorted(all_keys(cache, base_resolution=256)) == ["a0", "a3", "b0", "b1", "b2", "b3"]


def test_planning_publishes_a_missed_exclusion_and_finds_changed_inputs(tmp_path):
    """No Ray: a run that stopped between a redo's commit and its exclusion list leaves the superseded version
    readable; the next run's planning publishes the list. An input modified after a commit that recorded no
    fingerprint (an older cache) counts as changed; --redo-changed queues its next version."""
    from producer.pipeline import ProducerRun
    from tests.test_producer_config import fake_encoders_dir

    (tmp_path / "raw").mkdir()
    tar = tmp_path / "raw" / "a.tar"
    tar.write_bytes(b"\0" * 1024)
    cache, encoders = str(tmp_path / "cache"), fake_encoders_dir(tmp_path)

    def plan(*overrides):
        run = ProducerRun(load_config(None, [f"encoders.dir={encoders}", *overrides]), [str(tmp_path / "raw")], cache)
        return run, list(run._plan())

    run, _ = plan()
    wu = run.specs[0].work_unit
    write_unit(cache, wu, [("k0", {}), ("k1", {})])
    write_unit(cache, f"{wu}#2", [("k0", {}), ("k1", {})], supersedes=wu)  # no exclusion list: the run stopped
    run, queue = plan()
    ex, log = read_exclusions(cache), ManifestLog(cache)
    log.refresh()
    old_version = {s.path for e in log.entries if e.work_unit == wu for s in e.shards}
    assert ex.info["superseded"] == [wu] and ex.num_samples == 2 and set(ex.rows) == old_version
    assert not queue and run.out.skipped == [f"{wu}#2"] and not run.out.changed
    later = os.stat(tar).st_mtime + 3600
    os.utime(tar, (later, later))
    run, queue = plan()
    assert not queue and run.out.changed == [{"work_unit": f"{wu}#2", "path": str(tar),
                                              "change": "modified after its commit", "redone": False}]
    run, queue = plan("sources.redo_changed=true")
    [(spec, target, attempt)] = queue
    assert (target.name, target.supersedes, attempt) == (f"{wu}#3", f"{wu}#2", 0)
    assert read_exclusions(cache).number == ex.number  # nothing new to publish before the redo commits


def test_exact_only_and_dry_run(cache, capsys):
    assert dedup_main([cache, "--max-distance", "-1", "--dry-run"]) == 0
    assert "1 exact and 0 near duplicates" in capsys.readouterr().out
    assert read_exclusions(cache).number == 0  # dry run published nothing
    assert dedup_main([cache, "--json", "--max-distance", "-1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["excluded"] == 1 and read_exclusions(cache).number == 1


def test_not_a_cache_is_a_clear_error(tmp_path, capsys):
    assert dedup_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a latent cache" in err and "Traceback" not in err


def test_a_resumed_loader_keeps_the_list_it_planned_with(cache):
    dedup_cache(cache)
    with BucketedLoader(cache, global_batch_size=1, prefetch=0, output_dtype=None, base_resolution=256) as a:
        next(a)
        state = a.state_dict()
        rest = [next(a)["keys"][0] for _ in range(4)]
    write_unit(cache, "D", [("d0", {"blake2b": "b2"})])  # a new duplicate -> list 2
    seal(cache)
    assert dedup_cache(cache)["exclusion_list"] == 2
    with BucketedLoader(cache, global_batch_size=1, prefetch=0, output_dtype=None, base_resolution=256,
                        num_entries=3) as b:
        assert b.exclusions.number == 2
        b.load_state_dict(state)
        assert b.stats["exclusion_list"] == 1
        assert [next(b)["keys"][0] for _ in range(4)] == rest
    assert "d0" not in all_keys(cache, base_resolution=256)


def test_missing_list_named_by_a_state_is_an_error(cache):
    dedup_cache(cache)
    with BucketedLoader(cache, global_batch_size=1, prefetch=0, base_resolution=256) as a:
        state = a.state_dict()
    os.remove(os.path.join(cache, "exclusions", "000001.json"))
    with BucketedLoader(cache, global_batch_size=1, prefetch=0, base_resolution=256) as b:
        with pytest.raises(Exception, match="exclusion list 1 does not exist"):
            b.load_state_dict(state)


def test_producer_stores_the_hashes_dedup_needs(tmp_path):
    """Two input shards where the second repeats an image of the first under another key: each shard
    alone keeps it; dedup over the cache lists exactly that repeat."""
    tiny = ensure_tiny()
    raw = tmp_path / "raw"
    paths = generate_shards(str(raw), num_shards=2, per_shard=4, seed=5, languages=("en",))
    with tarfile.open(paths[0]) as tf:
        key = tf.getmembers()[0].name.split(".", 1)[0]
        members = {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf.getmembers()
                   if m.name.split(".", 1)[0] == key}
    with tarfile.open(paths[1], "a") as tf:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"repeat.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny}", "latent_dtype=fp32"])
    cache = str(tmp_path / "cache")
    cpu, enc = CpuWorker(cfg), EncoderWorker(cfg, cache)
    for spec in discover_shards(paths):
        chunks = list(cpu.process_shard(spec))
        for c in chunks:
            enc.add_chunk(spec.work_unit, 0, c)
        enc.commit(spec.work_unit, 0, len(chunks))
    report = dedup_cache(cache)
    assert report["samples"] == 9 and report["exact_duplicate"] == 1 and report["unhashed"] == 0
    assert [(e["key"], e["duplicate_of"]) for e in report["examples"]] == [("repeat", key)]


def test_a_corrupt_shard_is_skipped_and_counted(cache):
    from megatron_qwen_image.cache import CacheReader

    victim = [s for s in CacheReader(cache).shards() if s.work_unit == "A"][0]
    with open(os.path.join(cache, victim.path), "r+b") as f:
        f.truncate(100)
    report = dedup_cache(cache, max_distance=4)
    assert report["corrupt_shards"] == 1
    # a0..a2 are gone, so b0 and b1 are no longer duplicates of anything
    assert (report["exact_duplicate"], report["near_duplicate"], report["samples"]) == (0, 0, 5)


def _sequential_reference(digests, hashes, max_distance):
    """The rule, one sample at a time: keep a sample unless its pHash is within max_distance of a kept
    one's (near) or its digest was seen before, in which case it shares the first such sample's fate."""
    first_of_digest, kept_hashes, out = {}, [], []
    for i, (b, h) in enumerate(zip(digests, hashes)):
        if b is not None and b in first_of_digest:
            r0, d0, i0 = first_of_digest[b]
            out.append((1, i0) if r0 == 0 else (r0, d0))
            continue
        res = (0, -1)
        if h is not None and max_distance is not None:
            res = next(((2, j) for j, hj in kept_hashes if bin(h ^ hj).count("1") <= max_distance), res)
            if res[0] == 0:
                kept_hashes.append((i, h))
        if b is not None:
            first_of_digest[b] = (*res, i)
        out.append(res)
    return out


def random_samples(n: int, seed: int, centers: int = 150) -> tuple[list, list]:
    """(digests, pHashes) of n samples, None where a sample lacks one: `centers` clusters of pHashes 0-6 bits
    apart, and one in ten the same bytes as an earlier sample, usually with its pHash."""
    rng = np.random.default_rng(seed)
    centers = rng.integers(0, 2**63, centers, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    digests, hashes = [], []
    for i in range(n):
        if i and rng.random() < 0.1:
            j = int(rng.integers(0, i))
            digests.append(digests[j] if digests[j] is not None else f"d{i}")
            hashes.append(hashes[j] if rng.random() < 0.8 else int(rng.integers(0, 2**62)))
            continue
        h = int(centers[rng.integers(0, len(centers))])
        for bit in rng.choice(64, size=int(rng.integers(0, 7)), replace=False):
            h ^= 1 << int(bit)
        u = rng.random()
        digests.append(None if u < 0.07 else f"d{i}")
        hashes.append(None if 0.05 < u < 0.12 else h)
    return digests, hashes


def hash_arrays(digests: list, hashes: list) -> tuple[np.ndarray, ...]:
    """`greedy_duplicates`' arguments (b2_hi, b2_lo, ph, flags) for random_samples' values."""
    flags = np.array([(b is not None) | (h is not None) << 1 for b, h in zip(digests, hashes)], np.uint8)
    hi = np.array([hash(b) % 2**64 if b is not None else 0 for b in digests], np.uint64)
    ph = np.array([h if h is not None else 0 for h in hashes], np.uint64)
    return hi, np.zeros_like(hi), ph, flags


@pytest.mark.parametrize("max_distance", [None, 0, 2, 4, 6])
def test_vectorised_dedup_equals_the_sequential_rule(max_distance):
    digests, hashes = random_samples(2500, max_distance or 0)
    reason, dup_of = greedy_duplicates(*hash_arrays(digests, hashes), max_distance)
    expected = _sequential_reference(digests, hashes, max_distance)
    assert list(zip(reason.tolist(), dup_of.tolist())) == expected
    near = (reason == 2).sum()
    assert (near == 0 if max_distance is None else near > 100) and (reason == 1).sum() > 100


def test_near_pairs_finds_exactly_the_close_pairs():
    rng = np.random.default_rng(1)
    variants = []
    for c in rng.integers(0, 2**63, 60, dtype=np.int64).tolist():  # clusters: a hash and 1-3 bit variants
        variants.append(c)
        for _ in range(20):
            for bit in rng.choice(64, size=int(rng.integers(1, 4)), replace=False).tolist():
                c ^= 1 << bit
            variants.append(c)
    h = np.unique(np.array(variants, np.uint64))
    h = rng.permutation(h)
    for d in (1, 3, 4, 5):
        i, j = near_pairs(h, d)
        dist = np.bitwise_count(h[:, None] ^ h[None, :])
        ej, ei = np.nonzero(np.tril(dist <= d, k=-1))  # j > i, in (j, i) order
        assert np.array_equal(i, ei) and np.array_equal(j, ej) and len(i) > 50
