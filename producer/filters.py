"""Rule-based filters (Qwen-Image report §3.2) and the CPU stage: raw bytes -> decoded, checked, bucketed image.

Every drop has a reason name (`REASONS`), counted per shard and reported. Checks run cheapest first:
caption (no decode needed), file size, exact duplicate (bytes hash), header (pixel limit, side,
aspect), decode + EXIF orientation, image statistics on a small grey thumbnail, perceptual-hash near
duplicate, then the resize/crop to the sample's bucket (the cache's `bucket_for_size`/`resize_to_bucket`).

Duplicates are judged within one work unit (input shard): a redo of the shard after a crash then makes
exactly the same decisions, which the exactly-once cache relies on. Only kept samples enter the
duplicate index, so a duplicate of a rejected image is not rejected for it.

Edit samples (TI2I) bring source images (`RawSample.cond_images`): each goes through the same image checks
(not the duplicate checks: one source is often edited several ways), before its target, and a failure drops
the pair under `source_<reason>`. A kept pair's sources become condition images (buckets.condition_image:
the edit pipeline's size, cropped like the target when of its aspect).
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import imagehash
import numpy as np
from PIL import Image, ImageOps

from megatron_qwen_image.cache import bucket_for_size, resize_to_bucket
from megatron_qwen_image.cache.buckets import CONDITION_AREA, CONDITION_MULTIPLE, condition_image
from producer.config import FilterConfig
from producer.score_histograms import count_scores
from producer.sources import BadRecord, RawSample

# Reason name -> what it means. The report lists drops in this order; model filters add their own names.
REASONS = {
    "broken_shard": "the shard itself cannot be read (corrupt Parquet, missing column)",
    "truncated_tar": "the tar ends early; samples after the cut are lost (counted once per shard)",
    "unsafe_path": "tar member with an absolute path, '..', a link or a device (never read)",
    "missing_image": "sample without an image member/column",
    "download_failed": "img2dataset could not download the row (its status is not success)",
    "image_file_missing": "the image file a table row names does not exist",
    "image_path_outside": "the image file a table row names is outside the input (sources.image_paths_outside_input)",
    "broken_metadata": "an imagefolder metadata line that is not a JSON object",
    "empty_file": "zero-byte image",
    "file_too_small": "image file below filters.min_file_bytes",
    "file_too_large": "image file above filters.max_file_bytes or sources.max_member_bytes",
    "decompression_bomb": "more pixels than filters.max_pixels (checked from the header, before decoding)",
    "broken_file": "image that does not decode (corrupt, truncated, unknown format)",
    "min_side": "shorter side below filters.min_side",
    "max_aspect": "long/short side ratio above filters.max_aspect",
    "exact_duplicate": "same image bytes as a kept sample of the shard",
    "near_duplicate": "perceptual hash within filters.dedup_near_max_distance bits of a kept sample",
    "luma_dark": "mean brightness below filters.min_luma",
    "luma_bright": "mean brightness above filters.max_luma",
    "saturation": "mean saturation above filters.max_saturation",
    "entropy": "grey-level entropy below filters.min_entropy (flat, information-poor)",
    "clarity": "blurry: Laplacian variance below filters.min_clarity",
    "texture": "strong-gradient density above filters.max_texture (over-complex texture, noise)",
    "caption_missing": "no caption (.txt member / column / sidecar)",
    "caption_invalid_utf8": "caption bytes are not valid UTF-8",
    "caption_empty": "caption empty or only whitespace",
    "caption_no_text": "caption without any letter or digit",
    "caption_boilerplate": "caption matches a filters.caption_boilerplate pattern",
    "caption_too_short": "caption shorter than filters.min_caption_tokens (MLLM tokenizer)",
    "caption_too_long": "caption longer than filters.max_caption_tokens (MLLM tokenizer)",
}

# The image checks a source image of an edit pair goes through; it is dropped under "source_<reason>".
SOURCE_IMAGE_REASONS = ("empty_file", "file_too_small", "file_too_large", "decompression_bomb", "broken_file",
                        "min_side", "max_aspect", "luma_dark", "luma_bright", "saturation", "entropy", "clarity",
                        "texture")
REASONS.update({f"source_{r}": f"edit pair whose source image fails: {REASONS[r]}" for r in SOURCE_IMAGE_REASONS})

_LETTER_OR_DIGIT = re.compile(r"[^\W_]")  # any Unicode letter or digit


@dataclass
class Prepared:
    """A sample that passed the CPU filters, resized/cropped to its bucket (uint8 HxWx3). An edit sample also
    has its source images as the VAE encodes them (`cond_images`, uint8 HxWx3 at buckets.condition_size) and,
    for templates whose vision tower sees them at another size (edit_plus), as it sees them (`cond_vision`)."""

    key: str
    image: np.ndarray
    caption: str
    source: str
    meta: dict = field(default_factory=dict)
    cond_images: list = field(default_factory=list)
    cond_vision: list = field(default_factory=list)

    def __reduce__(self):
        return _rebuild_prepared, (self.key, _row_bands(self.image), self.caption, self.source, self.meta,
                                   [_row_bands(c) for c in self.cond_images], [_row_bands(c) for c in self.cond_vision])


# Ray copies every pickled buffer larger than 1 MiB into its object store with 6 threads it starts for
# that one copy (a fixed constant in its serializer). On a producer node every core is busy with CPU
# actors, so those threads wait to be scheduled: a chunk of 640p images took ~3x longer to hand over than
# to copy. Pixel buffers therefore travel as row bands of at most 1 MiB, copied by the calling thread.
_MAX_BAND_BYTES = 1 << 20


def _row_bands(image: np.ndarray) -> list[np.ndarray]:
    image = np.ascontiguousarray(image)
    rows = max(1, _MAX_BAND_BYTES // max(1, image.strides[0]))
    return [image[i:i + rows] for i in range(0, image.shape[0], rows)]


def _joined(bands: list[np.ndarray]) -> np.ndarray:
    return bands[0] if len(bands) == 1 else np.concatenate(bands)


def _rebuild_prepared(key, bands, caption, source, meta, conds=(), vision=()) -> "Prepared":
    return Prepared(key, _joined(bands), caption, source, meta, [_joined(c) for c in conds],
                    [_joined(c) for c in vision])


class NearDuplicateIndex:
    """64-bit hashes; finds one within `max_distance` bits without a linear scan.

    Pigeonhole: split the hash into max_distance + 1 bands; two hashes within the distance agree
    exactly on at least one band, so only hashes sharing a band value are compared.
    """

    def __init__(self, max_distance: int, bits: int = 64):
        self.max_distance = max_distance
        n = max_distance + 1
        edges = [round(i * bits / n) for i in range(n + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self._tables: list[dict[int, list[int]]] = [dict() for _ in self._bands]

    def find(self, h: int) -> int | None:
        for (shift, mask), table in zip(self._bands, self._tables):
            for other in table.get((h >> shift) & mask, ()):
                if bin(h ^ other).count("1") <= self.max_distance:
                    return other
        return None

    def add(self, h: int) -> None:
        for (shift, mask), table in zip(self._bands, self._tables):
            table.setdefault((h >> shift) & mask, []).append(h)


def phash64(image: Image.Image) -> int:
    """pHash as imagehash computes it (32x32 grey, DCT, 8x8 low frequencies vs. their median), as an int."""
    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def image_stats(image: Image.Image, side: int, gradient: float) -> dict:
    """Clarity, luma, saturation, entropy and texture of `image`, measured on a thumbnail <= `side` px.

    A fixed measuring size makes thresholds independent of the input resolution, and keeps this stage a
    small fraction of the decode + resize time. Mean saturation, insensitive to resolution, is measured at
    half the thumbnail's size (the HSV conversion is this function's most expensive step).
    """
    factor = max(1, math.ceil(max(image.size) / side))
    thumb = image.reduce(factor) if factor > 1 else image
    grey = np.asarray(thumb.convert("L"), dtype=np.float32)
    lap = (4.0 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    gx = grey[:-1, 1:] - grey[:-1, :-1]
    gy = grey[1:, :-1] - grey[:-1, :-1]
    small = thumb.reduce(2) if min(thumb.size) >= 32 else thumb
    sat = np.asarray(small.convert("HSV"), dtype=np.uint8)[..., 1]
    return {
        "clarity": float(lap.var()) if lap.size else 0.0,
        "luma": float(grey.mean() / 255.0),
        "saturation": float(sat.mean() / 255.0),
        "entropy": float(-(p * np.log2(p)).sum()),
        "texture": float(np.count_nonzero(gx * gx + gy * gy > gradient * gradient) / gx.size) if gx.size else 0.0,
        "thumb": thumb,
    }


def _needed_size(w: int, h: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Smallest size that still covers `bucket` after an aspect-preserving resize (for JPEG draft)."""
    s = max(bucket[0] / w, bucket[1] / h)
    return math.ceil(w * s), math.ceil(h * s)


