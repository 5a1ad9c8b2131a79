"""Bucket function properties and the resize/crop rule (megatron_qwen_image/cache/buckets.py)."""
import math
import random

import numpy as np
import pytest
from PIL import Image

from megatron_qwen_image.cache import BASE_RESOLUTIONS, bucket_for_size, buckets_for_base, resize_to_bucket


@pytest.mark.parametrize("base", BASE_RESOLUTIONS)
def test_buckets_are_multiples_of_16_with_the_base_pixel_budget(base):
    buckets = buckets_for_base(base)
    assert (base, base) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        # Rounding each side to 16 moves the area by at most ~2*16/min_side of the budget.
        assert abs(w * h / base**2 - 1) <= 2 * 16 / min(w, h) + 1e-9, (w, h)
    # Symmetric set: every landscape bucket has its portrait twin.
    assert sorted((h, w) for w, h in buckets) == sorted(buckets)


@pytest.mark.parametrize("base", BASE_RESOLUTIONS)
def test_bucket_for_size_is_nearest_aspect_symmetric_and_scale_invariant(base):
    rng = random.Random(base)
    buckets = buckets_for_base(base)
    for _ in range(300):
        w, h = rng.randint(64, 5000), rng.randint(64, 5000)
        bw, bh = bucket_for_size(w, h, base)
        assert (bw, bh) in buckets
        err = abs(math.log(bw / bh) - math.log(w / h))
        assert all(err <= abs(math.log(x / y) - math.log(w / h)) + 1e-12 for x, y in buckets)
        if not any(abs(abs(math.log(x / y) - math.log(w / h)) - err) < 1e-12 for x, y in buckets if (x, y) != (bw, bh)):
            assert bucket_for_size(h, w, base) == (bh, bw)  # transpose (no tie)
        assert bucket_for_size(3 * w, 3 * h, base) == (bw, bh)


def test_bucket_for_size_is_monotone_in_aspect_ratio():
    ratios = [x / 100 for x in range(20, 500, 3)]
    got = [bucket_for_size(int(1000 * r), 1000, 640) for r in ratios]
    aspects = [w / h for w, h in got]
    assert aspects == sorted(aspects)
    assert bucket_for_size(1920, 1080, 640) == (848, 480)
    assert bucket_for_size(1000, 1000, 1328) == (1328, 1328)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="base resolution"):
        buckets_for_base(250)
    with pytest.raises(ValueError, match="positive"):
        bucket_for_size(0, 10, 256)


def test_resize_to_bucket_covers_then_center_crops_like_a_pil_reference():
    rng = np.random.default_rng(0)
    for w, h in [(1000, 600), (300, 900), (256, 256), (100, 80)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        bw, bh = bucket_for_size(w, h, 256)
        out = resize_to_bucket(img, (bw, bh))
        assert out.size == (bw, bh)
        # Reference: scale to cover, Lanczos, centre crop.
        s = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
        ref = img.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else img
        left, top = (nw - bw) // 2, (nh - bh) // 2
        ref = ref.crop((left, top, left + bw, top + bh))
        assert np.array_equal(np.asarray(out), np.asarray(ref))
        assert nw == bw or nh == bh  # covers with the smallest scale: one side fits exactly
