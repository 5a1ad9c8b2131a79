"""BucketedLoader: DP slicing, TP identity, exact resume, streaming (and what a waiting stream logs), corrupt
and lost shards, refusal of a cache it can never take a batch from, version refusal."""
import json
import logging
import os
import re
import threading
import time

import pytest
import torch

from megatron_qwen_image.cache import (BucketedLoader, CacheFormatError, CacheReader, CacheWriter, seal)
from megatron_qwen_image.cache.loader import NoTrainableDataError

# Two buckets of base 256: 256x256 (latent 32x32) and 336x192 (latent 24x42).
HW = {"sq": (32, 32), "wide": (24, 42)}


def write_unit(root, unit: int, n_sq: int, n_wide: int, text_dim=16, max_shard_samples=1 << 30):
    """One work unit with deterministic contents; returns {key: (latent bf16, text bf16)}."""
    g = torch.Generator().manual_seed(unit)
    out = {}
    with CacheWriter(root, f"unit-{unit}", base_resolution=256, max_shard_samples=max_shard_samples) as w:
        for i in range(n_sq + n_wide):
            kind = "sq" if i < n_sq else "wide"
            key = f"u{unit}-{kind}-{i}"
            lat = torch.randn(16, *HW[kind], generator=g)
            txt = torch.randn(1 + (i * 5 + unit) % 13, text_dim, generator=g)
            w.add(key, lat, txt, caption=key)
            out[key] = (lat.to(torch.bfloat16), txt.to(torch.bfloat16))
    return out


@pytest.fixture
def cache(tmp_path):
    root = str(tmp_path / "cache")
    data = {}
    for unit in range(4):
        data.update(write_unit(root, unit, n_sq=10, n_wide=6))  # 40 sq, 24 wide
    seal(root)
    return root, data


def take(loader, n):
    out = []
    for _ in range(n):
        out.append(next(loader))
    return out


