"""Synthetic edit triplets (source image, instruction, target image) for image-editing training (report §4.3).

    python -m producer.synthetic OUT_DIR --task edit [--shards 2] [--per-shard 16] [--seed 0] [--languages en,zh]
    python -m producer.synthetic --preview docs/images/synthetic_edits.png --task edit

A pair is a plain text-rendering sample (producer/synthetic_plain.py) and the same sample with one change, which the
instruction states exactly:

- replace_text:     Change the text "Fresh Coffee" to "Night Market".
- text_color:       Make the text red instead of dark blue.
- background_color: Change the background to diagonal teal and cream stripes.
- add_text:         Add the line "Room 204" below the text.
- remove_text:      Remove the line "Exit".

Source and target share the background, font, font size and alignment, so what differs between them is what the
instruction says. Shards are in the edit layout the producer reads (docs/editing.md): `KEY.src.png` (the source,
lossless), `KEY.jpg` (the target), `KEY.txt` (the instruction) and `KEY.json` (category `text_edit`, the edit,
the texts of both images and a caption of the target). Output is a pure function of (seed, shard, index).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from producer.synthetic_common import (COLORS, EN_PHRASES, ZH_PHRASES, Fonts, fonts_for, load_font, luma, sample_rng,
                                       save_palette_png)
from producer.synthetic_plain import PlainLayout, background, draw_plain, plain_caption, plain_font_size, plain_layout

EDITS = ("replace_text", "text_color", "background_color", "add_text", "remove_text")
CATEGORY = "text_edit"
_READABLE = 90  # luma distance between text and background, as synthetic_common.contrasting keeps it


@dataclass(frozen=True)
class EditPair:
    """One synthetic edit: the source and target pictures and what KEY.txt / KEY.json record."""
    source: Image.Image
    target: Image.Image
    instruction: str
    edit: str                 # one of EDITS
    source_texts: list[str]
    target_texts: list[str]
    target_caption: str       # the target described as a text-to-image caption
    language: str


def _readable(color, background) -> bool:
    return abs(luma(color) - luma(background)) > _READABLE


def _edit(kind: str, src: PlainLayout, rng: random.Random) -> tuple[PlainLayout, str] | None:
    """The target layout and the instruction of edit `kind`, or None where it does not apply to `src`."""
    phrases = ZH_PHRASES if src.language == "zh" else EN_PHRASES
    unused = [p for p in phrases if p not in src.lines]
    if kind == "replace_text":
        i = rng.randrange(len(src.lines))
        new = rng.choice(unused)
        lines = [*src.lines[:i], new, *src.lines[i + 1:]]
        return replace(src, lines=lines), f'Change the text "{src.lines[i]}" to "{new}".'
    if kind == "text_color":
        options = [n for n in COLORS if n != src.color_name and _readable(COLORS[n], src.background_mean)]
        if not options:
            return None
        name = rng.choice(options)
        return (replace(src, color_name=name, color=COLORS[name]),
                f"Make the text {name} instead of {src.color_name}.")
    if kind == "background_color":
        for _ in range(20):  # another of the plain strategy's backgrounds, behind which the text stays readable
            image, desc, mean = background(rng, src.size)
            if desc != src.background_desc and _readable(src.color, mean):
                bare = desc.removeprefix("a background of ").removeprefix("a background split into ")
                return (replace(src, background=image, background_desc=desc, background_mean=mean),
                        f"Change the background to {bare}.")
        return None
    if kind == "add_text":
        if len(src.lines) >= 3:
            return None
        new = rng.choice(unused)
        return replace(src, lines=[*src.lines, new]), f'Add the line "{new}" below the text.'
    if kind == "remove_text":
        if len(src.lines) < 2:
            return None
        i = rng.randrange(len(src.lines))
        return replace(src, lines=[*src.lines[:i], *src.lines[i + 1:]]), f'Remove the line "{src.lines[i]}".'
    raise ValueError(f"unknown edit {kind!r}: choose from {', '.join(EDITS)}")


def render_edit(seed: int, shard: int, index: int, fonts: Fonts, languages=("en", "zh"),
                kind: str | None = None) -> EditPair:
    """Edit pair (seed, shard, index): a random applicable edit, or `kind` (ValueError if it does not apply to
    this position's source)."""
    rng = sample_rng(seed, shard, index, "edit")
    src = plain_layout(rng, fonts, languages)
    kinds = [kind] if kind is not None else list(EDITS)
    rng.shuffle(kinds)
    for k in kinds:
        done = _edit(k, src, rng)
        if done is not None:
            break
    else:
        raise ValueError(f"edit {kind!r} does not apply to sample {seed}/{shard}/{index} ({src.lines})")
    dst, instruction = done
    size = plain_font_size(src, src.lines, dst.lines)
    return EditPair(draw_plain(src, size), draw_plain(dst, size), instruction, k, list(src.lines), list(dst.lines),
                    plain_caption(dst), src.language)


def edit_meta(pair: EditPair) -> dict:
    """KEY.json of an edit triplet: what img2dataset would write for the target, the instruction as its caption,
    and what the generator knows (producer/categories.py reads `category`)."""
    w, h = pair.target.size
    return {"caption": pair.instruction, "instruction": pair.instruction, "edit": pair.edit,
            "texts": pair.target_texts, "source_texts": pair.source_texts, "target_caption": pair.target_caption,
            "language": pair.language, "width": w, "height": h, "original_width": w, "original_height": h,
            "status": "success", "url": None, "generator": "producer.synthetic", "category": CATEGORY,
            "strategy": "edit"}


def write_edit_preview(path: str, seed: int = 0, languages=("en", "zh"), per_row: int = 2,
                       height: int = 150) -> list[str]:
    """A contact sheet PNG: one row per edit kind, `per_row` pairs (source, then target) with their instruction
    under them, languages alternating. Returns the instructions."""
    fonts = fonts_for(languages)
    langs = fonts.languages(languages)
    label = load_font(fonts.latin, 14)
    gap, band, note = 8, 22, 20
    rows, instructions = [], []
    for row, kind in enumerate(EDITS):
        pairs, index = [], 10 * row  # each row from other positions: other sources
        while len(pairs) < per_row:
            try:
                pair = render_edit(seed, 0, index, fonts, (langs[len(pairs) % len(langs)],), kind)
            except ValueError:  # this position's source does not allow the edit: the next one
                pair = None
            index += 1
            if pair is not None:
                pairs.append(pair)
                instructions.append(f"{kind}: {pair.instruction}")
        rows.append((kind, pairs))
    thumb = lambda im: im.resize((round(im.width * height / im.height), height), Image.Resampling.LANCZOS)  # noqa: E731
    cells = [[(thumb(p.source), thumb(p.target), p.instruction, load_font(fonts.path(p.language), 14)) for p in pairs]
             for _, pairs in rows]
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pair_w = [[max(s.width + gap // 2 + t.width, int(d.textlength(i, font=f))) for s, t, i, f in row] for row in cells]
    width = max(sum(ws) + 3 * gap * (len(ws) + 1) for ws in pair_w)
    sheet = Image.new("RGB", (width, len(rows) * (band + height + note + gap) + gap), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    y = gap
    for (kind, _), row, widths in zip(rows, cells, pair_w):
        d.text((gap, y + 3), f"{kind}: source -> target", font=label, fill=(20, 20, 20))
        x = gap
        for (src, dst, instruction, font), w in zip(row, widths):  # the pair's own script: a Chinese instruction quotes Chinese
            sheet.paste(src, (x, y + band))
            sheet.paste(dst, (x + src.width + gap // 2, y + band))
            d.text((x, y + band + height + 3), instruction, font=font, fill=(60, 60, 60))
            x += w + 3 * gap
        y += band + height + note + gap
    save_palette_png(sheet, path)
    return instructions
