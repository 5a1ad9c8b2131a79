"""Inputs as people have them: the layouts img2dataset and Hugging Face `datasets` write, detected without
flags, read through the CPU worker as a producer run reads them.

The `datasets` fixtures are written by `datasets` itself. img2dataset cannot be installed beside this
project (it pins webdataset 0.2 and pulls wandb and OpenCV), so its two layouts are written the way its
writer.py writes them: webdataset's TarWriter for `KEY.jpg/txt/json` members, pyarrow for the metadata
Parquet with its downloader's schema (failed rows included), and `NNNNN_stats.json`.
"""
import json
import os
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from producer.__main__ import main
from producer.config import load_config
from producer.sources import (BadRecord, InputError, RawSample, SourceOptions, discover_inputs, discover_shards,
                              iter_shard)
from producer.synthetic import generate_shards
from producer.workers import CpuWorker

# img2dataset's downloader schema (input columns url + caption, then what it adds), as in its downloader.py
I2D_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string())])


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(jpg bytes, caption) pairs that pass the default filters: the synthetic generator's."""
    [tar] = generate_shards(str(tmp_path_factory.mktemp("pictures")), num_shards=1, per_shard=8, seed=11,
                            languages=("en",))
    return [(r.image, r.caption.decode()) for r in iter_shard(discover_shards([tar])[0])]


def _i2d_meta(shard: int, i: int, caption: str, ok: bool) -> dict:
    return {"url": f"https://example.com/{shard}/{i}.jpg", "caption": caption, "key": f"{shard:05d}{i:04d}",
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404: Not Found", "width": 320 if ok else None,
            "height": 320 if ok else None, "original_width": 640 if ok else None,
            "original_height": 640 if ok else None, "sha256": f"{shard}{i:063d}" if ok else None}


def write_img2dataset_webdataset(out, pictures, shards=3):
    """img2dataset --output_format webdataset: per shard NNNNN.tar (successes), NNNNN.parquet (every row's
    metadata), NNNNN_stats.json. Sample i of each shard is one picture; its row 0 failed to download."""
    out.mkdir()
    for s in range(shards):
        rows = []
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as tw:
            for i, (jpg, caption) in enumerate(pictures[s * 2: s * 2 + 3]):
                meta = _i2d_meta(s, i, caption, ok=i > 0)
                rows.append(meta)
                if i > 0:
                    tw.write({"__key__": meta["key"], "jpg": jpg, "txt": caption, "json": json.dumps(meta, indent=4)})
        pq.write_table(pa.Table.from_pylist(rows, I2D_SCHEMA), out / f"{s:05d}.parquet")
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1}))
    return out


def test_img2dataset_webdataset_folder_reads_the_tars_and_their_metadata(pictures, tmp_path, tiny_dir):
    d = write_img2dataset_webdataset(tmp_path / "laion", pictures)
    [found] = discover_inputs([str(d)])
    assert found.layout == "img2dataset webdataset" and [s.kind for s in found.shards] == ["tar"] * 3
    assert [os.path.basename(s.sidecar) for s in found.shards] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert "3 *_stats.json (not inputs)" in found.line()
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny_dir}"])
    seen, drops, keys = 0, Counter(), []
    for spec in found.shards:
        for chunk in CpuWorker(cfg).process_shard(spec, chunk_size=4):
            seen += chunk.seen
            drops.update(chunk.drops)
            keys += [s.key for s in chunk.samples]
            assert all(s.meta["source_meta"]["status"] == "success" for s in chunk.samples)
    # The failed downloads are counted under their own reason; no Parquet file is taken for a broken shard.
    assert seen == 9 and dict(drops) == {"download_failed": 3}
    assert keys == ["000000001", "000000002", "000010001", "000010002", "000020001", "000020002"]


