"""Cache format version 2: condition latents per sample (image editing), and version-1 caches still read."""
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from megatron_qwen_image.cache import BucketedLoader, CacheReader, CacheWriter, CorruptShardError, collate
from megatron_qwen_image.cache.__main__ import main
from megatron_qwen_image.cache.format import FORMAT_NAME, sample_crc, work_unit_id
from megatron_qwen_image.cache.maintenance import inspect_cache
from megatron_qwen_image.cache.manifest import compact

T2I_HW, WIDE_HW = (32, 32), (24, 42)   # latents of buckets 256x256 and 336x192 (base 256)
COND_A, COND_B, COND_C = (16, 8, 6), (16, 6, 8), (16, 4, 4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


def _sample(key, hw, cond_shapes, g, text_len=3):
    return {"key": key, "latent": torch.randn(16, *hw, generator=g), "text": torch.randn(text_len, 8, generator=g),
            "conds": [torch.randn(*shape, generator=g) for shape in cond_shapes]}


def _mixed_samples():
    """T2I and TI2I samples: in bucket 256x256 none, one condition of size A, one of size B; in 336x192 two
    conditions (A, C) and none."""
    g = torch.Generator().manual_seed(0)
    groups = [(T2I_HW, ()), (T2I_HW, (COND_A,)), (T2I_HW, (COND_B,)), (WIDE_HW, (COND_A, COND_C)), (WIDE_HW, ())]
    return [_sample(f"k{i}-{j}", hw, conds, g, text_len=1 + (i + j) % 4)
            for j in range(3) for i, (hw, conds) in enumerate(groups)]  # interleaved: the writer must route them


def _write(root, samples, unit="u", dtype="bf16", **kw):
    with CacheWriter(root, unit, latent_dtype=dtype, base_resolution=256, **kw) as w:
        for s in samples:
            w.add(s["key"], s["latent"], s["text"], caption=f"edit {s['key']}", cond_latents=s["conds"] or None)
    return w


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_t2i_and_ti2i_samples_round_trip_bit_exactly(tmp_path, dtype):
    root = str(tmp_path)
    samples = _mixed_samples()
    _write(root, samples, dtype=dtype, flush_bytes=4_000)  # several record batches per shard
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    reader = CacheReader(root)
    by_key = {s["key"]: s for s in samples}
    seen = set()
    for info in reader.shards():
        sf = reader.open(info)
        for i in range(sf.num_samples):
            key, lat, txt = sf.sample(i)
            conds, rec = sf.conditions(i), sf.record(i)
            want = by_key[key]
            seen.add(key)
            assert torch.equal(_bits(lat), _bits(want["latent"].to(dt))) and lat.dtype == dt
            assert torch.equal(_bits(txt), _bits(want["text"].bfloat16()))
            assert [tuple(c.shape) for c in conds] == [tuple(c.shape) for c in want["conds"]] == list(info.cond_shapes)
            for got, c, copy in zip(conds, want["conds"], rec["cond_latents"], strict=True):
                assert got.dtype == dt and torch.equal(_bits(got), _bits(c.to(dt)))
                assert torch.equal(copy, got) and copy.data_ptr() != got.data_ptr()  # record() copies
            assert rec["key"] == key and torch.equal(rec["latent"], lat) and rec["caption"] == f"edit {key}"
    assert seen == set(by_key)
    assert reader.verify_all()["bad"] == []


def test_condition_views_are_zero_copy(tmp_path):
    g = torch.Generator().manual_seed(1)
    _write(str(tmp_path), [_sample(f"k{i}", WIDE_HW, (COND_A, COND_C), g) for i in range(3)])
    reader = CacheReader(str(tmp_path))
    sf = reader.open(reader.shards()[0])
    (a0, c0), (a1, _) = sf.conditions(0), sf.conditions(1)
    # One contiguous buffer: a row's images are adjacent, and so are consecutive rows.
    assert c0.data_ptr() - a0.data_ptr() == a0.numel() * a0.element_size()
    assert a1.data_ptr() - a0.data_ptr() == (a0.numel() + c0.numel()) * a0.element_size()
    assert sf.conditions(0)[0].data_ptr() == a0.data_ptr()  # views of the mapped file, not copies


def test_manifest_cond_shapes_and_one_shard_series_per_group(tmp_path):
    root = str(tmp_path)
    w = _write(root, _mixed_samples())
    entry = json.load(open(tmp_path / "manifest" / "000000000000.json"))
    assert entry["format_version"] == 2 and json.load(open(tmp_path / "CACHE.json"))["format_version"] == 2
    groups = {(s["bucket"], tuple(map(tuple, s.get("cond_shapes", [])))): s for s in entry["shards"]}
    assert set(groups) == {("256x256", ()), ("256x256", (COND_A,)), ("256x256", (COND_B,)),
                           ("336x192", (COND_A, COND_C)), ("336x192", ())}
    assert all(s["num_samples"] == 3 for s in entry["shards"])
    assert "cond_shapes" not in groups["256x256", ()]  # written only when there are conditions
    stem = f"wu-{work_unit_id('u')}.{w.attempt}"
    assert groups["256x256", ()]["path"] == f"bucket=256x256/{stem}.0000.arrow"  # version 1's name
    assert groups["256x256", (COND_A,)]["path"] == f"bucket=256x256/{stem}.cond16x8x6.0000.arrow"
    assert groups["256x256", (COND_B,)]["path"] == f"bucket=256x256/{stem}.cond16x6x8.0000.arrow"
    assert groups["336x192", (COND_A, COND_C)]["path"] == f"bucket=336x192/{stem}.cond16x8x6-16x4x4.0000.arrow"
    for s in entry["shards"]:  # the shard's own schema says the same
        schema = pa.ipc.open_file(pa.memory_map(os.path.join(root, s["path"]))).schema
        md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
        assert md["format_version"] == "2"
        assert md.get("cond_shapes", "") == ";".join(",".join(map(str, c)) for c in s.get("cond_shapes", []))
        assert ("cond_latent" in schema.names) == ("cond_shapes" in s)

    reader = CacheReader(root)
    assert {(i.bucket, i.cond_shapes) for i in reader.shards()} == {
        ((256, 256), ()), ((256, 256), (COND_A,)), ((256, 256), (COND_B,)), ((336, 192), ()),
        ((336, 192), (COND_A, COND_C))}
    buckets = reader.buckets()
    assert buckets[256, 256]["samples"] == 9
    assert {c: g["samples"] for c, g in buckets[256, 256]["groups"].items()} == {(): 3, (COND_A,): 3, (COND_B,): 3}
    # A manifest snapshot keeps the condition shapes.
    compact(root)
    assert CacheReader(root).log.from_snapshot == 1 and CacheReader(root).shards() == reader.shards()


def test_inspect_and_verify_show_condition_groups(tmp_path, capsys):
    root = str(tmp_path)
    _write(root, _mixed_samples())
    info = inspect_cache(root)
    assert info["buckets"]["256x256"]["samples"] == 3 and "cond_shapes" not in info["buckets"]["256x256"]
    assert info["buckets"]["336x192 +cond 16x8x6+16x4x4"]["cond_shapes"] == [[16, 8, 6], [16, 4, 4]]
    assert main(["inspect", root]) == 0
    out = capsys.readouterr().out
    assert "256x256 +cond 16x6x8" in out and "336x192 +cond 16x8x6+16x4x4" in out
    assert main(["verify", root, "--quiet"]) == 0
    assert "5 shards OK (15 samples), 0 bad" in capsys.readouterr().out


def _flip_byte_of(path: str, blob: bytes) -> None:
    """Flip one bit in the middle of `blob` where it lies in the file (same size: only the CRCs notice)."""
    data = bytearray(open(path, "rb").read())
    at = data.find(blob)
    assert at >= 0 and data.find(blob, at + 1) < 0
    data[at + len(blob) // 2] ^= 0x01
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)  # shard files are replaced, never rewritten in place


def test_a_corrupted_condition_latent_byte_fails_the_rows_crc(tmp_path, capsys):
    root = str(tmp_path)
    g = torch.Generator().manual_seed(2)
    samples = [_sample(f"k{i}", T2I_HW, (COND_A, COND_C), g) for i in range(2)]
    _write(root, samples)
    info = CacheReader(root).shards()[0]
    stored = samples[1]["conds"][1].bfloat16().view(torch.int16).numpy().tobytes()  # row 1's second image
    _flip_byte_of(os.path.join(root, info.path), stored)
    sf = CacheReader(root).open(info)  # the open-time checks pass: same size, same structure
    assert sf.sample(0)[0] == "k0"  # the other row is intact
    with pytest.raises(CorruptShardError, match="row 1 .* fails its CRC-32"):
        sf.conditions(1)
    with pytest.raises(CorruptShardError, match="row 1"):
        sf.sample(1)  # the row's one checksum covers its conditions: sample() refuses it too
    assert main(["verify", root, "--quiet"]) == 1
    # The checksum's definition: key, latent, condition latents (one buffer), text.
    lat, txt = np.arange(12, dtype=np.int16), np.ones((2, 3), np.int16)
    cond = np.arange(8, dtype=np.int16)
    want = zlib.crc32(txt.tobytes(), zlib.crc32(cond.tobytes(), zlib.crc32(lat.tobytes(), zlib.crc32(b"k"))))
    assert sample_crc("k", lat, txt, cond) == want


def test_the_manifests_cond_shapes_are_checked_against_the_shard(tmp_path):
    root = str(tmp_path)
    g = torch.Generator().manual_seed(3)
    _write(root, [_sample("k", T2I_HW, (COND_A,), g)])
    path = tmp_path / "manifest" / "000000000000.json"
    entry = json.load(open(path))
    for claimed in ([[16, 6, 8]], None):  # other shapes, and no conditions at all
        shard = {k: v for k, v in entry["shards"][0].items() if k != "cond_shapes"}
        json.dump({**entry, "shards": [{**shard, **({"cond_shapes": claimed} if claimed else {})}]}, open(path, "w"))
        reader = CacheReader(root)
        with pytest.raises(CorruptShardError, match="cond_shapes"):
            reader.open(reader.shards()[0])


@pytest.mark.parametrize("conds, message", [
    (torch.zeros(16, 8, 8), "must be a list of torch.Tensor"),
    ([torch.zeros(16, 8)], r"cond_latents\[0\] for 'k' must be a torch.Tensor \[C, h, w\]"),
    ([torch.zeros(16, 8, 8), np.zeros((16, 8, 8))], r"cond_latents\[1\] for 'k' must be a torch.Tensor"),
    ([torch.zeros(4, 8, 8)], r"cond_latents\[0\] for 'k' has 4 channels; its latent has 16"),
    ([torch.zeros(16, 0, 8)], r"cond_latents\[0\] for 'k' must be"),
])
def test_bad_condition_input_is_refused_with_a_clear_error(tmp_path, conds, message):
    w = CacheWriter(str(tmp_path), "u")
    with pytest.raises(ValueError, match=message):
        w.add("k", torch.zeros(16, *T2I_HW), torch.zeros(2, 8), cond_latents=conds)
    w.add("k", torch.zeros(16, *T2I_HW), torch.zeros(2, 8), cond_latents=[])  # empty: text-to-image
    assert w.commit()["shards"][0].get("cond_shapes") is None


def _item(x, conds=None):
    """A sample as collate takes it: (key, latent, text), or with conditions (key, latent, text, conds)."""
    return (x["key"], x["latent"], x["text"]) if conds is None else (x["key"], x["latent"], x["text"], conds)


def test_collate_groups_conditions_and_refuses_mixed_shapes():
    g = torch.Generator().manual_seed(4)
    s = [_sample(f"k{i}", T2I_HW, (COND_A, COND_C), g, text_len=i + 1) for i in range(3)]
    batch = collate([(x["key"], x["latent"].bfloat16(), x["text"], [c.bfloat16() for c in x["conds"]]) for x in s])
    assert batch["task"] == "ti2i" and len(batch["cond_latents"]) == 2
    for k, shape in enumerate((COND_A, COND_C)):
        out = batch["cond_latents"][k]
        assert out.shape == (3, *shape) and out.dtype == torch.float32
        assert torch.equal(out, torch.stack([x["conds"][k].bfloat16().float() for x in s]))
    t2i = collate([_item(s[0]), _item(s[1]), _item(s[2], ())])  # no conditions, said either way
    assert t2i["task"] == "t2i" and t2i["cond_latents"] == [] and t2i["keys"] == ["k0", "k1", "k2"]
    with pytest.raises(ValueError, match=r"sample 'k1': condition latents \[\] differ from"):
        collate([_item(s[0], s[0]["conds"]), _item(s[1])])
    with pytest.raises(ValueError, match="condition latents .* differ .* one condition group"):
        collate([_item(s[0], s[0]["conds"]), _item(s[1], s[1]["conds"][:1])])  # another number of images
    with pytest.raises(ValueError, match="differ"):
        collate([_item(s[0], s[0]["conds"][:1]), _item(s[1], [torch.zeros(*COND_B)])])  # another size


def test_the_loader_carries_condition_latents_into_its_batches(tmp_path):
    root = str(tmp_path)
    g = torch.Generator().manual_seed(5)
    samples = [_sample(f"k{i}", T2I_HW, (COND_A,), g) for i in range(4)]
    _write(root, samples)
    loader = BucketedLoader(root, global_batch_size=2, prefetch=0)
    by_key = {s["key"]: s for s in samples}
    for _ in range(2):
        batch = next(loader)
        assert batch["task"] == "ti2i" and batch["cond_latents"][0].shape == (2, *COND_A)
        want = torch.stack([by_key[k]["conds"][0].bfloat16().float() for k in batch["keys"]])
        assert torch.equal(batch["cond_latents"][0], want)


def _write_v1_cache(root: str, samples: list[dict], unit: str = "v1-unit") -> None:
    """A version-1 cache as the version-1 code wrote it (independent of the writer here): CACHE.json, one bf16
    shard of bucket 256x256 whose rows carry version 1's CRC, its manifest entry and hint."""
    for d in ("manifest", "workunits", "bucket=256x256"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    json.dump({"format": FORMAT_NAME, "format_version": 1, "created_unix": 0.0},
              open(os.path.join(root, "CACHE.json"), "w"))
    wuid = work_unit_id(unit)
    bits = [(s["key"], s["latent"].bfloat16().view(torch.int16).numpy(), s["text"].bfloat16().view(torch.int16).numpy())
            for s in samples]
    item = pa.field("item", pa.uint16(), nullable=False)
    schema = pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field("latent", pa.list_(item, 16 * 32 * 32), nullable=False),
        pa.field("text_embed", pa.large_list(item), nullable=False), pa.field("text_len", pa.int32(), nullable=False),
        pa.field("caption", pa.large_string(), nullable=False), pa.field("source", pa.string(), nullable=False),
        pa.field("meta", pa.large_string(), nullable=False), pa.field("crc32", pa.uint32(), nullable=False),
    ], metadata={"format": FORMAT_NAME, "format_version": "1", "latent_dtype": "bf16", "latent_shape": "16,32,32",
                 "text_dtype": "bf16", "text_dim": "8", "bucket": "256x256", "work_unit": unit,
                 "base_resolution": "256"})
    lens = np.array([t.shape[0] for _, _, t in bits], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens.astype(np.int64) * 8)])
    latents = np.concatenate([lat.reshape(-1) for _, lat, _ in bits]).view(np.uint16)
    texts = np.concatenate([t.reshape(-1) for _, _, t in bits]).view(np.uint16)
    batch = pa.RecordBatch.from_arrays([
        pa.array([k for k, _, _ in bits], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(latents), 16 * 32 * 32),
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(texts)),
        pa.array(lens), pa.array(["v1"] * len(bits), pa.large_string()), pa.array([""] * len(bits), pa.string()),
        pa.array(["{}"] * len(bits), pa.large_string()),
        pa.array([zlib.crc32(t.tobytes(), zlib.crc32(lat.tobytes(), zlib.crc32(k.encode()))) for k, lat, t in bits],
                 pa.uint32()),
    ], schema=schema)
    rel = f"bucket=256x256/wu-{wuid}.0badf00d.0000.arrow"
    with pa.OSFile(os.path.join(root, rel), "wb") as f:
        with pa.ipc.new_file(f, schema) as writer:
            writer.write_batch(batch)
    blob = open(os.path.join(root, rel), "rb").read()
    shard = {"path": rel, "bucket": "256x256", "num_samples": len(bits), "bytes": len(blob), "crc32": zlib.crc32(blob),
             "latent_shape": [16, 32, 32], "latent_dtype": "bf16", "text_dim": 8, "text_dtype": "bf16"}
    json.dump({"format_version": 1, "work_unit": unit, "work_unit_id": wuid, "attempt": "0badf00d",
               "base_resolution": 256, "num_samples": len(bits), "created_unix": 0.0, "host": "h", "pid": 1,
               "shards": [shard]}, open(os.path.join(root, "manifest", "000000000000.json"), "w"))
    json.dump({"work_unit": unit, "seq": 0, "host": "h"}, open(os.path.join(root, "workunits", f"{wuid}.json"), "w"))


