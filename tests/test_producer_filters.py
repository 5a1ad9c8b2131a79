"""Filter measurements against independent references (PIL, scipy, imagehash, brute force)."""
import io
import random

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageStat
from scipy import ndimage

from producer.config import FilterConfig
from producer.filters import REASONS, NearDuplicateIndex, SampleFilter, image_stats, phash64


def _photo_like(seed=0, size=(320, 240)):
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (size[1] // 8, size[0] // 8, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    return img.filter(ImageFilter.DETAIL)


@pytest.mark.parametrize("max_distance", [0, 3, 4, 8])
def test_near_duplicate_index_equals_brute_force(max_distance):
    rng = random.Random(max_distance)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    # plant near copies: flip up to max_distance + 1 bits of earlier hashes
    for i in range(100):
        h = hashes[rng.randrange(len(hashes))]
        for b in rng.sample(range(64), rng.randint(0, max_distance + 1)):
            h ^= 1 << b
        hashes.append(h)
    index, seen = NearDuplicateIndex(max_distance), []
    for h in hashes:
        brute = any(bin(h ^ o).count("1") <= max_distance for o in seen)
        assert (index.find(h) is not None) == brute
        if not brute:
            index.add(h)
            seen.append(h)


def test_phash64_is_imagehash_phash():
    img = _photo_like(1)
    assert phash64(img) == int(str(imagehash.phash(img)), 16)


def test_image_stats_match_reference_implementations():
    img = _photo_like(2, (200, 150))  # below stats_side: measured at full size
    s = image_stats(img, side=256, gradient=48.0)
    grey = img.convert("L")
    g = np.asarray(grey, dtype=np.float64)
    assert s["luma"] == pytest.approx(ImageStat.Stat(grey).mean[0] / 255, rel=1e-6)
    assert s["entropy"] == pytest.approx(grey.entropy(), rel=1e-6)
    assert s["saturation"] == pytest.approx(ImageStat.Stat(img.reduce(2).convert("HSV")).mean[1] / 255, rel=1e-6)
    lap = ndimage.laplace(g)[1:-1, 1:-1]  # same 4-neighbour kernel (sign flipped), interior only
    assert s["clarity"] == pytest.approx(lap.var(), rel=1e-5)
    gx, gy = np.abs(np.diff(g, axis=1))[:-1, :], np.abs(np.diff(g, axis=0))[:, :-1]
    assert s["texture"] == pytest.approx((np.hypot(gx, gy) > 48).mean(), rel=1e-6)


def test_blur_lowers_clarity_and_noise_raises_texture():
    img = _photo_like(3)
    assert image_stats(img.filter(ImageFilter.GaussianBlur(3)), 256, 48)["clarity"] < image_stats(img, 256, 48)["clarity"] / 4
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert image_stats(noise, 256, 48)["texture"] > 0.5


def test_caption_checks():
    f = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256)
    assert f.caption_reason("  A red bus.  ".encode()) == ("A red bus.", None)
    assert f.caption_reason("一只猫".encode()) == ("一只猫", None)
    assert f.caption_reason(None)[1] == "caption_missing"
    assert f.caption_reason(b"\xc3\x28")[1] == "caption_invalid_utf8"
    assert f.caption_reason(b" \n ")[1] == "caption_empty"
    assert f.caption_reason("*** --- !!!".encode())[1] == "caption_no_text"
    for boiler in (b"IMG_0042", b"photo.JPG", b"untitled", b"Stock photo of a dog", b"N/A"):
        assert f.caption_reason(boiler)[1] == "caption_boilerplate", boiler


def test_duplicates_are_judged_per_shard_and_only_against_kept_samples():
    img = _photo_like(4, (400, 300))
    b = io.BytesIO()
    img.save(b, format="PNG")
    data = b.getvalue()
    f = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256)
    assert f.image_or_reason(data)[2] is None
    assert f.image_or_reason(data)[2] == "exact_duplicate"
    f.start_shard()  # a new work unit: a redo of the same shard must make the same decisions
    assert f.image_or_reason(data)[2] is None
    g = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None, min_clarity=1e12), 256)
    assert g.image_or_reason(data)[2] == "clarity"
    assert g.image_or_reason(data)[2] == "clarity", "a rejected image must not make its copy a duplicate"


def test_reasons_are_documented():
    assert all(isinstance(v, str) and v for v in REASONS.values())