def test_img2dataset_sidecar_fills_what_a_member_json_lacks(pictures, tmp_path):
    d = write_img2dataset_webdataset(tmp_path / "laion", pictures, shards=1)
    with wds.TarWriter(str(d / "00000.tar")) as tw:  # the same tar without KEY.json members
        for i, (jpg, caption) in enumerate(pictures[1:3], 1):
            tw.write({"__key__": f"0000{i:05d}"[-9:], "jpg": jpg, "txt": caption})
    recs = list(iter_shard(discover_shards([str(d / "00000.tar")])[0]))
    bad = [r for r in recs if isinstance(r, BadRecord)]
    good = [r for r in recs if isinstance(r, RawSample)]
    assert [(b.key, b.reason) for b in bad] == [("000000000", "download_failed")]
    assert "HTTP Error 404" in bad[0].detail
    assert [g.meta["url"] for g in good] == ["https://example.com/0/1.jpg", "https://example.com/0/2.jpg"]


def test_the_metadata_parquet_of_a_tar_named_alone_is_refused_with_the_tar_to_pass(pictures, tmp_path):
    d = write_img2dataset_webdataset(tmp_path / "laion", pictures, shards=1)
    with pytest.raises(InputError, match=r"00000.parquet is img2dataset's metadata of .*00000.tar"):
        discover_inputs([str(d / "00000.parquet")])


def test_img2dataset_parquet_output_is_detected_and_its_failed_rows_counted(pictures, tmp_path, tiny_dir):
    rows = []
    for i, (jpg, caption) in enumerate(pictures[:5]):
        ok = i % 2 == 0
        rows.append({**_i2d_meta(0, i, caption, ok), "jpg": jpg if ok else None})
    d = tmp_path / "i2d_parquet"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, I2D_SCHEMA.append(pa.field("jpg", pa.binary()))), d / "00000.parquet")
    [found] = discover_inputs([str(d)])
    assert found.layout == "img2dataset parquet"
    assert "image column 'jpg', caption column 'caption', key column 'key', failed downloads from 'status'" in found.line()
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny_dir}"])
    [chunk] = CpuWorker(cfg).process_shard(found.shards[0], chunk_size=8)
    assert chunk.seen == 5 and dict(chunk.drops) == {"download_failed": 2}
    assert [s.key for s in chunk.samples] == ["000000000", "000000002", "000000004"]
    assert [s.caption for s in chunk.samples] == [pictures[i][1] for i in (0, 2, 4)]


@pytest.fixture
def hf_files(pictures, tmp_path):
    """A folder of jpgs plus one outside it, as a user has them before `datasets` sees them."""
    root = tmp_path / "hf"
    (root / "images").mkdir(parents=True)
    for i, (jpg, _) in enumerate(pictures[:4]):
        (root / "images" / f"{i}.jpg").write_bytes(jpg)
    (tmp_path / "elsewhere.jpg").write_bytes(pictures[4][0])
    return root


def test_datasets_parquet_with_image_paths_reads_the_files_inside_the_input_only(pictures, hf_files, tmp_path,
                                                                                  monkeypatch):
    root = hf_files
    monkeypatch.chdir(root)  # `datasets` keeps the paths as given: relative ones are relative to here
    images = ["images/0.jpg", "images/1.jpg", str(root / "images" / "2.jpg"), "images/missing.jpg",
              str(tmp_path / "elsewhere.jpg")]
    ds = datasets.Dataset.from_dict({"image": images, "text": [c for _, c in pictures[:5]],
                                     "label": list(range(5))}).cast_column("image", datasets.Image())
    (root / "images" / "missing.jpg").write_bytes(pictures[3][0])  # there when written, gone since
    ds.to_parquet(str(root / "train.parquet"))
    (root / "images" / "missing.jpg").unlink()
    assert pq.read_table(root / "train.parquet").column("image")[0].as_py() == {"bytes": None, "path": "images/0.jpg"}
    [found] = discover_inputs([str(root)])
    assert found.layout == "Hugging Face datasets parquet"
    assert "image column 'image', caption column 'text'" in found.line()
    recs = list(iter_shard(found.shards[0]))
    assert [type(r).__name__ for r in recs] == ["RawSample"] * 3 + ["BadRecord"] * 2
    assert [r.image for r in recs[:3]] == [pictures[i][0] for i in range(3)]
    assert [r.caption.decode() for r in recs[:3]] == [c for _, c in pictures[:3]]
    assert recs[0].meta == {"label": 0} and recs[0].image_ext == "jpg"
    assert (recs[3].reason, recs[4].reason) == ("image_file_missing", "image_path_outside")
    assert "missing.jpg: no such file" in recs[3].detail
    assert "image_paths_outside_input=true" in recs[4].detail
    allowed = list(iter_shard(found.shards[0], SourceOptions(image_paths_outside_input=True)))
    assert allowed[4].image == pictures[4][0]


