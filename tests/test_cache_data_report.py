"""The data report: the producer's score histograms (every measured image, with its thresholds), a cache
made by the actors' own code, its figures and contact sheets, and one sample decoded back to pixels."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_qwen_image.cache import CacheReader
from megatron_qwen_image.cache.__main__ import main as cache_main
from megatron_qwen_image.cache.data_report import decode_key, pick_samples, summarize, write_report
from megatron_qwen_image.cache.exclusions import write_exclusions
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from producer.config import load_config
from producer.report import ProgressReporter, RunStats, ShardOutcomes
from producer.score_histograms import BINS
from producer.sources import discover_shards
from producer.synthetic import generate_shards
from producer.workers import CpuWorker, EncoderWorker


@pytest.fixture(scope="module")
def produced(tmp_path_factory, tiny_dir):
    """A cache of two synthetic shards written by the CPU and encoder workers, and the run report the
    producer would write for it (min_clarity raised to 600, so that some samples fail the clarity filter)."""
    raw = tmp_path_factory.mktemp("raw")
    cache = str(tmp_path_factory.mktemp("cache"))
    specs = discover_shards(generate_shards(str(raw), num_shards=2, per_shard=5, seed=21, languages=("en",)))
    cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny_dir}", "latent_dtype=fp32",
                                                         "base_resolution=256", "filters.min_clarity=600"])
    stats, reporter = RunStats(), ProgressReporter(len(specs), 0, interval_s=0.0)
    cpu, enc = CpuWorker(cfg), EncoderWorker(cfg, cache)
    for spec in specs:
        chunks = list(cpu.process_shard(spec, chunk_size=3))
        for c in chunks:
            stats.add_chunk(enc.add_chunk(spec.work_unit, 0, c))
            reporter.maybe_print(stats, 1, 0, 0)
        enc.commit(spec.work_unit, 0, len(chunks))
        stats.shards_committed += 1
    report = reporter.final(stats, 3.0, {"inputs": [str(raw)]}, ShardOutcomes(len(specs)), None, cfg.filters)
    ProgressReporter.write(report, os.path.join(cache, "reports", "producer-20261202T000000Z.json"))
    return cache, report, cfg


def test_the_run_report_histograms_every_measured_image_with_its_thresholds(produced):
    cache, report, cfg = produced
    h = report["score_histograms"]
    assert set(h) == {"clarity", "luma", "saturation", "entropy", "texture"}
    measured = report["samples"]["written"] + sum(report["drops"].get(r, 0) for r in
                                                  ("luma_dark", "luma_bright", "saturation", "entropy", "clarity",
                                                   "texture", "near_duplicate"))
    assert all(sum(v["counts"]) == measured and len(v["counts"]) == BINS for v in h.values())
    assert h["clarity"]["min"] == cfg.filters.min_clarity and h["luma"]["max"] == cfg.filters.max_luma
    assert h["saturation"]["min"] is None
    # The images the clarity filter dropped are those counted below its threshold (up to the bin across it).
    c, e = h["clarity"]["counts"], h["clarity"]["edges"]
    below = sum(n for n, hi in zip(c, e[1:]) if hi <= 600)
    reaching = sum(n for n, lo in zip(c, e[:-1]) if lo < 600)
    assert report["drops"].get("clarity", 0) >= 1 and below <= report["drops"]["clarity"] <= reaching < measured
    kept = [json.loads(m)["scores"]["entropy"] for s in CacheReader(cache).shards()
            for m in CacheReader(cache).open(s).column("meta")]
    edges = h["entropy"]["edges"]
    counted = np.histogram(kept, bins=edges)[0]
    assert (np.asarray(h["entropy"]["counts"]) >= counted).all()  # the kept ones are among those counted
    assert len(report["timeline"]) >= 2 and report["timeline"][-1][1] == report["samples"]["seen"]


def test_report_writes_every_figure_and_a_contact_sheet_per_bucket(produced, tiny_dir, tmp_path):
    cache, report, _ = produced
    s = summarize(cache)
    assert s.seen == report["samples"]["seen"] and s.samples == report["samples"]["written"]
    assert s.families == {256: {name: n for name, n in report["buckets"].items()}}
    index = write_report(cache, str(tmp_path / "r"), encoders=tiny_dir, per_bucket=2)
    page = open(index).read()
    for png in ("scores.png", "buckets.png", "text_length.png", "throughput.png"):
        assert f'src="{png}"' in page and Image.open(tmp_path / "r" / png).size[0] > 200
    assert 'src="drops.png"' in page
    for bucket, n in report["buckets"].items():
        sheet = Image.open(tmp_path / "r" / f"samples_{bucket}.png")
        w = int(bucket.split("x")[0])
        assert sheet.size[0] >= min(2, n) * w  # its first samples side by side, decoded at the bucket's size
    # The CLI, without encoders: every figure, no decoded samples, and the page says how to get them.
    assert cache_main(["report", cache, "--out", str(tmp_path / "cli")]) == 0
    assert "pass --encoders DIR" in open(tmp_path / "cli" / "index.html").read()
    assert not any(f.startswith("samples_") for f in os.listdir(tmp_path / "cli"))


def test_decode_one_key_back_to_pixels_through_the_vae(produced, tiny_dir, tmp_path):
    cache, _, _ = produced
    reader = CacheReader(cache)
    info = reader.shards()[0]
    key, lat, _ = reader.open(info).sample(0)
    out = decode_key(cache, key, tiny_dir, str(tmp_path / "one.png"))
    vae = QwenVAEEncoder.from_pretrained(tiny_dir)
    [expected] = vae.to_pil(vae.decode(lat.clone().float()[None]).float())
    got = Image.open(out)
    assert got.size == info.bucket and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
    assert cache_main(["inspect", cache, "--decode", key, "--encoders", tiny_dir,
                       "--out", str(tmp_path / "cli.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(got))
    with pytest.raises(KeyError, match="no sample 'nope'"):
        decode_key(cache, "nope", tiny_dir, str(tmp_path / "x.png"))
    assert torch.equal(lat, reader.open(info).sample(0)[1])  # reading never modified the cache


def test_contact_sheets_leave_out_what_the_exclusion_list_excludes(produced, tmp_path):
    cache = str(tmp_path / "cache")
    shutil.copytree(produced[0], cache)
    before = pick_samples(cache, per_bucket=2)
    bucket, rows = max(before.items(), key=lambda kv: len(kv[1]))
    info = next(s for s in CacheReader(cache).shards() if f"{s.bucket[0]}x{s.bucket[1]}" == bucket)
    first_key = CacheReader(cache).open(info).sample(0)[0]
    assert rows[0][0] == first_key
    write_exclusions(cache, {info.path: [0]}, {"tool": "test"})
    after = pick_samples(cache, per_bucket=2)
    assert first_key not in [k for k, *_ in after[bucket]]
    assert {b: [k for k, *_ in r] for b, r in after.items() if b != bucket} == \
        {b: [k for k, *_ in r] for b, r in before.items() if b != bucket}


def test_edit_groups_show_each_source_before_its_target(tiny_dir, tmp_path):
    """An edit group's contact sheet decodes the source beside the target: one image more per sample than
    the text-to-image group's row of the same samples count."""
    from megatron_qwen_image.cache import CacheWriter, seal
    from megatron_qwen_image.cache.data_report import contact_sheets

    cache = str(tmp_path / "cache")
    g = torch.Generator().manual_seed(0)
    with CacheWriter(cache, "edits") as w:
        for i in range(4):
            conds = [torch.randn(16, 4, 6, generator=g)] if i % 2 else None
            w.add(f"s{i}", torch.randn(16, 4, 4, generator=g), torch.randn(3, 64, generator=g), f"caption {i}",
                  cond_latents=conds)
    seal(cache)
    picked = pick_samples(cache, per_bucket=2)
    assert sorted(picked) == ["32x32", "32x32 +cond 16x4x6"]
    assert [len(c) for *_, c in picked["32x32 +cond 16x4x6"]] == [1, 1]
    sheets = dict(contact_sheets(cache, tiny_dir, str(tmp_path / "out"), per_bucket=2))
    from PIL import Image
    plain, edit = (Image.open(sheets[name]) for name in ("32x32", "32x32 +cond 16x4x6"))
    assert edit.size[0] > plain.size[0]  # 4 images (source, target, source, target) against 2