def test_a_version_1_cache_still_reads_and_takes_version_2_commits(tmp_path, capsys):
    root = str(tmp_path)
    g = torch.Generator().manual_seed(6)
    old = [_sample(f"v1-{i}", T2I_HW, (), g, text_len=1 + i) for i in range(4)]
    _write_v1_cache(root, old)
    reader = CacheReader(root)
    assert reader.log.info["format_version"] == 1 and reader.shards()[0].cond_shapes == ()
    records = list(reader.iter_records())
    assert [r["key"] for r in records] == [s["key"] for s in old]
    for r, s in zip(records, old):
        assert torch.equal(_bits(r["latent"]), _bits(s["latent"].bfloat16())) and r["cond_latents"] == []
        assert torch.equal(_bits(r["text_embed"]), _bits(s["text"].bfloat16()))
    assert reader.open(reader.shards()[0]).conditions(0) == ()
    assert main(["verify", root, "--quiet"]) == 0
    assert "1 shards OK (4 samples), 0 bad" in capsys.readouterr().out
    batch = next(BucketedLoader(root, global_batch_size=4, prefetch=0))
    assert batch["task"] == "t2i" and batch["cond_latents"] == [] and sorted(batch["keys"]) == [s["key"] for s in old]
    # A writer of this code adds version-2 entries (with conditions) to the version-1 cache; both read.
    _write(root, [_sample("v2-0", T2I_HW, (COND_A,), g)], unit="v2-unit")
    reader = CacheReader(root)
    assert [json.load(open(tmp_path / "manifest" / f"{i:012d}.json"))["format_version"] for i in (0, 1)] == [1, 2]
    assert reader.log.info["format_version"] == 1  # CACHE.json is written once, by the cache's creator
    assert sorted(r["key"] for r in reader.iter_records()) == ["v1-0", "v1-1", "v1-2", "v1-3", "v2-0"]
    assert reader.verify_all()["bad"] == []
