"""Synthetic text-rendering samples (Qwen-Image report §3.4): multi-line text on simple backgrounds.

    python -m producer.synthetic OUT_DIR [--shards 2] [--per-shard 16] [--seed 0] [--languages en,zh]

writes WebDataset shards in the layout img2dataset produces (`OUT_DIR/00000.tar` holding `KEY.jpg`,
`KEY.txt`, `KEY.json` per sample), so the demo and the tests need no downloads. Captions quote the
rendered text exactly ('... with the text "OPEN DAILY / Fresh Coffee" in dark blue letters ...'),
which is what teaches a text-to-image model to render text.

Fonts: DejaVu (Debian's fonts-dejavu-core) when present, else Pillow's built-in scalable font. Chinese
samples need a CJK font; the generator looks for WenQuanYi Micro Hei (Debian package
`fonts-wqy-microhei`), WenQuanYi Zen Hei or Noto Sans CJK, and when none is installed it skips Chinese
with a warning (the samples are then English only) — it never renders tofu boxes.

Output is a pure function of (seed, shard, index): the same command writes byte-identical shards.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import random
import sys
import warnings

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

LATIN_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
)
CJK_FONT_GLOBS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-*.ttc",
    "/usr/share/fonts/**/*CJK*.tt[cf]",
    "/usr/share/fonts/**/wqy*.tt[cf]",
)
CJK_DEBIAN_PACKAGE = "fonts-wqy-microhei"

EN_PHRASES = (
    "OPEN DAILY", "Fresh Coffee", "Hello World", "Summer Sale", "50% OFF", "Welcome Home", "Good Morning",
    "City Library", "Book Fair 2025", "Live Music Tonight", "No Parking", "Exit", "Garden Cafe", "Art Show",
    "Grand Opening", "Best Tea in Town", "Quiet Please", "Room 204", "Main Street", "Happy Birthday",
    "Stay Curious", "Night Market", "Fresh Bread", "Train Station", "Platform 3", "Think Different",
    "Open 24 Hours", "Sunday Brunch", "Jazz Club", "Moon River", "Blue Sky", "Keep Calm", "Made by Hand",
)
ZH_PHRASES = (
    "你好世界", "欢迎光临", "今日特价", "新品上市", "早上好", "晚安", "咖啡店", "城市书店", "花园餐厅",
    "春天来了", "开业大吉", "学习使我快乐", "山高水长", "天天向上", "音乐之夜", "艺术展览", "请保持安静",
    "火车站", "第三站台", "生日快乐", "夜市", "新鲜面包", "好好学习", "一路平安",
)
COLORS = {
    "white": (245, 245, 245), "black": (20, 20, 20), "red": (200, 30, 40), "dark blue": (20, 40, 120),
    "yellow": (240, 210, 40), "green": (30, 140, 60), "orange": (235, 120, 30), "purple": (110, 50, 150),
    "light blue": (150, 200, 240), "pink": (240, 160, 190), "gray": (128, 128, 128), "brown": (120, 80, 40),
    "cream": (245, 235, 205), "teal": (30, 130, 130),
}
SIZES = ((320, 320), (384, 288), (288, 384), (384, 256), (256, 384), (448, 256), (256, 448), (352, 352))


def find_font(candidates) -> str | None:
    for pattern in candidates:
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


def load_font(path: str | None, size: int):
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable built-in font (needs FreeType)


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _background(rng: random.Random, size) -> tuple[Image.Image, str, tuple]:
    """A simple background and its description; returns the mean colour for picking a text colour."""
    w, h = size
    names = list(COLORS)
    a, b = rng.sample(names, 2)
    ca, cb = COLORS[a], COLORS[b]
    kind = rng.choice(("gradient", "gradient", "stripes", "dots", "split"))
    img = Image.new("RGB", size, ca)
    draw = ImageDraw.Draw(img)
    if kind == "gradient":
        vertical = rng.random() < 0.5
        n = h if vertical else w
        for i in range(n):
            t = i / max(1, n - 1)
            col = tuple(int(ca[k] * (1 - t) + cb[k] * t) for k in range(3))
            draw.line([(0, i), (w, i)] if vertical else [(i, 0), (i, h)], fill=col)
        desc = f"a {'vertical' if vertical else 'horizontal'} {a} to {b} gradient background"
    elif kind == "stripes":
        step = rng.choice((16, 24, 32))
        for x in range(-h, w, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=cb)
        desc = f"a background of diagonal {a} and {b} stripes"
    elif kind == "dots":
        for _ in range(rng.randint(12, 30)):
            r = rng.randint(6, 28)
            x, y = rng.randint(0, w), rng.randint(0, h)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=cb)
        desc = f"a {a} background with scattered {b} circles"
    else:
        draw.rectangle([0, h // 2, w, h], fill=cb)
        desc = f"a background split into {a} on top and {b} below"
    mean = tuple(int((ca[k] + cb[k]) / 2) for k in range(3))
    return img, desc, mean


def _text_color(rng: random.Random, bg_mean) -> tuple[str, tuple]:
    """A named colour contrasting with the background (by luma), so the text stays readable."""
    options = [n for n, c in COLORS.items() if abs(_luma(c) - _luma(bg_mean)) > 90]
    name = rng.choice(options or ["black" if _luma(bg_mean) > 128 else "white"])
    return name, COLORS[name]


def _wrap_lines(rng: random.Random, language: str) -> list[str]:
    phrases = ZH_PHRASES if language == "zh" else EN_PHRASES
    return rng.sample(phrases, rng.randint(1, 3))


def render_sample(seed: int, shard: int, index: int, cjk_font: str | None, latin_font: str | None,
                  languages=("en", "zh")) -> tuple[bytes, str, dict]:
    """One sample: (JPEG bytes, caption, img2dataset-style metadata)."""
    digest = hashlib.sha256(f"{seed}/{shard}/{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    usable = [lang for lang in languages if lang == "en" or (lang == "zh" and cjk_font)]
    language = rng.choice(usable)
    size = rng.choice(SIZES)
    img, bg_desc, bg_mean = _background(rng, size)
    color_name, color = _text_color(rng, bg_mean)
    lines = _wrap_lines(rng, language)
    font_path = cjk_font if language == "zh" else latin_font
    w, h = size
    margin = max(8, w // 16)
    draw = ImageDraw.Draw(img)
    # Largest font (<= h / (1.6 lines)) whose widest line fits between the margins.
    font_size = max(12, int(h / (len(lines) * 1.6 + 1)))
    font = load_font(font_path, font_size)
    while font_size > 12 and max(draw.textlength(s, font=font) for s in lines) > w - 2 * margin:
        font_size = max(12, int(font_size * 0.9))
        font = load_font(font_path, font_size)
    boxes = [draw.textbbox((0, 0), s, font=font) for s in lines]
    heights = [b[3] - b[1] for b in boxes]
    gap = font_size // 3
    y = (h - (sum(heights) + gap * (len(lines) - 1))) // 2
    align = rng.choice(("centred", "left-aligned"))
    for s, b, lh in zip(lines, boxes, heights):
        tw = b[2] - b[0]
        x = (w - tw) // 2 if align == "centred" else margin
        draw.text((x - b[0], y - b[1]), s, font=font, fill=color)
        y += lh + gap
    quoted = " / ".join(lines)
    n = len(lines)
    script = "Chinese characters" if language == "zh" else "letters"
    caption = (f"A {w}x{h} image of {bg_desc}, with the text \"{quoted}\" written in {color_name} {script}, "
               f"{align}, on {n} line{'s' if n > 1 else ''}.")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    meta = {"caption": caption, "text_lines": lines, "language": language, "width": w, "height": h,
            "original_width": w, "original_height": h, "status": "success", "url": None,
            "generator": "producer.synthetic", "category": "text_rendering"}  # producer/categories.py reads it
    return buf.getvalue(), caption, meta


def generate_shards(out_dir: str, num_shards: int = 2, per_shard: int = 16, seed: int = 0,
                    languages=("en", "zh")) -> list[str]:
    """Write `num_shards` img2dataset-layout tars of `per_shard` samples each; returns their paths."""
    if num_shards < 1 or per_shard < 1:
        raise ValueError(f"need at least one shard and one sample per shard, got {num_shards} x {per_shard}")
    unknown = set(languages) - {"en", "zh"}
    if unknown:
        raise ValueError(f"unsupported languages {sorted(unknown)}: choose from en, zh")
    cjk_font = find_font(CJK_FONT_GLOBS) if "zh" in languages else None
    if "zh" in languages and cjk_font is None:
        warnings.warn(f"no CJK font installed (Debian: apt-get install {CJK_DEBIAN_PACKAGE}); "
                      "generating English samples only", stacklevel=2)
    latin_font = find_font(LATIN_FONT_CANDIDATES)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(out_dir, f"{shard:05d}.tar")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            # mtime=0 and fixed ownership make the tar bytes reproducible (TarWriter's defaults embed time).
            with wds.TarWriter(f, keep_meta=False, mtime=0.0, user="synthetic", group="synthetic",
                               mode=0o644, encoder=False) as sink:
                for i in range(per_shard):
                    key = f"{shard:05d}{i:04d}"
                    jpg, caption, meta = render_sample(seed, shard, i, cjk_font, latin_font, languages)
                    meta["key"] = key
                    sink.write({"__key__": key, "jpg": jpg, "txt": caption.encode("utf-8"),
                                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--languages", default="en,zh", help="comma-separated: en, zh")
    args = p.parse_args(argv)
    paths = generate_shards(args.out_dir, args.shards, args.per_shard, args.seed, tuple(args.languages.split(",")))
    print(f"wrote {len(paths)} shards x {args.per_shard} samples to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