def test_datasets_imagefolder_metadata_gives_what_load_dataset_gives(pictures, hf_files, tmp_path, monkeypatch):
    root = hf_files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"file_name": f"images/{i}.jpg", "prompt": pictures[i][1], "score": i / 2}) + "\n")
    reference = datasets.load_dataset("imagefolder", data_dir=str(root), split="train",
                                      cache_dir=str(tmp_path / "hf_cache"))
    [found] = discover_inputs([str(root)])
    assert found.layout == "Hugging Face imagefolder" and "caption column 'prompt'" in found.line()
    recs = [r for s in found.shards for r in iter_shard(s)]
    assert [r.caption.decode() for r in recs] == reference["prompt"]
    assert [r.meta["score"] for r in recs] == reference["score"]
    assert [r.key for r in recs] == [f"hf/images/{i}" for i in range(4)]
    assert [r.image for r in recs] == [pictures[i][0] for i in range(4)]
    # CSV metadata, a line that is not JSON, a file that is missing, a name that leaves the folder
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("file_name,caption\nimages/0.jpg,a red door\nimages/9.jpg,gone\n"
                                       "../elsewhere.jpg,outside\n")
    recs = [r for s in discover_shards([str(root)]) for r in iter_shard(s)]
    assert [getattr(r, "reason", None) for r in recs] == [None, "image_file_missing", "image_path_outside"]
    assert recs[0].caption == b"a red door"
    (root / "metadata.csv").unlink()
    (root / "metadata.jsonl").write_text('{"file_name": "images/1.jpg", "text": "ok"}\n{not json\n')
    recs = [r for s in discover_shards([str(root)]) for r in iter_shard(s)]
    assert [getattr(r, "reason", None) for r in recs] == [None, "broken_metadata"]


def test_ambiguous_or_missing_columns_are_one_line_errors_naming_the_candidates(pictures, tmp_path):
    jpg = pictures[0][0]
    p = tmp_path / "two_captions.parquet"
    pq.write_table(pa.table({"image": [jpg], "caption": ["a"], "text": ["b"]}), p)
    with pytest.raises(InputError, match=r"2 candidate caption columns \['caption', 'text'\]; name one with "
                                         r"sources.caption_column=NAME") as e:
        discover_inputs([str(p)])
    assert "\n" not in str(e.value)
    [found] = discover_inputs([str(p)], SourceOptions(caption_column="text"))
    assert [r.caption for r in iter_shard(found.shards[0], SourceOptions(caption_column="text"))] == [b"b"]
    q = tmp_path / "two_images.parquet"
    pq.write_table(pa.table({"jpg": [jpg], "png": [jpg], "caption": ["a"]}), q)
    with pytest.raises(InputError, match=r"2 candidate image columns \['jpg', 'png'\]"):
        discover_inputs([str(q)])
    r = tmp_path / "no_caption.parquet"
    pq.write_table(pa.table({"image": [jpg], "title": ["a"]}), r)
    with pytest.raises(InputError, match=r"no caption column among \['image', 'title'\]; name it with "
                                         r"sources.caption_column=NAME"):
        discover_inputs([str(r)])
    with pytest.raises(InputError, match=r"no column 'photo' \(sources.image_column\)"):
        discover_inputs([str(r)], SourceOptions(image_column="photo"))


def test_cli_dry_run_prints_the_layout_and_first_samples_without_a_cache(pictures, tmp_path, capsys):
    d = write_img2dataset_webdataset(tmp_path / "laion", pictures)
    assert main(["--input", str(d), "--dry-run", "--samples", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"input {d}: img2dataset webdataset, 3 shards; 3 metadata .parquet")
    assert out[2] == "  000000000: dropped: download_failed (failed_to_download: HTTP Error 404: Not Found)"
    assert out[3].startswith(f"  000000001: {len(pictures[1][0])} bytes jpg, caption {pictures[1][1][:20]!r}"[:-1])
    assert out[-1] == "dry run: 3 shards, nothing encoded"
    assert not os.path.exists(tmp_path / "cache")
