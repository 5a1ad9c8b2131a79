"""A PNG contact sheet of generated images with each prompt written under its image.

Cells are as large as the largest image (at least MIN_CELL_WIDTH wide, so a caption under 64-px test
images still holds a few words); each image is centred in its cell's image area, its caption wrapped
under it in Pillow's default font (a scalable TrueType font since Pillow 10.1), sized with the cell
width so that it reads the same in a grid of 64-px and of 1328-px images. Pillow's default font has no
CJK glyphs: Chinese captions render as boxes.
"""
from __future__ import annotations

import io
import math
import os
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from megatron_qwen_image.fsutil import atomic_replace

MIN_CELL_WIDTH = 160
ELLIPSIS = "…"


def caption_font(cell_width: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(12, cell_width // 40))


def wrap_caption(caption: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """`caption` wrapped into lines at most `width` pixels wide, cut with an ellipsis after `max_lines`."""
    chars = max(1, int(width / (font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))
    while True:  # the character estimate may be too wide for a caption of wide letters: narrow it until all fit
        lines = textwrap.wrap(caption, chars, max_lines=max_lines, placeholder=ELLIPSIS)
        if chars == 1 or all(font.getlength(line) <= width for line in lines):
            return lines
        chars -= 1


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int | None = None,
               caption_lines: int = 3) -> Image.Image:
    """Images in a row-major grid (`columns` defaults to ceil(sqrt(n))), each with its caption below."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(captions)} captions")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if caption_lines < 0:
        raise ValueError(f"caption_lines must be >= 0, got {caption_lines}")
    n = len(images)
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    image_w = max(im.width for im in images)
    image_h = max(im.height for im in images)
    cell_w = max(image_w, MIN_CELL_WIDTH)
    font = caption_font(cell_w)
    ascent, descent = font.getmetrics()
    line_h = ascent + descent
    pad = max(4, line_h // 2)
    cell_h = image_h + (pad + caption_lines * line_h if caption_lines else 0)
    grid = Image.new("RGB", (pad + columns * (cell_w + pad), pad + rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, caption) in enumerate(zip(images, captions)):
        x0 = pad + (i % columns) * (cell_w + pad)
        y0 = pad + (i // columns) * (cell_h + pad)
        grid.paste(im.convert("RGB"), (x0 + (cell_w - im.width) // 2, y0 + (image_h - im.height) // 2))
        lines = wrap_caption(caption, font, cell_w, caption_lines) if caption_lines else []
        for j, line in enumerate(lines):
            x = x0 + (cell_w - font.getlength(line)) / 2
            draw.text((x, y0 + image_h + pad + j * line_h), line, fill="black", font=font)
    return grid


def save_png(image: Image.Image, path: str) -> None:
    """Write `image` as PNG at `path` atomically, creating its directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_replace(path, buf.getvalue(), directory)
