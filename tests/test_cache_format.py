"""Cache format: bit-exact round trip, routing, rollover, idempotence, version refusal, bad input."""
import json
import os

import pyarrow as pa
import pytest
import torch

from megatron_qwen_image.cache import (CacheFormatError, CacheReader, CacheSealedError, CacheWriter, seal)
from megatron_qwen_image.cache.format import storage_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


def _samples(n, seed=0, text_dim=64, hw=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lat = torch.randn(16, *hw, generator=g) * 3
        lat.view(-1)[:4] = torch.tensor([float("inf"), -0.0, 65504.0, 1e-30])  # edge values survive
        out.append({"key": f"s{seed}-{i:04d}", "latent": lat,
                    "text": torch.randn(1 + (i * 7) % 23, text_dim, generator=g),
                    "caption": f"a photo № {i} — 漢字", "source": "unit-test",
                    "meta": {"orig_size": [640 + i, 480], "clip": 0.25 * i}})
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    samples = _samples(12) + _samples(3, seed=1, hw=(24, 42))  # two buckets: 256x256 and 336x192
    with CacheWriter(str(tmp_path), "unit-0", latent_dtype=dtype, text_dtype=dtype, base_resolution=256,
                     flush_bytes=100_000) as w:  # several record batches per shard
        for s in samples:
            w.add(s["key"], s["latent"], s["text"], s["caption"], s["source"], s["meta"])
    reader = CacheReader(str(tmp_path))
    assert set(reader.buckets()) == {(256, 256), (336, 192)}
    got = {r["key"]: r for r in reader.iter_records()}
    assert len(got) == len(samples)
    dt = DTYPES[dtype]
    for s in samples:
        r = got[s["key"]]
        assert r["latent"].dtype == dt and r["text_embed"].dtype == dt
        assert torch.equal(_bits(r["latent"]), _bits(s["latent"].to(dt)))
        assert torch.equal(_bits(r["text_embed"]), _bits(s["text"].to(dt)))  # unpadded: exact length
        assert r["text_len"] == s["text"].shape[0]
        assert (r["caption"], r["source"], r["meta"]) == (s["caption"], s["source"], s["meta"])
    assert reader.verify_all()["bad"] == []


def test_zero_copy_views_share_the_memory_map(tmp_path):
    with CacheWriter(str(tmp_path), "u", latent_dtype="bf16") as w:
        for s in _samples(4):
            w.add(s["key"], s["latent"], s["text"])
    reader = CacheReader(str(tmp_path))
    sf = reader.open(reader.shards()[0])
    _, a, t = sf.sample(1)
    _, b, _ = sf.sample(2)
    # Consecutive rows are adjacent slices of one buffer: no per-sample copy was made.
    assert b.data_ptr() - a.data_ptr() == a.numel() * a.element_size()
    assert t.dtype == torch.bfloat16 and t.shape[1] == 64


def test_shards_roll_over_and_manifest_counts_match(tmp_path):
    samples = _samples(20)
    with CacheWriter(str(tmp_path), "u", max_shard_bytes=150_000, flush_bytes=40_000) as w:
        for s in samples:
            w.add(s["key"], s["latent"], s["text"])
    entry = json.load(open(tmp_path / "manifest" / "000000000000.json"))
    assert len(entry["shards"]) > 1
    assert sum(s["num_samples"] for s in entry["shards"]) == 20 == entry["num_samples"]
    for s in entry["shards"]:
        assert os.path.getsize(tmp_path / s["path"]) == s["bytes"]
    assert [r["key"] for r in CacheReader(str(tmp_path)).iter_records()] == [s["key"] for s in samples]


def test_rerun_of_a_committed_work_unit_is_a_no_op(tmp_path):
    for attempt in range(2):
        with CacheWriter(str(tmp_path), "unit-7") as w:
            assert w.already_committed == (attempt == 1)
            for s in _samples(5):
                w.add(s["key"], s["latent"], s["text"])
    assert CacheWriter.is_committed(str(tmp_path), "unit-7")
    assert not CacheWriter.is_committed(str(tmp_path), "unit-8")
    assert CacheReader(str(tmp_path)).num_samples() == 5
    assert len(os.listdir(tmp_path / "manifest")) == 1


def test_duplicate_entry_of_a_work_unit_is_ignored_by_readers(tmp_path):
    """Two attempts that both reach the log (crash between entry and hint): the first entry wins."""
    root = str(tmp_path)
    with CacheWriter(root, "unit-1") as w:
        for s in _samples(3):
            w.add(s["key"], s["latent"], s["text"])
    os.unlink(tmp_path / "workunits" / os.listdir(tmp_path / "workunits")[0])  # simulate the lost hint
    with CacheWriter(root, "unit-1") as w:
        assert not w.already_committed
        for s in _samples(4, seed=5):
            w.add(s["key"], s["latent"], s["text"])
    reader = CacheReader(root)
    assert [e.duplicate for e in reader.log.entries] == [False, True]
    assert sorted(r["key"] for r in reader.iter_records()) == [f"s0-{i:04d}" for i in range(3)]


def _shard_files(root) -> set[str]:
    return {f"{d}/{f}" for d in os.listdir(root) if d.startswith("bucket=") for f in os.listdir(os.path.join(root, d))}


def test_a_writer_that_finds_the_unit_committed_discards_its_attempt(tmp_path):
    """Two producers on one work unit: the second to commit sees the first's hint, deletes its temp files and
    ends `already_committed` (committed elsewhere), returning the first's entry."""
    root = str(tmp_path)
    first, second = CacheWriter(root, "unit-1"), CacheWriter(root, "unit-1")
    for w, seed in ((first, 0), (second, 1)):
        for s in _samples(3, seed=seed):
            w.add(s["key"], s["latent"], s["text"])
    entry = first.commit()
    files = _shard_files(root)
    assert second.commit()["seq"] == entry["seq"] == 0
    assert second.already_committed and not first.already_committed
    assert os.listdir(tmp_path / "_tmp") == [] and _shard_files(root) == files
    assert sorted(r["key"] for r in CacheReader(root).iter_records()) == [f"s0-{i:04d}" for i in range(3)]


def test_a_writer_whose_entry_is_a_duplicate_deletes_only_its_own_files(tmp_path, monkeypatch):
    """Both writers pass the committed check and reach the log. The first writer is slow to write its hint;
    the second finds the first's entry among those appended since it looked, names it in the hint and
    deletes the shard files it had renamed into place, and no other file."""
    from megatron_qwen_image.cache import manifest

    root = str(tmp_path)
    first, second = CacheWriter(root, "unit-1"), CacheWriter(root, "unit-1")
    for w, seed in ((first, 0), (second, 1)):
        for s in _samples(3, seed=seed):
            w.add(s["key"], s["latent"], s["text"])
    real_hint, real_check = manifest.write_workunit_hint, CacheWriter.is_committed
    late_hints = []

    def first_commits_meanwhile(root_, unit):  # between the second's look at the log and its own append
        monkeypatch.setattr(CacheWriter, "is_committed", staticmethod(real_check))
        monkeypatch.setattr(manifest, "write_workunit_hint", lambda *a: late_hints.append(a) or a[3])
        first.commit()
        monkeypatch.setattr(manifest, "write_workunit_hint", real_hint)
        return real_check(root_, unit)  # no hint yet: not committed as far as the second can tell

    monkeypatch.setattr(CacheWriter, "is_committed", staticmethod(first_commits_meanwhile))
    assert second.commit()["seq"] == 0 and second.already_committed
    first_files = {s["path"] for s in manifest.committed_entry(root, second.wuid)["shards"]}
    assert real_hint(*late_hints[0]) == 0  # the first writer's hint, late: it names the first entry
    assert manifest.hinted_seq(root, second.wuid) == 0
    reader = CacheReader(root)
    assert [e.duplicate for e in reader.log.entries] == [False, True]
    assert _shard_files(root) == first_files  # the duplicate's files are gone, the first's are all there
    assert sorted(r["key"] for r in reader.iter_records()) == [f"s0-{i:04d}" for i in range(3)]
    assert reader.verify_all()["bad"] == []
    # A hint that names a later (duplicate) entry is replaced by one naming the earlier entry.
    assert real_hint(root, second.wuid, "unit-1", 5) == 0
    os.unlink(manifest.workunit_hint_path(root, second.wuid))
    assert real_hint(root, second.wuid, "unit-1", 1) == 1 and real_hint(root, second.wuid, "unit-1", 0) == 0
    assert manifest.hinted_seq(root, second.wuid) == 0


def test_commit_records_the_input_and_the_version_it_supersedes(tmp_path):
    from megatron_qwen_image.cache.manifest import committed_entry

    root = str(tmp_path)
    with CacheWriter(root, "unit-1") as w:
        w.add("a", *[_samples(1)[0][k] for k in ("latent", "text")])
    w = CacheWriter(root, "unit-1#2")
    w.add("a", *[_samples(1)[0][k] for k in ("latent", "text")])
    w.commit(input_fingerprint={"files": 1, "bytes": 10, "mtime_ns": 7}, supersedes="unit-1")
    entry = committed_entry(root, w.wuid)
    assert entry["input"] == {"files": 1, "bytes": 10, "mtime_ns": 7}
    assert (entry["supersedes"], entry["seq"]) == ("unit-1", 1)
    assert [e.supersedes for e in CacheReader(root).log.entries] == [None, "unit-1"]
    assert "input" not in committed_entry(root, CacheWriter(root, "unit-1").wuid)  # optional fields


def test_an_exception_inside_the_writer_discards_the_attempt(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with CacheWriter(str(tmp_path), "u") as w:
            for s in _samples(3):
                w.add(s["key"], s["latent"], s["text"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "_tmp") == [] and os.listdir(tmp_path / "manifest") == []
    assert not CacheWriter.is_committed(str(tmp_path), "u")


def test_bad_samples_are_refused_with_clear_messages(tmp_path):
    w = CacheWriter(str(tmp_path), "u", base_resolution=640)
    s = _samples(1)[0]
    with pytest.raises(ValueError, match="not a bucket of base resolution 640"):
        w.add("a", s["latent"], s["text"])  # 256x256 latent into a 640 stage
    lat = torch.zeros(16, 80, 80)
    with pytest.raises(ValueError, match="unpadded"):
        w.add("a", lat, torch.zeros(0, 64))
    w.add("a", lat, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="duplicate key"):
        w.add("a", lat, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="64 wide|wide"):
        w.add("b", lat, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="JSON"):
        w.add("c", lat, torch.zeros(3, 64), meta={"x": object()})
    with pytest.raises(ValueError, match="dtype"):
        CacheWriter(str(tmp_path), "v", latent_dtype="int8")
    w.abort()


def test_sealed_cache_refuses_commits(tmp_path):
    with CacheWriter(str(tmp_path), "u") as w:
        w.add("a", torch.zeros(16, 32, 32), torch.zeros(3, 64))
    assert seal(str(tmp_path)) == 1
    w = CacheWriter(str(tmp_path), "v")
    w.add("b", torch.zeros(16, 32, 32), torch.zeros(3, 64))
    with pytest.raises(CacheSealedError):
        w.commit()
    assert os.listdir(tmp_path / "_tmp") == []


def _write_small(root):
    with CacheWriter(root, "u") as w:
        w.add("a", torch.zeros(16, 32, 32), torch.zeros(3, 64))


def test_unknown_format_versions_are_refused(tmp_path):
    root = str(tmp_path / "c")
    _write_small(root)
    # 1. The cache marker.
    cache_json = os.path.join(root, "CACHE.json")
    good = open(cache_json).read()
    json.dump({**json.loads(good), "format_version": 99}, open(cache_json, "w"))
    with pytest.raises(CacheFormatError, match="format_version 99 is not supported"):
        CacheReader(root)
    with pytest.raises(CacheFormatError, match="format_version 99"):
        CacheWriter(root, "w2")
    open(cache_json, "w").write(good)
    # 2. A manifest entry.
    entry = os.path.join(root, "manifest", "000000000000.json")
    e = json.load(open(entry))
    json.dump({**e, "format_version": 99}, open(entry, "w"))
    with pytest.raises(CacheFormatError, match="000000000000.json.*format_version 99"):
        CacheReader(root)
    json.dump(e, open(entry, "w"))
    # 3. A shard's own schema metadata (rewritten with version 3, manifest size fixed up).
    path = os.path.join(root, e["shards"][0]["path"])
    table = pa.ipc.open_file(pa.OSFile(path)).read_all()  # in memory: shard files are never rewritten in place
    md = dict(table.schema.metadata)
    md[b"format_version"] = b"3"
    table = table.replace_schema_metadata(md)
    with pa.OSFile(path + ".new", "wb") as f:
        wr = pa.ipc.new_file(f, table.schema)
        wr.write_table(table)
        wr.close()
    os.replace(path + ".new", path)
    e["shards"][0]["bytes"] = os.path.getsize(path)
    json.dump(e, open(entry, "w"))
    reader = CacheReader(root)
    with pytest.raises(CacheFormatError, match="format_version '3'"):
        reader.open(reader.shards()[0])


def test_storage_dtype_names():
    assert storage_dtype("bf16").torch == torch.bfloat16
    assert storage_dtype(torch.float16).name == "fp16"


def test_fast_crc32_gives_zlibs_values():
    """The format's checksum is zlib's CRC-32; the SIMD implementation must agree (it is optional)."""
    import zlib

    import numpy as np

    from megatron_qwen_image.cache.format import crc32, sample_crc

    blob = np.random.default_rng(0).bytes(1 << 20)
    assert crc32(blob) == zlib.crc32(blob)
    assert crc32(blob[100:], crc32(blob[:100])) == zlib.crc32(blob)
    lat, txt = np.arange(4096, dtype=np.int16), np.ones((3, 8), np.float32)
    expect = zlib.crc32(txt.tobytes(), zlib.crc32(lat.tobytes(), zlib.crc32("ключ".encode())))
    assert sample_crc("ключ", lat, txt) == expect
