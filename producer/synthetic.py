"""Synthetic text-rendering samples: the three strategies of the Qwen-Image report §3.4.

    python -m producer.synthetic OUT_DIR [--shards 2] [--per-shard 16] [--seed 0] [--languages en,zh]
                                 [--strategy plain|scene|template|all] [--scenes PATH ...]
    python -m producer.synthetic --preview docs/images/synthetic_strategies.png [--scenes PATH ...]  # contact sheet
    python -m producer.synthetic OUT_DIR --task edit   # edit triplets (producer/synthetic_edit.py)

writes WebDataset shards in the layout img2dataset produces (`OUT_DIR/00000.tar` holding `KEY.jpg`,
`KEY.txt`, `KEY.json` per sample), so the demo and the tests need no downloads. Captions quote the
rendered text exactly, which is what teaches a text-to-image model to render text. Strategies
(`--strategy`; `all` takes them in turn, sample by sample):

- plain (category `text_rendering`, the default): 1-3 lines of text on simple backgrounds
  (producer/synthetic_plain.py).
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

`--task edit` writes edit triplets instead (image-editing training, docs/editing.md): a plain sample, the same
sample with its text, text colour or background changed, and the instruction that says how
(producer/synthetic_edit.py).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import webdataset as wds
from PIL import Image, ImageDraw

from producer.synthetic_common import Fonts, Rendered, fonts_for, load_font, save_palette_png
from producer.synthetic_edit import EditPair, edit_meta, render_edit, write_edit_preview
from producer.synthetic_plain import render_plain
from producer.synthetic_scene import iter_scenes, render_scene
from producer.synthetic_template import render_template

STRATEGIES = ("plain", "scene", "template")
TASKS = ("t2i", "edit")
PREVIEW_HEIGHT = 200  # px of each contact-sheet thumbnail
PREVIEW_TITLES = {"plain": "plain: text on simple backgrounds (text_rendering)",
                  "scene": "scene: text composed into a scene in perspective (text_in_scene)",
                  "template": "template: slides, posters, app screens (text_template)"}


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


def generate_shards(out_dir: str, num_shards: int = 2, per_shard: int = 16, seed: int = 0,
                    languages=("en", "zh"), *, strategy: str = "plain", scenes=(), task: str = "t2i") -> list[str]:
    """Write `num_shards` img2dataset-layout tars of `per_shard` samples each; returns their paths.
    `strategy` "all" takes the strategies in turn by global sample number; `scenes` (input paths) are the
    backgrounds of scene samples, else procedural scenes are drawn. `task` "edit": edit triplets
    (producer/synthetic_edit.py: KEY.src.png, KEY.jpg, KEY.txt instruction, KEY.json) of plain samples."""
    if num_shards < 1 or per_shard < 1:
        raise ValueError(f"need at least one shard and one sample per shard, got {num_shards} x {per_shard}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    strategies = _strategies(strategy)
    if task == "edit" and (strategies != ("plain",) or scenes):
        raise ValueError(f"edit pairs are drawn from the plain strategy only (strategy is {strategy!r}"
                         f"{', scenes given' if scenes else ''})")
    if scenes and "scene" not in strategies:
        raise ValueError(f"scene inputs are used by the scene strategy only (strategy is {strategy!r})")
    fonts = fonts_for(languages)
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
                    if task == "edit":
                        sink.write(_edit_record(key, render_edit(seed, shard, i, fonts, languages)))
                        continue
                    kind = strategies[(shard * per_shard + i) % len(strategies)]
                    r = render(kind, seed, shard, i, fonts, languages, scene_iter)
                    meta = {**sample_meta(r), "key": key}
                    sink.write({"__key__": key, "jpg": encode_jpeg(r.image), "txt": r.caption.encode("utf-8"),
                                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _edit_record(key: str, pair: EditPair) -> dict:
    """The tar members of one edit triplet: the source lossless (it is the model's input), the target as JPEG."""
    buf = io.BytesIO()
    pair.source.save(buf, format="PNG")
    meta = {**edit_meta(pair), "key": key}
    return {"__key__": key, "src.png": buf.getvalue(), "jpg": encode_jpeg(pair.target),
            "txt": pair.instruction.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}


def write_preview(path: str, seed: int = 0, languages=("en", "zh"), scenes=(), per_row: int = 4) -> list[str]:
    """A contact sheet PNG, one row per strategy, languages alternating; with `scenes`, the second half of
    the scene row is composed into them (the first half into procedural scenes). Returns the captions."""
    fonts = fonts_for(languages)
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
    save_palette_png(sheet, path)
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
    p.add_argument("--task", default="t2i", choices=TASKS,
                   help="t2i: image-caption samples; edit: edit triplets (source, instruction, target) of plain "
                        "samples, for image-editing training (default: t2i)")
    p.add_argument("--preview", metavar="PNG", help="write a contact sheet of every strategy (with --task edit: "
                                                    "of every edit) to PNG instead of shards")
    args = p.parse_args(argv)
    languages = tuple(args.languages.split(","))
    if args.preview:
        lines = (write_edit_preview(args.preview, args.seed, languages) if args.task == "edit"
                 else write_preview(args.preview, args.seed, languages, args.scenes))
        for caption in lines:
            print(caption)
        print(f"wrote {args.preview}", file=sys.stderr)
        return 0
    if not args.out_dir:
        p.error("give OUT_DIR (or --preview PNG)")
    try:
        paths = generate_shards(args.out_dir, args.shards, args.per_shard, args.seed, languages,
                                strategy=args.strategy, scenes=args.scenes, task=args.task)
    except ValueError as e:
        p.error(str(e))
    kind = "edit triplets" if args.task == "edit" else f"{args.strategy} samples"
    print(f"wrote {len(paths)} shards x {args.per_shard} {kind} to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