class SampleFilter:
    """The CPU stage for one actor: caption checks, decode, image filters, dedup, bucket resize."""

    def __init__(self, cfg: FilterConfig, base_resolution: int, tokenizer=None, condition_area: int = CONDITION_AREA,
                 vision_area: int | None = None):
        """`condition_area`: the pixel area of an edit pair's condition images as the VAE encodes them;
        `vision_area`: the area the MLLM's vision tower sees them at, when not that one (edit_plus: 384²)."""
        self.cfg = cfg
        self.base_resolution = base_resolution
        self.condition_area, self.vision_area = condition_area, vision_area
        self.tokenizer = tokenizer
        self._boilerplate = [re.compile(p, re.IGNORECASE) for p in cfg.caption_boilerplate]
        # PIL's own guard (warning above the limit, error above twice it) follows ours in this process.
        Image.MAX_IMAGE_PIXELS = cfg.max_pixels
        if (cfg.min_caption_tokens or cfg.max_caption_tokens) and tokenizer is None:
            raise ValueError("caption token-length filters need the MLLM tokenizer (encoders.dir)")
        self.start_shard()

    def start_shard(self) -> None:
        """Reset the per-shard duplicate indexes."""
        self._exact: set[bytes] = set()
        self._near = NearDuplicateIndex(self.cfg.dedup_near_max_distance) \
            if self.cfg.dedup_near_max_distance is not None else None

    # ------------------------------------------------------------------ captions
    def caption_reason(self, raw: bytes | None) -> tuple[str | None, str | None]:
        """-> (caption, None) or (None, reason). Token length is checked separately, in batches."""
        if raw is None:
            return None, "caption_missing"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_invalid_utf8"
        text = text.replace("\x00", "").strip()
        if not text:
            return None, "caption_empty"
        if not _LETTER_OR_DIGIT.search(text):
            return None, "caption_no_text"
        if any(p.search(text) for p in self._boilerplate):
            return None, "caption_boilerplate"
        return text, None

    def caption_token_reasons(self, captions: list[str]) -> list[str | None]:
        cfg = self.cfg
        if not captions or self.tokenizer is None or (cfg.min_caption_tokens is None and cfg.max_caption_tokens is None):
            return [None] * len(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions, add_special_tokens=False)["input_ids"]]
        out = []
        for n in lengths:
            if cfg.min_caption_tokens is not None and n < cfg.min_caption_tokens:
                out.append("caption_too_short")
            elif cfg.max_caption_tokens is not None and n > cfg.max_caption_tokens:
                out.append("caption_too_long")
            else:
                out.append(None)
        return out

    # ------------------------------------------------------------------ images
    def image_or_reason(self, data: bytes, as_source: bool = False) -> tuple[Image.Image | None, dict, str | None]:
        """Decode with every guard; returns (bucketed RGB image, info, None) or (None, info, reason).

        `as_source`: `data` is the source image of an edit pair: no duplicate checks, and it comes back whole
        (decoded, EXIF-rotated, RGB) for buckets.condition_image, its JPEG decode drafted to cover the
        condition (and vision) area."""
        cfg = self.cfg
        info: dict = {"bytes": len(data)}
        dedup = not as_source
        if not data:
            return None, info, "empty_file"
        if cfg.min_file_bytes is not None and len(data) < cfg.min_file_bytes:
            return None, info, "file_too_small"
        if cfg.max_file_bytes is not None and len(data) > cfg.max_file_bytes:
            return None, info, "file_too_large"
        digest = None
        if cfg.dedup_exact and dedup:
            digest = hashlib.blake2b(data, digest_size=16).digest()
            info["blake2b"] = digest.hex()  # stored in meta: producer.dedup finds duplicates across shards
            if digest in self._exact:
                return None, info, "exact_duplicate"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
            w, h = img.size
            info["original_size"] = [w, h]
            if w * h > cfg.max_pixels:
                return None, info, "decompression_bomb"
            if w <= 0 or h <= 0:
                return None, info, "broken_file"
            if cfg.min_side is not None and min(w, h) < cfg.min_side:
                return None, info, "min_side"
            if cfg.max_aspect is not None and max(w, h) / min(w, h) > cfg.max_aspect:
                return None, info, "max_aspect"
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            rotated_wh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if dedup:
                bucket = bucket_for_size(rotated_wh[0], rotated_wh[1], self.base_resolution)
            else:  # a square of the largest area it is resized to covers every aspect's condition size
                side = math.isqrt(max(self.condition_area, self.vision_area or 0)) + CONDITION_MULTIPLE
                bucket = (side, side)
            if img.format == "JPEG":
                # Decode at the smallest JPEG scale (1/2, 1/4, 1/8) that still covers the bucket.
                nw, nh = _needed_size(w, h, bucket if rotated_wh == (w, h) else bucket[::-1])
                img.draft("RGB", (nw, nh))
            img.load()
        except Image.DecompressionBombError:
            return None, info, "decompression_bomb"
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
            info["error"] = f"{type(e).__name__}: {e}"[:200]
            return None, info, "broken_file"
        try:
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                info["exif_orientation"] = int(orientation)
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Exception as e:
            info["error"] = f"{type(e).__name__}: {e}"[:200]
            return None, info, "broken_file"
        stats = image_stats(img, cfg.stats_side, cfg.texture_gradient)
        thumb = stats.pop("thumb")
        info["scores"] = {k: round(v, 4) for k, v in stats.items()}
        reason = self._quality_reason(stats)
        if reason:
            return None, info, reason
        if not dedup:
            return img, info, None
        ph = None
        if self._near is not None:
            ph = phash64(thumb)
            info["phash"] = f"{ph:016x}"
            if self._near.find(ph) is not None:
                return None, info, "near_duplicate"
        out = resize_to_bucket(img, bucket)
        info["bucket"] = [bucket[0], bucket[1]]
        if digest is not None:
            self._exact.add(digest)
        if ph is not None:
            self._near.add(ph)
        return out, info, None

    def _quality_reason(self, s: dict) -> str | None:
        """First failing quality check. Order matters only for attribution: exposure and colour first
        (a near-black image also measures as flat and blurry), then information content, then blur,
        then over-complex texture."""
        c = self.cfg
        if c.min_luma is not None and s["luma"] < c.min_luma:
            return "luma_dark"
        if c.max_luma is not None and s["luma"] > c.max_luma:
            return "luma_bright"
        if c.max_saturation is not None and s["saturation"] > c.max_saturation:
            return "saturation"
        if c.min_entropy is not None and s["entropy"] < c.min_entropy:
            return "entropy"
        if c.min_clarity is not None and s["clarity"] < c.min_clarity:
            return "clarity"
        if c.max_texture is not None and s["texture"] > c.max_texture:
            return "texture"
        return None

    # ------------------------------------------------------------------ a chunk
    def process(self, records: list) -> tuple[list[Prepared], Counter, Counter, Counter]:
        """RawSample/BadRecord list -> (kept samples, drops per reason, transform counts, score histogram
        counts of every measured image: producer/score_histograms.py)."""
        drops: Counter = Counter()
        transforms: Counter = Counter()
        scores: Counter = Counter()
        raws: list[RawSample] = []
        captions: list[str] = []
        for r in records:
            if isinstance(r, BadRecord):
                drops[r.reason] += 1
                continue
            text, reason = self.caption_reason(r.caption)
            if reason:
                drops[reason] += 1
                continue
            raws.append(r)
            captions.append(text)
        kept: list[Prepared] = []
        for r, text, reason in zip(raws, captions, self.caption_token_reasons(captions)):
            if reason:
                drops[reason] += 1
                continue
            sources, reason = self._sources_or_reason(r, scores, transforms)
            if reason:
                drops[reason] += 1
                continue
            img, info, reason = self.image_or_reason(r.image)
            count_scores(scores, info.get("scores", {}))
            if reason:
                drops[reason] += 1
                continue
            if "exif_orientation" in info:
                transforms["exif_rotated"] += 1
            src_meta = {k: v for k, v in r.meta.items() if not (k == "caption" and v == text)}  # stored anyway
            meta = {"source_meta": src_meta, **info}
            prepared = Prepared(r.key, np.asarray(img, dtype=np.uint8), text, r.source, meta)
            if sources:
                self._add_conditions(prepared, sources, tuple(info["original_size"]), tuple(info["bucket"]))
                transforms["edit_pairs"] += 1
            kept.append(prepared)
        return kept, drops, transforms, scores

    def _sources_or_reason(self, r: RawSample, scores: Counter, transforms: Counter) -> tuple[list, str | None]:
        """An edit sample's decoded source images (checked like images, not for duplicates), or the reason
        ("source_<reason>") the first failing one drops the pair. Checked before the target, so that a pair
        dropped for its source leaves no trace in the duplicate index."""
        out = []
        for data in r.cond_images:
            img, info, reason = self.image_or_reason(data, as_source=True)
            count_scores(scores, info.get("scores", {}))
            if reason:
                return [], f"source_{reason}"
            if "exif_orientation" in info:
                transforms["exif_rotated"] += 1
            out.append(img)
        return out, None

    def _add_conditions(self, prepared: Prepared, sources: list, target_size: tuple, bucket: tuple) -> None:
        """The condition images of a kept pair (buckets.condition_image), and their meta: each source's
        original size and its condition size."""
        w, h = bucket
        target_wh = (target_size[1], target_size[0]) if prepared.meta.get("exif_orientation", 1) in (5, 6, 7, 8) \
            else target_size
        conds = [condition_image(s, target_wh, (w, h), self.condition_area) for s in sources]
        prepared.cond_images = [np.asarray(c, dtype=np.uint8) for c in conds]
        if self.vision_area is not None:
            prepared.cond_vision = [np.asarray(condition_image(s, target_wh, (w, h), self.vision_area), dtype=np.uint8)
                                    for s in sources]
        prepared.meta["conditions"] = [{"original_size": list(s.size), "size": list(c.size)}
                                       for s, c in zip(sources, conds)]
