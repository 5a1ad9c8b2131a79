"""Synthetic text-rendering samples: the three strategies of the Qwen-Image report §3.4.

    python -m producer.synthetic OUT_DIR [--shards 2] [--per-shard 16] [--seed 0] [--languages en,zh]
                                 [--strategy plain|scene|template|all] [--scenes PATH ...]
    python -m producer.synthetic --preview docs/images/synthetic_strategies.png [--scenes PATH ...]  # contact sheet

writes WebDataset shards in the layout img2dataset produces (`OUT_DIR/00000.tar` holding `KEY.jpg`,
`KEY.txt`, `KEY.json` per sample), so the demo and the tests need no downloads. Captions quote the
rendered text exactly, which is what teaches a text-to-image model to render text. Strategies
(`--strategy`; `all` takes them in turn, sample by sample):

- plain (category `text_rendering`, the default): 1-3 lines of text on simple backgrounds (this module).
- scene (`text_in_scene`): text on a sign, a sheet of paper or a screen composed into a scene in
  perspective, lit like the scene (producer/synthetic_scene.py). Scenes are the images of `--scenes`
  (tars, Parquet, image folders; their captions are kept); without them, procedural walls, desks and
  streets, so nothing needs downloading (KEY.json `scene.source` says which).
- template (`text_template`): slides with bullet lists or tables, posters and app screens, the caption
  stating the layout and every text in order (producer/synthetic_template.py).

KEY.json carries `category`, `strategy` and `texts` (every rendered text, in the order the caption
quotes them). Fonts: DejaVu (Debian's fonts-dejavu-core) when present, else Pillow's built-in scalable
font. Chinese samples need a CJK font; the generator looks for WenQuanYi Micro Hei (Debian package
`fonts-wqy-microhei`), WenQuanYi Zen Hei or Noto Sans CJK, and when none is installed it skips Chinese
with a warning (the samples are then English only) — it never renders tofu boxes.

Output is a pure function of (seed, shard, index) — and, for scene samples given `--scenes`, of those
inputs: the same command writes byte-identical shards.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import warnings

import webdataset as wds
from PIL import Image, ImageDraw

from producer.synthetic_common import (CJK_DEBIAN_PACKAGE, CJK_FONT_GLOBS, COLORS, EN_PHRASES,
                                       LATIN_FONT_CANDIDATES, SIZES, ZH_PHRASES, Fonts, Rendered, contrasting,
                                       draw_gradient, find_font, load_font, sample_rng, script_word)
from producer.synthetic_scene import iter_scenes, render_scene
from producer.synthetic_template import render_template

STRATEGIES = ("plain", "scene", "template")
PREVIEW_HEIGHT = 200  # px of each contact-sheet thumbnail
PREVIEW_TITLES = {"plain": "plain: text on simple backgrounds (text_rendering)",
                  "scene": "scene: text composed into a scene in perspective (text_in_scene)",
                  "template": "template: slides, posters, app screens (text_template)"}


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
        draw_gradient(draw, size, ca, cb, vertical)
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


def render_plain(seed: int, shard: int, index: int, fonts: Fonts, languages=("en", "zh")) -> Rendered:
    """1-3 lines of text on a simple background, in a contrasting colour."""
    rng = sample_rng(seed, shard, index)
    language = rng.choice(fonts.languages(languages))
    size = rng.choice(SIZES)
    img, bg_desc, bg_mean = _background(rng, size)
    color_name, color = contrasting(rng, bg_mean)
    lines = rng.sample(ZH_PHRASES if language == "zh" else EN_PHRASES, rng.randint(1, 3))
    font_path = fonts.path(language)
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
    script = script_word(language)
    caption = (f"A {w}x{h} image of {bg_desc}, with the text \"{quoted}\" written in {color_name} {script}, "
               f"{align}, on {n} line{'s' if n > 1 else ''}.")
    return Rendered(img, caption, lines, language, "text_rendering", "plain", {"text_lines": lines})


def render_sample(seed: int, shard: int, index: int, cjk_font: str | None, latin_font: str | None,
                  languages=("en", "zh")) -> tuple[bytes, str, dict]:
    """One plain sample: (JPEG bytes, caption, img2dataset-style metadata)."""
    r = render_plain(seed, shard, index, Fonts(latin_font, cjk_font), languages)
    return encode_jpeg(r.image), r.caption, sample_meta(r)


def render(strategy: str, seed: int, shard: int, index: int, fonts: Fonts, languages, scenes=None) -> Rendered:
    """One sample of `strategy`; `scenes` (an iter_scenes iterator, or None for procedural ones) feeds scene samples."""
    if strategy == "plain":
        return render_plain(seed, shard, index, fonts, languages)
    if strategy == "scene":
        return render_scene(seed, shard, index, fonts, languages, next(scenes) if scenes is not None else None)
    return render_template(seed, shard, index, fonts, languages)


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample_meta(r: Rendered) -> dict:
    """The KEY.json img2dataset writes, plus what the generator knows (producer/categories.py reads `category`)."""
    w, h = r.image.size
    return {"caption": r.caption, "texts": r.texts, "language": r.language, "width": w, "height": h,
            "original_width": w, "original_height": h, "status": "success", "url": None,
            "generator": "producer.synthetic", "category": r.category, "strategy": r.strategy, **r.extra}


def _strategies(strategy: str) -> tuple[str, ...]:
    if strategy == "all":
        return STRATEGIES
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)} or all")
    return (strategy,)


def _fonts(languages) -> Fonts:
    unknown = set(languages) - {"en", "zh"}
    if unknown:
        raise ValueError(f"unsupported languages {sorted(unknown)}: choose from en, zh")
    cjk_font = find_font(CJK_FONT_GLOBS) if "zh" in languages else None
    if "zh" in languages and cjk_font is None:
        warnings.warn(f"no CJK font installed (Debian: apt-get install {CJK_DEBIAN_PACKAGE}); "
                      "generating English samples only", stacklevel=3)
    return Fonts(find_font(LATIN_FONT_CANDIDATES), cjk_font)


def generate_shards(out_dir: str, num_shards: int = 2, per_shard: int = 16, seed: int = 0,
                    languages=("en", "zh"), *, strategy: str = "plain", scenes=()) -> list[str]:
    """Write `num_shards` img2dataset-layout tars of `per_shard` samples each; returns their paths.
    `strategy` "all" takes the strategies in turn by global sample number; `scenes` (input paths) are the
    backgrounds of scene samples, else procedural scenes are drawn."""
    if num_shards < 1 or per_shard < 1:
        raise ValueError(f"need at least one shard and one sample per shard, got {num_shards} x {per_shard}")
    strategies = _strategies(strategy)
    if scenes and "scene" not in strategies:
        raise ValueError(f"scene inputs are used by the scene strategy only (strategy is {strategy!r})")
    fonts = _fonts(languages)
    scene_iter = iter_scenes(scenes) if scenes else None
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
                    kind = strategies[(shard * per_shard + i) % len(strategies)]
                    r = render(kind, seed, shard, i, fonts, languages, scene_iter)
                    meta = {**sample_meta(r), "key": key}
                    sink.write({"__key__": key, "jpg": encode_jpeg(r.image), "txt": r.caption.encode("utf-8"),
                                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_preview(path: str, seed: int = 0, languages=("en", "zh"), scenes=(), per_row: int = 4) -> list[str]:
    """A contact sheet PNG, one row per strategy, languages alternating; with `scenes`, the second half of
    the scene row is composed into them (the first half into procedural scenes). Returns the captions."""
    fonts = _fonts(languages)
    langs = fonts.languages(languages)
    scene_iter = iter_scenes(scenes) if scenes else None
    label_font = load_font(fonts.latin, 15)
    rows, captions = [], []
    for kind in STRATEGIES:
        thumbs = []
        for i in range(per_row):
            given = scene_iter if i >= per_row // 2 else None
            r = render(kind, seed, 0, i, fonts, (langs[i % len(langs)],), given)
            w, h = r.image.size
            thumbs.append(r.image.resize((round(w * PREVIEW_HEIGHT / h), PREVIEW_HEIGHT), Image.Resampling.LANCZOS))
            captions.append(f"{kind}: {r.caption}")
        rows.append((PREVIEW_TITLES[kind], thumbs))
    gap, band = 8, 24
    width = max(sum(t.width for t in thumbs) + gap * (len(thumbs) + 1) for _, thumbs in rows)
    sheet = Image.new("RGB", (width, len(rows) * (band + PREVIEW_HEIGHT + gap) + gap), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    y = gap
    for title, thumbs in rows:
        d.text((gap, y + 3), title, font=label_font, fill=(20, 20, 20))
        x = gap
        for t in thumbs:
            sheet.paste(t, (x, y + band))
            x += t.width + gap
        y += band + PREVIEW_HEIGHT + gap
    # A dithered 256-colour palette keeps the PNG small enough for the docs (photographic thumbnails, lossless).
    palette = sheet.quantize(256, method=Image.Quantize.MEDIANCUT)
    sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    return captions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m producer.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="where the shards go (not needed with --preview)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--languages", default="en,zh", help="comma-separated: en, zh")
    p.add_argument("--strategy", default="plain", choices=(*STRATEGIES, "all"),
                   help="plain: text on backgrounds; scene: text in scenes; template: slides/posters/screens; "
                        "all: each in turn (default: plain)")
    p.add_argument("--scenes", nargs="+", default=(), metavar="PATH",
                   help="tars / Parquet files / image folders whose images are the scene strategy's backgrounds "
                        "(default: procedural scenes)")
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet of every strategy to PNG instead of shards")
    args = p.parse_args(argv)
    languages = tuple(args.languages.split(","))
    if args.preview:
        for caption in write_preview(args.preview, args.seed, languages, args.scenes):
            print(caption)
        print(f"wrote {args.preview}", file=sys.stderr)
        return 0
    if not args.out_dir:
        p.error("give OUT_DIR (or --preview PNG)")
    paths = generate_shards(args.out_dir, args.shards, args.per_shard, args.seed, languages,
                            strategy=args.strategy, scenes=args.scenes)
    print(f"wrote {len(paths)} shards x {args.per_shard} {args.strategy} samples to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
