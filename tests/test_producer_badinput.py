"""Bad input: every case the producer must drop and count without crashing (sources + filters, no Ray).

`build_bad_inputs(dir)` writes the shards used here and by the Ray end-to-end bad-input test
(test_producer_ray.py), and returns the exact drop counts and kept keys the producer must report.
"""
import io
import json
import os
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.config import load_config
from producer.filters import SampleFilter
from producer.sources import BadRecord, RawSample, SourceOptions, discover_shards, iter_shard
from producer.synthetic import render_sample
from producer.synthetic_common import LATIN_FONT_CANDIDATES, find_font

# Test-only thresholds: a small caption budget so "too long" needs no 1024-token caption.
BAD_INPUT_OVERRIDES = ["filters.max_caption_tokens=200"]


def _good(i: int) -> tuple[bytes, str]:
    jpg, caption, _ = render_sample(4242, 0, i, None, find_font(LATIN_FONT_CANDIDATES), ("en",))
    return jpg, caption


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def _jpeg(img: Image.Image, quality=90, exif=None) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return b.getvalue()


def _png_bomb(width=30000, height=30000) -> bytes:
    """A valid small PNG whose header claims width x height pixels (never decoded by the producer)."""
    raw = _png(Image.new("L", (8, 8), 128))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF) + raw[33:]
    text = b"tEXt" + b"Comment\0" + b"x" * 2000  # pad above filters.min_file_bytes
    return patched[:33] + struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text)) + patched[33:]


