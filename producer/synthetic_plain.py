"""The plain strategy of the synthetic text-rendering samples (producer/synthetic.py): 1-3 lines of text on a
simple background, in a contrasting colour; its layout (PlainLayout) is what the edit pairs
(producer/synthetic_edit.py) change one field of."""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from producer.synthetic_common import (COLORS, EN_PHRASES, SIZES, ZH_PHRASES, Fonts, Rendered, contrasting,
                                       draw_gradient, load_font, sample_rng, script_word)


def background(rng: random.Random, size) -> tuple[Image.Image, str, tuple]:
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


@dataclass(frozen=True)
class PlainLayout:
    """What a plain sample draws: the edit pairs (producer/synthetic_edit.py) change one field of it."""
    size: tuple[int, int]
    background: Image.Image
    background_desc: str
    background_mean: tuple
    color_name: str
    color: tuple
    lines: list[str]
    language: str
    font_path: str | None
    align: str


def plain_layout(rng: random.Random, fonts: Fonts, languages) -> PlainLayout:
    """The random choices of one plain sample, in the generator's order (its output depends on it)."""
    language = rng.choice(fonts.languages(languages))
    size = rng.choice(SIZES)
    img, bg_desc, bg_mean = background(rng, size)
    color_name, color = contrasting(rng, bg_mean)
    lines = rng.sample(ZH_PHRASES if language == "zh" else EN_PHRASES, rng.randint(1, 3))
    align = rng.choice(("centred", "left-aligned"))
    return PlainLayout(size, img, bg_desc, bg_mean, color_name, color, lines, language, fonts.path(language), align)


def plain_font_size(layout: PlainLayout, *line_sets: list[str]) -> int:
    """The largest font (<= h / (1.6 lines)) at which the widest line of every set fits between the margins:
    one size for the source and the target of an edit pair, so that only the edited text changes."""
    w, h = layout.size
    draw = ImageDraw.Draw(layout.background)
    sizes = []
    for lines in line_sets:
        font_size = max(12, int(h / (len(lines) * 1.6 + 1)))
        font = load_font(layout.font_path, font_size)
        while font_size > 12 and max(draw.textlength(s, font=font) for s in lines) > w - 2 * _margin(w):
            font_size = max(12, int(font_size * 0.9))
            font = load_font(layout.font_path, font_size)
        sizes.append(font_size)
    return min(sizes)


def _margin(width: int) -> int:
    return max(8, width // 16)


def draw_plain(layout: PlainLayout, font_size: int) -> Image.Image:
    """The layout's lines on (a copy of) its background, centred vertically."""
    img = layout.background.copy()
    w, h = layout.size
    draw = ImageDraw.Draw(img)
    font = load_font(layout.font_path, font_size)
    boxes = [draw.textbbox((0, 0), s, font=font) for s in layout.lines]
    heights = [b[3] - b[1] for b in boxes]
    gap = font_size // 3
    y = (h - (sum(heights) + gap * (len(layout.lines) - 1))) // 2
    for s, b, lh in zip(layout.lines, boxes, heights):
        tw = b[2] - b[0]
        x = (w - tw) // 2 if layout.align == "centred" else _margin(w)
        draw.text((x - b[0], y - b[1]), s, font=font, fill=layout.color)
        y += lh + gap
    return img


def plain_caption(layout: PlainLayout) -> str:
    w, h = layout.size
    n = len(layout.lines)
    return (f"A {w}x{h} image of {layout.background_desc}, with the text \"{' / '.join(layout.lines)}\" written in "
            f"{layout.color_name} {script_word(layout.language)}, {layout.align}, on {n} line{'s' if n > 1 else ''}.")


def render_plain(seed: int, shard: int, index: int, fonts: Fonts, languages=("en", "zh")) -> Rendered:
    """1-3 lines of text on a simple background, in a contrasting colour."""
    layout = plain_layout(sample_rng(seed, shard, index), fonts, languages)
    img = draw_plain(layout, plain_font_size(layout, layout.lines))
    return Rendered(img, plain_caption(layout), layout.lines, layout.language, "text_rendering", "plain",
                    {"text_lines": layout.lines})