def check_batch_against_source(batch, data):
    B, L = batch["text_mask"].shape
    assert batch["latents"].dtype == torch.float32 and batch["text_embeds"].shape[:2] == (B, L)
    assert L == max(data[k][1].shape[0] for k in batch["keys"])  # padded to the batch's longest
    for i, key in enumerate(batch["keys"]):
        lat, txt = data[key]
        n = txt.shape[0]
        assert torch.equal(batch["latents"][i], lat.float())
        assert batch["text_mask"][i].tolist() == [True] * n + [False] * (L - n)
        assert torch.equal(batch["text_embeds"][i, :n], txt.float())
        assert not batch["text_embeds"][i, n:].any()


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_dp_slices_are_disjoint_and_cover_each_bucket(cache, dp_size):
    root, data = cache
    G = 8
    steps = 40 // G + 24 // G  # one epoch: every sample exactly once (bucket sizes divide by G)
    loaders = [BucketedLoader(root, G, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    seen, per_bucket = [], {}
    for step in range(steps):
        parts = [next(ld) for ld in loaders]
        shapes = {tuple(p["latents"].shape[2:]) for p in parts}
        assert len(shapes) == 1, "all DP ranks must get the same bucket at a step"
        keys = [k for p in parts for k in p["keys"]]
        assert len(keys) == G and len(set(keys)) == G  # disjoint parts of one global batch
        for p in parts:
            check_batch_against_source(p, data)
        hw = shapes.pop()
        per_bucket[hw] = per_bucket.get(hw, 0) + 1
        seen += keys
    assert sorted(seen) == sorted(data)  # covering: each sample once per epoch
    assert per_bucket == {(32, 32): 5, (24, 42): 3}  # bucket chosen in proportion to its size
    for ld in loaders:
        assert ld.state_dict()["position"] == {"mode": "epoch", "epoch": 0, "step": steps, "num_entries": 4}
        ld.close()


def test_tp_ranks_get_identical_batches_and_seed_changes_the_order(cache):
    root, _ = cache
    with BucketedLoader(root, 8, 1, 2, seed=5) as a, BucketedLoader(root, 8, 1, 2, seed=5, num_workers=2) as b, \
            BucketedLoader(root, 8, 1, 2, seed=6) as c:
        ba, bb, bc = take(a, 6), take(b, 6), take(c, 6)
    for x, y in zip(ba, bb):
        assert x["keys"] == y["keys"]
        for k in ("latents", "text_embeds", "text_mask"):
            assert torch.equal(x[k], y[k])
    assert [x["keys"] for x in ba] != [x["keys"] for x in bc]


@pytest.mark.parametrize("prefetch,num_workers", [(0, 1), (3, 2)])
def test_resumed_loader_yields_exactly_the_uninterrupted_sequence(cache, prefetch, num_workers):
    root, _ = cache
    kw = dict(global_batch_size=8, dp_rank=1, dp_size=2, seed=11, prefetch=prefetch, num_workers=num_workers)
    with BucketedLoader(root, **kw) as full:
        reference = take(full, 20)  # crosses two epoch boundaries (8 batches per epoch)
    with BucketedLoader(root, **kw) as first:
        take(first, 7)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint (JSON-able)
        take(first, 2)  # prefetched/extra batches after the save must not leak into the state
    with BucketedLoader(root, **{**kw, "seed": 11}) as resumed:
        resumed.load_state_dict(state)
        rest = take(resumed, 13)
    for x, y in zip(reference[7:], rest):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["text_embeds"], y["text_embeds"])
    # A resume with a different DP layout keeps the global batches.
    with BucketedLoader(root, 8, 0, 1, seed=11) as one, BucketedLoader(root, 8, 0, 1, seed=11) as one2:
        one.load_state_dict(state)
        take(one2, 7)
        assert [b["keys"] for b in take(one, 3)] == [b["keys"] for b in take(one2, 3)]


def test_state_of_another_configuration_is_refused(cache):
    root, _ = cache
    with BucketedLoader(root, 8, seed=1) as a, BucketedLoader(root, 8, seed=2) as b:
        with pytest.raises(ValueError, match="seed"):
            b.load_state_dict(a.state_dict())
    with BucketedLoader(root, 8, seed=1) as a, BucketedLoader(root, 16, seed=1) as b:
        with pytest.raises(ValueError, match="global_batch_size"):
            b.load_state_dict(a.state_dict())


def test_streaming_sees_shards_committed_after_start_and_matches_a_late_start(tmp_path):
    root = str(tmp_path / "stream")
    data = write_unit(root, 0, n_sq=8, n_wide=0)
    kw = dict(global_batch_size=4, seed=2, streaming=True, stream_round_samples=8, poll_interval_s=0.02,
              stream_timeout_s=60)
    loader = BucketedLoader(root, **kw)
    first = take(loader, 2)  # round 0 = unit 0
    assert {k for b in first for k in b["keys"]} == set(data)

    def produce():
        for unit in range(1, 5):
            time.sleep(0.05)
            data.update(write_unit(root, unit, n_sq=5, n_wide=4))
        seal(root)

    producer = threading.Thread(target=produce)
    producer.start()
    batches = first + take(loader, 7)  # blocks until the producer has committed enough
    producer.join()
    late_keys = {k for b in batches[2:] for k in b["keys"]}
    assert any(k.startswith("u4-") for k in late_keys) or any(k.startswith("u3-") for k in late_keys)
    streamed = [k for b in batches for k in b["keys"]]
    assert len(streamed) == len(set(streamed))  # nothing twice within the stream
    for b in batches:
        check_batch_against_source(b, data)
    # After the sealed stream is consumed the loader goes on in epoch mode.
    rest = []
    for b in loader:
        rest.append(b)
        if loader.state_dict()["position"]["mode"] == "epoch":
            break
    loader.close()
    # The plan never depends on timing: a loader started after everything was committed gives the same.
    with BucketedLoader(root, **kw) as late:
        again = take(late, len(batches) + len(rest))
    assert [b["keys"] for b in again] == [b["keys"] for b in batches + rest]


def test_corrupt_and_truncated_shards_are_skipped_counted_and_never_fed(cache):
    root, data = cache
    reader = CacheReader(root)
    shards = reader.shards()
    flipped, truncated = shards[0], shards[3]
    bad_keys = set()
    # Flip bytes inside one sample's latent data (same size: only the per-sample CRC can tell).
    sf = reader.open(flipped)
    key, _, _ = sf.sample(2)
    bad_keys.add(key)
    offset = _file_offset_of_row(sf, 2)
    del sf
    path = os.path.join(root, flipped.path)
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        b = f.read(4)
        f.seek(offset + 100)
        f.write(bytes(x ^ 0xFF for x in b))
    # Truncate another shard (a new file, as a crashed copy would leave it).
    tpath = os.path.join(root, truncated.path)
    blob = open(tpath, "rb").read()
    with open(tpath + ".new", "wb") as f:
        f.write(blob[: len(blob) // 2])
    os.replace(tpath + ".new", tpath)
    bad_keys |= {r["key"] for r in _records_before_truncation(blob, truncated)}

    with BucketedLoader(root, 8, seed=0, num_workers=2) as loader:
        batches = take(loader, 16)  # two epochs
        stats = loader.stats
    for b in batches:
        assert len(b["keys"]) == 8  # replacements keep the batch size
        assert not bad_keys & set(b["keys"])
        check_batch_against_source(b, data)  # every sample fed is intact
    # The truncated shard has the wrong size: left out when planning. The flipped one passes that check
    # and is skipped when its bad row is read.
    assert stats["unreadable_shards"] == 1 and stats["unreadable_samples"] == truncated.num_samples
    assert "truncated" in stats["unreadable_shard_reasons"][truncated.path]
    assert stats["corrupt_shards"] == 1 and "CRC-32" in stats["corrupt_shard_reasons"][flipped.path]
    assert stats["skipped_samples"] >= 1 and stats["replaced_samples"] == stats["skipped_samples"]
    # The CLI's verify finds both.
    rep = CacheReader(root).verify_all()
    assert sorted(p for p, _ in rep["bad"]) == sorted([flipped.path, truncated.path])


def test_a_lost_bucket_is_left_out_when_planning_and_nothing_trainable_is_refused_at_once(cache, caplog):
    """Every shard of one bucket deleted: the plan leaves them out (one stat call each), the bucket drops out
    with a warning, training goes on with the other; with every shard gone, check_trainable refuses."""
    root, data = cache
    wide = [s for s in CacheReader(root).shards() if s.bucket == (336, 192)]
    assert len(wide) == 4
    for s in wide:
        os.remove(os.path.join(root, s.path))
    with caplog.at_level(logging.WARNING, logger="megatron_qwen_image.cache.loader"):
        with BucketedLoader(root, 8, seed=1) as loader:
            loader.check_trainable()
            batches = take(loader, 10)  # two epochs of the square bucket (5 batches each)
            stats = loader.stats
    assert {tuple(b["latents"].shape[2:]) for b in batches} == {(32, 32)}
    for b in batches:
        check_batch_against_source(b, data)
    assert (stats["unreadable_shards"], stats["unreadable_samples"], stats["skipped_samples"]) == (4, 24, 0)
    assert all("missing (the manifest lists it)" in why for why in stats["unreadable_shard_reasons"].values())
    text = caplog.text
    assert "4 of 8 shards of manifest entries 0..3 are unreadable and left out of the plan" in text
    assert text.count("bucket 336x192") == 1 and "has no readable shard" in text  # warned once, not per epoch

    for s in CacheReader(root).shards():
        if s.bucket == (256, 256):
            os.remove(os.path.join(root, s.path))
    with BucketedLoader(root, 8) as loader:
        with pytest.raises(NoTrainableDataError, match=r"no bucket of .* has global_batch_size=8 readable samples "
                                                       r"\(first 4 manifest entries\): no samples at all; 8 shards "
                                                       r"are unreadable"):
            loader.check_trainable()


def test_a_waiting_stream_says_what_it_waits_for_every_interval(tmp_path, caplog):
    """A streaming loader short of samples logs, every wait_log_interval_s, the committed shards and samples,
    what its round still needs, and how long it has waited."""
    root = str(tmp_path / "stream")
    write_unit(root, 0, n_sq=2, n_wide=1)
    loader = BucketedLoader(root, 4, streaming=True, prefetch=0, stream_round_samples=8, poll_interval_s=0.05,
                            wait_log_interval_s=0.2, stream_timeout_s=1.5)
    loader.check_trainable()  # an open stream waits for producers instead of refusing
    with caplog.at_level(logging.INFO, logger="megatron_qwen_image.cache.loader"), \
            pytest.raises(TimeoutError, match="are producers running"):
        next(loader)
    lines = [r.getMessage() for r in caplog.records if "waiting for producers" in r.getMessage()]
    assert len(lines) >= 2, caplog.text
    assert all(re.fullmatch(rf"waiting for producers: 2 shards \(3 samples\) committed to {re.escape(root)} so far; "
                            r"round 0 has 3 of the 8 new samples it takes, and 2 of global_batch_size=4 in its "
                            r"fullest bucket; waited \d+ s", line) for line in lines), lines
    assert loader.stats["wait_s"] >= 1.0


def _file_offset_of_row(sf, row):
    """Where row `row`'s latent bytes start in the shard file (found by content)."""
    blob = open(sf.path, "rb").read()
    return blob.index(sf.batches[0].lat_np[row].tobytes()[:256])


def _records_before_truncation(blob, info):
    import pyarrow as pa
    table = pa.ipc.open_file(pa.py_buffer(blob)).read_all()
    return [{"key": k} for k in table.column("key").to_pylist()]


def test_unknown_version_is_refused_by_the_loader(cache):
    root, _ = cache
    p = os.path.join(root, "CACHE.json")
    info = json.load(open(p))
    json.dump({**info, "format_version": 7}, open(p, "w"))
    with pytest.raises(CacheFormatError, match="format_version 7 is not supported"):
        BucketedLoader(root, 8)


def test_bad_loader_arguments_name_the_parameter(cache):
    root, _ = cache
    with pytest.raises(ValueError, match="not divisible by dp_size=3"):
        BucketedLoader(root, 8, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match="dp_rank=2"):
        BucketedLoader(root, 8, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="verify"):
        BucketedLoader(root, 8, verify="sometimes")
    with BucketedLoader(root, 64) as ld:  # no bucket holds 64 samples
        with pytest.raises(ValueError, match="no bucket"):
            next(ld)


def test_filters_and_output_dtype(cache):
    root, data = cache
    with BucketedLoader(root, 4, buckets=["336x192"], output_dtype=None) as ld:
        b = next(ld)
        assert b["latents"].shape[2:] == (24, 42) and b["latents"].dtype == torch.bfloat16
        assert torch.equal(b["latents"][0], data[b["keys"][0]][0])
    with BucketedLoader(root, 4, base_resolution=640) as ld:
        with pytest.raises(ValueError, match="no bucket"):
            next(ld)


def test_batches_held_by_the_caller_are_never_overwritten_and_released_ones_are_reused(cache):
    root, data = cache
    with BucketedLoader(root, 8, seed=4, prefetch=2) as ld:
        kept = next(ld)
        snapshot = {k: kept[k].clone() for k in ("latents", "text_embeds", "text_mask")}
        view = next(ld)["latents"][0]  # a view keeps its batch's buffer alive too
        view_copy = view.clone()
        ptrs = set()
        for _ in range(12):
            b = next(ld)
            ptrs.add(b["latents"].data_ptr())
            del b
        for k, v in snapshot.items():
            assert torch.equal(kept[k], v)
        assert torch.equal(view, view_copy)
        assert kept["latents"].data_ptr() not in ptrs and view.data_ptr() not in ptrs
        assert len(ptrs) < 12  # released buffers came back
        check_batch_against_source(kept, data)