def _text_image(size, bg, fg, text, font_size=40):
    img = Image.new("RGB", size, bg)
    ImageDraw.Draw(img).text((size[0] // 8, size[1] // 2 - font_size // 2), text, fill=fg, font_size=font_size)
    return img


def write_tar(path: str, members: list) -> None:
    """members: (name, bytes) or (name, ("symlink", target))."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[1]
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def build_bad_inputs(out_dir: str) -> dict:
    """Write `bad.tar` (every per-sample case) and `cut.tar` (a tar truncated mid-member).

    Returns {"drops": Counter of expected reasons, "kept": sorted kept keys, "rotated": keys with EXIF rotation}.
    """
    os.makedirs(out_dir, exist_ok=True)
    goods = [_good(i) for i in range(8)]
    g_imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in goods]
    cap = "A sign with the text \"Hello\" in white letters."
    m, drops, kept = [], Counter(), []

    def sample(key, image: bytes | None, caption: bytes | None, reason: str | None, ext="jpg"):
        if image is not None:
            m.append((f"{key}.{ext}", image))
        if caption is not None:
            m.append((f"{key}.txt", caption))
        m.append((f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
        if reason:
            drops[reason] += 1
        else:
            kept.append(key)

    for i in range(3):
        sample(f"good{i}", goods[i][0], goods[i][1].encode(), None)
    sample("exactdup", goods[0][0], b"A copy of the first image with its own caption.", "exact_duplicate")
    near = g_imgs[1].resize((g_imgs[1].width - 16, g_imgs[1].height - 12), Image.Resampling.BICUBIC)
    sample("neardup", _jpeg(near, quality=60), b"The second image, re-encoded smaller.", "near_duplicate")
    # EXIF orientation 6: stored landscape, shown portrait; kept after rotation.
    exif = Image.Exif()
    exif[0x0112] = 6
    rot_src = g_imgs[3].resize((448, 256), Image.Resampling.BICUBIC)
    sample("rotated", _jpeg(rot_src, exif=exif.tobytes()), goods[3][1].encode(), None)
    sample("corrupt", os.urandom(5000), cap.encode(), "broken_file")
    sample("truncimg", goods[4][0][: len(goods[4][0]) * 6 // 10], cap.encode(), "broken_file")
    sample("zerobyte", b"", cap.encode(), "empty_file")
    sample("smallfile", _png(Image.new("RGB", (16, 16), (90, 120, 200))), cap.encode(), "file_too_small", "png")
    sample("bomb", _png_bomb(), cap.encode(), "decompression_bomb", "png")
    tiny = _text_image((200, 150), (200, 220, 240), (20, 20, 20), "Tiny", 30)
    sample("tinyres", _png(tiny), cap.encode(), "min_side", "png")
    wide = _text_image((1200, 256), (200, 220, 240), (20, 20, 20), "A very wide banner", 60)
    sample("wide", _png(wide), cap.encode(), "max_aspect", "png")
    sample("blurry", _png(g_imgs[5].filter(ImageFilter.GaussianBlur(4))), goods[5][1].encode(), "clarity", "png")
    sample("dark", _png(ImageEnhance.Brightness(g_imgs[6]).enhance(0.04)), goods[6][1].encode(), "luma_dark", "png")
    sample("bright", _png(_text_image((320, 320), (255, 255, 255), (0, 0, 0), "hi", 20)), cap.encode(),
           "luma_bright", "png")
    sample("saturated", _png(_text_image((320, 320), (255, 0, 0), (255, 255, 0), "Red Sale")), cap.encode(),
           "saturation", "png")
    flat = Image.new("RGB", (320, 320), (128, 128, 128))
    ImageDraw.Draw(flat).rectangle([100, 100, 180, 180], fill=(30, 30, 30))
    sample("flat", _png(flat), cap.encode(), "entropy", "png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8))
    sample("noise", _png(noise), cap.encode(), "texture", "png")
    sample("badutf8", goods[7][0], b"A caption \xff\xfe with broken bytes", "caption_invalid_utf8")
    sample("emptycap", goods[7][0], b"  \n\t ", "caption_empty")
    sample("nocap", goods[7][0], None, "caption_missing")
    sample("notext", goods[7][0], "!!! ??? ... ★★★".encode(), "caption_no_text")
    sample("boiler", goods[7][0], b"IMG_1234.jpg", "caption_boilerplate")
    sample("toolong", goods[7][0], (" ".join(["red blue green"] * 100)).encode(), "caption_too_long")
    m.append(("noimage.txt", b"A caption without an image."))
    drops["missing_image"] += 1
    for name in ("/abs/evil.jpg", "../escape.txt", "sub/../../up.jpg"):
        m.append((name, b"x" * 2000))
        drops["unsafe_path"] += 1
    m.append(("link.jpg", ("symlink", "/etc/passwd")))
    drops["unsafe_path"] += 1
    write_tar(os.path.join(out_dir, "bad.tar"), m)

    # cut.tar: three complete samples, then the data of the fourth image ends early.
    cm = []
    for i in range(3):
        cm += [(f"cut{i}.jpg", goods[i][0]), (f"cut{i}.txt", goods[i][1].encode())]
    cm += [("cut3.jpg", goods[3][0]), ("cut3.txt", goods[3][1].encode())]
    write_tar(os.path.join(out_dir, "cut.tar"), cm)
    with open(os.path.join(out_dir, "cut.tar"), "rb") as f:
        data = f.read()
    with open(os.path.join(out_dir, "cut.tar"), "wb") as f:
        offset = data.index(b"cut3.jpg\0") + 512  # cut3.jpg's header block, then its data
        f.write(data[: offset + len(goods[3][0]) // 2])
    kept += ["cut0", "cut1", "cut2"]
    drops["truncated_tar"] += 1
    return {"drops": drops, "kept": sorted(kept), "rotated": ["rotated"]}


@pytest.fixture(scope="module")
def tiny_dir():
    return ensure_tiny()


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    return str(d), build_bad_inputs(str(d))


def _run_filters(cfg, tokenizer, specs):
    f = SampleFilter(cfg.filters, cfg.base_resolution, tokenizer)
    drops, transforms, kept = Counter(), Counter(), []
    for spec in specs:
        f.start_shard()
        k, d, t, _ = f.process(list(iter_shard(spec, cfg.sources)))
        kept += k
        drops.update(d)
        transforms.update(t)
    return kept, drops, transforms


def test_every_bad_case_dropped_under_its_reason(bad, tiny_dir):
    from megatron_qwen_image.encoders.text import load_tokenizer

    d, expected = bad
    cfg = load_config("configs/producer/default.yaml", BAD_INPUT_OVERRIDES)
    kept, drops, transforms = _run_filters(cfg, load_tokenizer(tiny_dir), discover_shards([d]))
    assert dict(drops) == dict(expected["drops"])
    assert sorted(s.key for s in kept) == expected["kept"]
    assert transforms == Counter(exif_rotated=1)
    rotated = next(s for s in kept if s.key == "rotated")
    h, w = rotated.image.shape[:2]
    assert h > w, "EXIF orientation 6 must turn the stored landscape image into portrait"
    assert rotated.meta["exif_orientation"] == 6
    for s in kept:  # every kept image is exactly its bucket
        assert [s.image.shape[1], s.image.shape[0]] == s.meta["bucket"]
        assert s.image.dtype == np.uint8


def test_tar_reader_never_yields_unsafe_members(bad):
    d, _ = bad
    recs = list(iter_shard(discover_shards([os.path.join(d, "bad.tar")])[0]))
    unsafe = [r for r in recs if isinstance(r, BadRecord) and r.reason == "unsafe_path"]
    assert sorted(r.key for r in unsafe) == sorted(["/abs/evil.jpg", "../escape.txt", "sub/../../up.jpg", "link.jpg"])
    assert all(".." not in r.key and not r.key.startswith("/") for r in recs if isinstance(r, RawSample))


def test_truncated_tar_keeps_complete_samples_and_counts_the_cut(bad, tmp_path):
    d, _ = bad
    recs = list(iter_shard(discover_shards([os.path.join(d, "cut.tar")])[0]))
    assert [r.key for r in recs if isinstance(r, RawSample)] == ["cut0", "cut1", "cut2"]
    assert [r.reason for r in recs if isinstance(r, BadRecord)] == ["truncated_tar"]
    # Cut exactly at a header boundary (tarfile stops silently there): detected by the missing end marker.
    with open(os.path.join(d, "cut.tar"), "rb") as f:
        data = f.read()
    p = tmp_path / "cut_at_header.tar"
    p.write_bytes(data[:512 * 3])  # cut0.jpg header + (part of) its data, ends on a block boundary
    recs = list(iter_shard(discover_shards([str(p)])[0]))
    assert [r.reason for r in recs if isinstance(r, BadRecord)] == ["truncated_tar"]
    assert not [r for r in recs if isinstance(r, RawSample)]


def test_oversize_member_dropped_unread(tmp_path):
    jpg, caption = _good(0)
    write_tar(str(tmp_path / "big.tar"), [("a.jpg", jpg), ("a.txt", caption.encode()),
                                          ("b.jpg", b"y" * (len(jpg) + 100)), ("b.txt", b"caption b"),
                                          ("c.jpg", jpg), ("c.txt", b"caption c")])
    opts = SourceOptions(max_member_bytes=len(jpg) + 1)
    recs = list(iter_shard(discover_shards([str(tmp_path / "big.tar")])[0], opts))
    assert [r.reason for r in recs if isinstance(r, BadRecord)] == ["file_too_large"]
    assert [r.key for r in recs if isinstance(r, RawSample)] == ["a", "c"]


def test_parquet_and_folder_sources(tmp_path, tiny_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_qwen_image.encoders.text import load_tokenizer

    goods = [_good(i) for i in range(3)]
    table = pa.table({
        "image": pa.array([{"bytes": goods[0][0], "path": "a.jpg"}, {"bytes": goods[1][0], "path": "b.jpg"},
                           {"bytes": b"not an image" * 200, "path": "c.jpg"}]),
        "caption": [goods[0][1], goods[1][1], "A caption for a broken image."],
        "url": ["http://a", "http://b", "http://c"],
    })
    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(table, pdir / "part-0.parquet")
    (pdir / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    fdir = tmp_path / "folder"
    fdir.mkdir()
    for i, (jpg, cap) in enumerate(goods):
        (fdir / f"img{i}.jpg").write_bytes(jpg)
        if i != 2:
            (fdir / f"img{i}.txt").write_text(cap)
    cfg = load_config("configs/producer/default.yaml", ["sources.folder_shard_size=2"])
    specs = discover_shards([str(pdir), str(fdir)], cfg.sources)
    assert [s.kind for s in specs] == ["parquet", "parquet", "folder", "folder"]
    kept, drops, _ = _run_filters(cfg, load_tokenizer(tiny_dir), specs)
    assert dict(drops) == {"broken_shard": 1, "broken_file": 1, "caption_missing": 1}
    assert len(kept) == 4
    assert sorted(s.key for s in kept if s.source != specs[0].work_unit) == ["folder/img0", "folder/img1"]
    pq_meta = [s.meta["source_meta"] for s in kept if s.source == specs[0].work_unit]
    assert [m["url"] for m in pq_meta] == ["http://a", "http://b"]


def test_no_file_written_while_reading(bad, tmp_path):
    """Reading (including unsafe members) writes nothing anywhere: cwd and the input dir stay unchanged."""
    d, _ = bad
    before = {p: sorted(os.listdir(p)) for p in (d, os.getcwd(), os.path.dirname(d))}
    for spec in discover_shards([d]):
        list(iter_shard(spec))
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert not os.path.exists("/abs/evil.jpg")
