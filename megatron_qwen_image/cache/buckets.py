"""Aspect-ratio buckets: which (width, height) an image is trained at, per stage base resolution.

Rule (docs/cache_format.md, "Buckets"):
- A stage has a base resolution B (256, 640 or 1328 in the Qwen-Image report) and so a pixel budget B*B.
- Its buckets are one per aspect ratio in ASPECT_RATIOS: for ratio r = w:h the bucket is
  (round16(B*sqrt(r)), round16(B/sqrt(r))), i.e. about the same number of pixels as B*B, both sides
  multiples of 16 (VAE factor 8 x patch size 2, so the latent packs into 2x2 patches exactly).
- An image of size (W, H) goes to the bucket whose aspect ratio is closest to W/H in log space
  (ties go to the earlier bucket in `buckets_for_base` order, i.e. the narrower one).
- Producers then resize so the image covers the bucket (scale = max(bw/W, bh/H), Lanczos) and
  center-crop to exactly (bw, bh). A fixed, small set of ratios keeps buckets few and full, so that
  global batches (one bucket each) fill quickly.

Condition images of edit samples (image editing, TI2I) are not bucketed: they get the size diffusers'
QwenImageEditPipeline gives its input image, `condition_size` (area about CONDITION_AREA = 1024², the aspect
kept, both sides multiples of 32), Lanczos-resized as its VaeImageProcessor.resize does. `condition_image`
first crops a source of the target's aspect exactly as its target was cropped to the bucket, so source and
target stay pixel-aligned; a source of another aspect keeps its own (and so its own condition size).
"""
from __future__ import annotations

import math

from PIL import Image

from .format import PIXEL_MULTIPLE, VAE_SCALE_FACTOR

BASE_RESOLUTIONS = (256, 640, 1328)

# The aspect ratios Qwen-Image is commonly used at (1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3).
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


def _round_multiple(x: float, m: int = PIXEL_MULTIPLE) -> int:
    return max(m, int(round(x / m)) * m)


def buckets_for_base(base: int, aspect_ratios=ASPECT_RATIOS) -> list[tuple[int, int]]:
    """All (width, height) buckets of a base resolution, sorted by aspect ratio (narrowest first)."""
    if not isinstance(base, int) or base <= 0 or base % PIXEL_MULTIPLE:
        raise ValueError(f"base resolution {base!r} must be a positive multiple of {PIXEL_MULTIPLE}")
    out = set()
    for rw, rh in aspect_ratios:
        if rw <= 0 or rh <= 0:
            raise ValueError(f"aspect ratio {rw}:{rh} must be positive")
        s = math.sqrt(rw / rh)
        out.add((_round_multiple(base * s), _round_multiple(base / s)))
    return sorted(out, key=lambda wh: (wh[0] / wh[1], wh[0]))


def bucket_for_size(width: int, height: int, base: int, aspect_ratios=ASPECT_RATIOS) -> tuple[int, int]:
    """(width, height) of an image -> its (bucket_w, bucket_h) at this base resolution."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    buckets = buckets_for_base(base, aspect_ratios)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - target))


def resize_to_bucket(image, bucket: tuple[int, int]):
    """Resize a PIL image so it covers the bucket (Lanczos), then center-crop to exactly (bw, bh)."""
    bw, bh = int(bucket[0]), int(bucket[1])
    if bw % PIXEL_MULTIPLE or bh % PIXEL_MULTIPLE:
        raise ValueError(f"bucket {bw}x{bh} is not a multiple of {PIXEL_MULTIPLE}")
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


CONDITION_AREA = 1024 * 1024  # QwenImageEditPipeline's calculate_dimensions(1024 * 1024, ratio)
EDIT_PLUS_VISION_AREA = 384 * 384  # QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE: what its vision tower sees
CONDITION_MULTIPLE = 32
SAME_ASPECT_TOLERANCE = 0.01  # relative: a source within 1 % of its target's aspect is cropped like the target


def condition_size(width: int, height: int, area: int = CONDITION_AREA) -> tuple[int, int]:
    """(w, h) of a condition image of aspect width:height, exactly diffusers' `calculate_dimensions(area, ratio)`
    (pipeline_qwenimage_edit.py), written the same way so the floats and Python's half-to-even `round` match:
    w = sqrt(area * ratio), h = w / ratio, each rounded to a multiple of 32 (so the Edit pipeline's rounding of
    its output size to multiples of 16 never changes them)."""
    for name, v in (("width", width), ("height", height), ("area", area)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"condition_size: {name} must be a positive integer, got {v!r}")
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w, h = round(w / CONDITION_MULTIPLE) * CONDITION_MULTIPLE, round(h / CONDITION_MULTIPLE) * CONDITION_MULTIPLE
    if w <= 0 or h <= 0:
        raise ValueError(f"condition_size: a {width}x{height} image is too elongated for area {area} (a side "
                         "rounds to 0)")
    return w, h


def condition_image(image, target_size: tuple[int, int], bucket: tuple[int, int], area: int = CONDITION_AREA):
    """A decoded source image (PIL RGB) -> the condition image the cache encodes.

    `target_size` is the target's (w, h) before it was cropped to `bucket`. A source of the same aspect is
    center-cropped to the bucket's aspect as resize_to_bucket cropped its target, then resized to
    condition_size(bucket); any other source keeps its aspect: condition_size(its own size). Lanczos, as
    the edit pipeline's VaeImageProcessor.resize."""
    w, h = image.size
    tw, th = target_size
    if abs((w / h) / (tw / th) - 1) <= SAME_ASPECT_TOLERANCE:
        bw, bh = bucket
        cw, ch = min(w, w * (bw / bh) / (w / h)), min(h, h * (w / h) / (bw / bh))
        left, top = (w - cw) / 2, (h - ch) / 2
        image = image.crop((round(left), round(top), round(left + cw), round(top + ch)))
        size = condition_size(bw, bh, area)
    else:
        size = condition_size(w, h, area)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def latent_size(bucket: tuple[int, int]) -> tuple[int, int]:
    """Pixel bucket (w, h) -> latent (h, w) as stored ([C, h, w])."""
    return bucket[1] // VAE_SCALE_FACTOR, bucket[0] // VAE_SCALE_FACTOR


def bucket_of_latent(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Latent (h, w) -> pixel bucket (w, h)."""
    return latent_hw[1] * VAE_SCALE_FACTOR, latent_hw[0] * VAE_SCALE_FACTOR
