"""Edit triplets (source image, instruction, target image) as inputs: WebDataset shards with `KEY.src.<ext>`
members and Parquet files with two image columns (written by Hugging Face `datasets` itself, with
MagicBrush's and InstructPix2Pix's column names), read and filtered as a producer run does: both images are
checked, a pair stays together or is dropped together, and a kept pair's source becomes a condition image of
the edit pipeline's size, aligned with its bucketed target."""
import io
import pickle
from collections import Counter

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from megatron_qwen_image.cache.buckets import condition_size
from megatron_qwen_image.config import ConfigError
from producer.config import FilterConfig, load_config
from producer.filters import SampleFilter
from producer.layouts import LayoutError, parquet_columns
from producer.sources import BadRecord, InputError, RawSample, SourceOptions, discover_inputs, discover_shards, iter_shard

FILTERS = FilterConfig(min_caption_tokens=None, max_caption_tokens=None)


def picture(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A textured picture that passes the default image filters: bands of colour and an ellipse."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(40, 200, 3)))
    d = ImageDraw.Draw(img)
    for i in range(0, w, 24):
        d.rectangle([i, 0, i + 11, h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as tw:
        for s in samples:
            tw.write(s)
    return str(path)


def test_tar_edit_members(tmp_path):
    tar = write_tar(tmp_path / "edits.tar", [
        {"__key__": "one", "src.png": picture(320, 240, 1, "PNG"), "jpg": picture(320, 240, 2), "txt": "Make it red."},
        {"__key__": "two", "src0.jpg": picture(320, 240, 3), "src1.png": picture(200, 200, 4, "PNG"),
         "jpg": picture(320, 240, 5), "txt": "Put picture 2 into picture 1."},
        {"__key__": "t2i", "jpg": picture(320, 240, 6), "txt": "A plain text-to-image sample."},
        {"__key__": "clash", "src.png": picture(64, 64, 7, "PNG"), "src0.png": picture(64, 64, 8, "PNG"),
         "jpg": picture(64, 64, 9), "txt": "Two first sources."},
        {"__key__": "gap", "src0.png": picture(64, 64, 7, "PNG"), "src2.png": picture(64, 64, 8, "PNG"),
         "jpg": picture(64, 64, 9), "txt": "No second source."},
        {"__key__": "nosrc-target", "src.png": picture(64, 64, 7, "PNG"), "txt": "A source without a target."},
    ])
    recs = {r.key: r for r in iter_shard(discover_shards([tar])[0])}
    assert isinstance(recs["one"], RawSample) and len(recs["one"].cond_images) == 1
    assert Image.open(io.BytesIO(recs["one"].cond_images[0])).format == "PNG"
    assert [Image.open(io.BytesIO(c)).size for c in recs["two"].cond_images] == [(320, 240), (200, 200)]
    assert recs["t2i"].cond_images == ()
    for key in ("clash", "gap", "nosrc-target"):
        assert isinstance(recs[key], BadRecord) and recs[key].reason == "missing_image", key


def _edit_dataset(rows, source="source_img", target="target_img", text="instruction"):
    features = datasets.Features({source: datasets.Image(), target: datasets.Image(), text: datasets.Value("string"),
                                  "turn_index": datasets.Value("int32")})
    return datasets.Dataset.from_dict({
        source: [{"bytes": s, "path": None} for s, _, _ in rows],
        target: [{"bytes": t, "path": None} for _, t, _ in rows],
        text: [c for _, _, c in rows], "turn_index": list(range(len(rows)))}, features=features)


def test_parquet_edit_columns_detected_as_datasets_writes_them(tmp_path):
    """MagicBrush's columns (source_img, target_img, instruction) as `datasets` writes them: detected without
    flags; an unreadable source drops the pair when filtered, not its reading."""
    rows = [(picture(320, 240, i), picture(320, 240, 10 + i), f"Change the colour of the circle {i}.")
            for i in range(3)]
    path = tmp_path / "magicbrush.parquet"
    _edit_dataset(rows).to_parquet(str(path))
    [found] = discover_inputs([str(path)])
    assert "edit pairs" in found.line() and "'source_img'" in found.line() and "'instruction'" in found.line()
    recs = list(iter_shard(found.shards[0]))
    assert [r.caption.decode() for r in recs] == [c for _, _, c in rows]
    assert all(r.cond_images == (s,) and r.image == t for r, (s, t, _) in zip(recs, rows))
    assert recs[0].meta == {"turn_index": 0}


def test_parquet_edit_column_choices(tmp_path):
    """InstructPix2Pix's names (original_image, edited_image, edit_prompt beside original/edited prompts);
    two source-like columns are an error naming them; `condition_columns: []` reads a plain T2I table."""
    ip2p = tmp_path / "ip2p.parquet"
    ds = _edit_dataset([(picture(64, 64, 1), picture(64, 64, 2), "make it snow")], "original_image", "edited_image",
                       "edit_prompt")
    ds = ds.add_column("original_prompt", ["a field"]).add_column("edited_prompt", ["a snowy field"])
    ds.to_parquet(str(ip2p))
    [rec] = iter_shard(discover_shards([str(ip2p)])[0])
    assert rec.caption == b"make it snow" and len(rec.cond_images) == 1
    ambiguous = tmp_path / "two_sources.parquet"
    _edit_dataset([(picture(64, 64, 1), picture(64, 64, 2), "x")]).cast_column(
        "target_img", datasets.Image()).rename_column("target_img", "input_image").add_column(
        "image", [{"bytes": picture(64, 64, 3), "path": None}]).cast_column("image", datasets.Image()).to_parquet(
        str(ambiguous))
    with pytest.raises(InputError, match=r"2 candidate source image columns \['source_img', 'input_image'\]"):
        discover_inputs([str(ambiguous)])
    opts = SourceOptions(condition_columns=["input_image"], image_column="image")
    [rec] = iter_shard(discover_shards([str(ambiguous)], opts)[0], opts)
    assert len(rec.cond_images) == 1 and rec.image == picture(64, 64, 3)
    plain = SourceOptions(condition_columns=[], image_column="edited_image", caption_column="edited_prompt")
    [rec] = iter_shard(discover_shards([str(ip2p)], plain)[0], plain)
    assert rec.cond_images == () and rec.caption == b"a snowy field"
    with pytest.raises(LayoutError, match="no column 'nope'"):
        parquet_columns(pq.read_schema(str(ambiguous)), "x", conditions=["nope"])


def test_filters_keep_pairs_together_and_align_the_condition():
    f = SampleFilter(FILTERS, 256, condition_area=128 * 128)
    same = picture(400, 300, 1)
    records = [
        RawSample("pair", picture(400, 300, 2), "jpg", b"Make the circle blue.", {}, "t", (picture(400, 300, 3),)),
        RawSample("same-source-again", picture(400, 300, 4), "jpg", b"Make it green.", {}, "t", (same,)),
        RawSample("same-source-twice", picture(400, 300, 5), "jpg", b"Make it pink.", {}, "t", (same,)),
        RawSample("other-aspect", picture(400, 300, 6), "jpg", b"Add a border.", {}, "t", (picture(300, 600, 7),)),
        RawSample("broken-source", picture(400, 300, 8), "jpg", b"Whatever.", {}, "t", (b"not an image " * 2000,)),
        RawSample("dark-source", picture(400, 300, 9), "jpg", b"Brighten it.", {}, "t",
                  (_dark_noise(400, 300),)),
        RawSample("broken-target", b"\xff\xd8" + b"broken" * 4000, "jpg", b"Whatever.", {}, "t", (picture(400, 300, 10),)),
    ]
    kept, drops, transforms, _ = f.process(records)
    by_key = {p.key: p for p in kept}
    assert set(by_key) == {"pair", "same-source-again", "same-source-twice", "other-aspect"}
    assert drops == Counter({"source_broken_file": 1, "source_luma_dark": 1, "broken_file": 1})
    assert transforms["edit_pairs"] == 4
    pair = by_key["pair"]
    bw, bh = pair.image.shape[1], pair.image.shape[0]  # the target's bucket
    assert pair.cond_images[0].shape == (*condition_size(bw, bh, 128 * 128)[::-1], 3)  # the target's aspect
    assert pair.meta["conditions"] == [{"original_size": [400, 300], "size": list(condition_size(bw, bh, 128 * 128))}]
    assert by_key["other-aspect"].cond_images[0].shape == (*condition_size(300, 600, 128 * 128)[::-1], 3)
    assert pair.cond_vision == []


def test_condition_is_cropped_like_its_target():
    """A source equal to its target (an identity edit) becomes, after the pair's processing, the target's
    picture at the condition size: the crop is the same, only the scale differs."""
    f = SampleFilter(FILTERS, 256, condition_area=128 * 128)
    img = picture(480, 270, 3, "PNG")  # 16:9 source cropped to a 16:9 bucket's exact aspect
    [p], _, _, _ = f.process([RawSample("id", img, "png", b"Keep it as it is.", {}, "t", (img,))])
    cond = Image.fromarray(p.cond_images[0])
    target_small = Image.fromarray(p.image).resize(cond.size, Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(cond, dtype=np.int16) - np.asarray(target_small, dtype=np.int16))
    assert diff.mean() < 6, diff.mean()  # resampling differences only; a misaligned crop is far off


def test_vision_images_for_edit_plus():
    f = SampleFilter(FILTERS, 256, condition_area=256 * 256, vision_area=96 * 96)
    [p], _, _, _ = f.process([RawSample("p", picture(400, 300, 1), "jpg", b"Edit.", {}, "t",
                                        (picture(400, 300, 2), picture(300, 300, 3)))])
    assert [c.shape[:2] for c in p.cond_vision] == [condition_size(*_wh(c), 96 * 96)[::-1] for c in p.cond_images]
    # the Prepared sample crosses the Ray object store (pickled as row bands) whole
    back = pickle.loads(pickle.dumps(p))
    assert all(np.array_equal(a, b) for a, b in zip(back.cond_images + back.cond_vision, p.cond_images + p.cond_vision))


def _wh(a):
    return a.shape[1], a.shape[0]


def _dark_noise(w, h) -> bytes:
    """Large enough for the file-size check, textured, but nearly black."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 6, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_edit_config_keys():
    cfg = load_config(None, ["edit.template=edit_plus", "edit.condition_area=65536"])
    assert (cfg.edit.template, cfg.edit.condition_area) == ("edit_plus", 65536)
    with pytest.raises(ConfigError, match="edit.condition_area"):
        load_config(None, ["edit.condition_area=100"])
    with pytest.raises(ConfigError, match="edit.template"):
        load_config(None, ["edit.template=inpaint"])


def test_encoder_worker_writes_edit_pairs_as_the_edit_encoders_compute_them(tmp_path):
    """A shard mixing text-to-image samples and edit pairs (one with two sources, edit_plus) through both
    workers: edit samples carry their condition latents into the cache, each the edit encoders' output on
    the prepared images; text-to-image samples keep the T2I template; the stats count both tasks."""
    import torch

    from megatron_qwen_image.cache import CacheReader
    from megatron_qwen_image.encoders.edit import TEMPLATES, QwenEditConditionEncoder, QwenEditTextEncoder
    from megatron_qwen_image.encoders.make_tiny import ensure_tiny
    from megatron_qwen_image.encoders.text import QwenTextEncoder
    from megatron_qwen_image.encoders.vae import QwenVAEEncoder
    from producer.workers import CpuWorker, EncoderWorker

    tiny = ensure_tiny()
    tar = write_tar(tmp_path / "mixed.tar", [
        {"__key__": "t2i", "jpg": picture(400, 300, 1), "txt": "A plain picture of a circle."},
        {"__key__": "edit1", "src.png": picture(400, 300, 2, "PNG"), "jpg": picture(400, 300, 3),
         "txt": "Make the circle red."},
        {"__key__": "edit2", "src0.jpg": picture(400, 300, 4), "src1.jpg": picture(300, 300, 5),
         "jpg": picture(400, 300, 6), "txt": "Put the circle of picture 2 into picture 1."},
    ])
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny}", "latent_dtype=fp32",
                                                        "edit.template=edit_plus", "edit.condition_area=16384"])
    [spec] = discover_shards([tar])
    [chunk] = CpuWorker(cfg).process_shard(spec)
    enc = EncoderWorker(cfg, str(tmp_path / "cache"))
    stats = enc.add_chunk(spec.work_unit, 0, chunk)
    assert stats["tasks"] == {"t2i": 1, "ti2i": 2}
    enc.commit(spec.work_unit, 0, 1)
    records = {r["key"]: r for r in CacheReader(str(tmp_path / "cache")).iter_records()}
    prepared = {s.key: s for s in chunk.samples}
    assert records["t2i"]["cond_latents"] == []
    (t2i_text,) = QwenTextEncoder.from_pretrained(tiny).encode([prepared["t2i"].caption])
    torch.testing.assert_close(records["t2i"]["text_embed"].float(), t2i_text.to(torch.bfloat16).float())
    text = QwenEditTextEncoder.from_pretrained(tiny, template=TEMPLATES["edit_plus"])
    vae = QwenEditConditionEncoder(QwenVAEEncoder.from_pretrained(tiny), TEMPLATES["edit_plus"])
    for key, n in (("edit1", 1), ("edit2", 2)):
        s, rec = prepared[key], records[key]
        assert len(s.cond_images) == len(s.cond_vision) == n
        conds = vae.encode([Image.fromarray(a) for a in s.cond_images], presized=True)
        assert [tuple(c.shape) for c in rec["cond_latents"]] == [tuple(c.shape) for c in conds]
        for got, want in zip(rec["cond_latents"], conds):
            torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
        (t,) = text.encode([s.caption], [[Image.fromarray(a) for a in s.cond_vision]], presized=True)
        torch.testing.assert_close(rec["text_embed"].float(), t.to(torch.bfloat16).float())
        assert rec["meta"]["conditions"][0]["size"] == [s.cond_images[0].shape[1], s.cond_images[0].shape[0]]
