"""Compositional rendering in contextual scenes (Qwen-Image report §3.4): text on a sign, a sheet of paper
or a screen, warped into a scene in perspective and lit like the spot it lands on.

Scenes come from the `--scenes` inputs (tars, Parquet files, image folders, read by producer.sources):
the k-th scene sample takes the k-th usable image (in the order producer.sources reads them, cycling when
they run out) and keeps that image's caption. Real scenes are the point: they teach a model text in
context. Without inputs each sample draws a procedural scene (a brick wall, a wooden desk, a street) from
its own seed, so the tests and the demo need no downloads; KEY.json's `scene.source` says which was used.

The surface is placed over the least detailed of a few random spots (a wall, the sky, a table top rather
than a face), drawn flat, scaled in brightness towards the mean luminance of the scene region it covers,
shaded by a gradient, then warped onto a quadrilateral (`Image.transform(..., PERSPECTIVE)` with the 8
coefficients solved from the 4 corner correspondences) over a soft, blurred shadow. Pixels farther than
SHADOW_MARGIN from the quadrilateral's bounding box are the resized scene's, unchanged.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from producer.sources import RawSample, discover_shards, iter_shard
from producer.synthetic_common import (COLORS, EN_PHRASES, SIZES, ZH_PHRASES, Fonts, Rendered, contrasting,
                                       draw_gradient, draw_lines, fit_font, sample_rng, script_word)

SHADOW_OFFSET = 6  # px, at most, in x and y
SHADOW_BLUR = 4  # Gaussian radius
SHADOW_MARGIN = SHADOW_OFFSET + 3 * SHADOW_BLUR + 2  # beyond this the scene is untouched (blur tail + resampling)
MIN_SCENE_SIDE = 256  # the producer's default filters.min_side: smaller scenes would be upscaled into blur
PLACEMENT_TRIES = 6  # candidate spots for the surface; the one over the least scene detail wins
SURFACES = ("sign", "paper", "screen")
ASPECTS = {"sign": (1.6, 2.4), "paper": (0.75, 1.3), "screen": (1.4, 1.8)}  # width / height ranges
SIGN_COLORS = ("dark blue", "green", "red", "brown", "white", "yellow", "black", "teal")


@dataclass
class Scene:
    """A background picture and what is known about it."""

    image: Image.Image
    caption: str | None  # the input's own caption, or the procedural scene's description
    source: str  # "input" | "procedural"
    key: str = ""  # the input sample's key / the procedural kind
    origin: str = ""  # the input's work unit


def perspective_coeffs(src, dst) -> tuple[float, ...]:
    """The 8 coefficients (a..h) of the projective map taking each src[i] to dst[i]:
    (x, y) -> ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)).
    PIL's PERSPECTIVE transform wants the map from *output* to *input* pixels, so warping a flat surface
    onto a quad is `surface.transform(size, PERSPECTIVE, perspective_coeffs(quad, surface_corners))`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    coeffs, *_ = np.linalg.lstsq(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64), rcond=None)
    return tuple(float(c) for c in coeffs)


def apply_perspective(coeffs, points) -> np.ndarray:
    a, b, c, d, e, f, g, h = coeffs
    p = np.asarray(points, dtype=np.float64)
    den = g * p[:, 0] + h * p[:, 1] + 1
    return np.stack([(a * p[:, 0] + b * p[:, 1] + c) / den, (d * p[:, 0] + e * p[:, 1] + f) / den], axis=1)


def scene_size(w: int, h: int) -> tuple[int, int]:
    """The output size (one of SIZES) closest to the scene's aspect ratio, so little is cropped."""
    return min(SIZES, key=lambda s: (abs(math.log(s[0] / s[1]) - math.log(w / h)), s))


def fit_scene(image: Image.Image, size) -> Image.Image:
    """The scene resized to cover `size` and centre-cropped: the background the text is composed into."""
    return ImageOps.fit(image.convert("RGB"), size, Image.Resampling.BICUBIC)


def iter_scenes(inputs) -> Iterator[Scene]:
    """The usable images of `inputs` (decodable, shorter side >= MIN_SCENE_SIDE), in producer.sources order,
    cycling forever; ValueError when a whole pass finds none."""
    specs = discover_shards(list(inputs))
    while True:
        found = 0
        for spec in specs:
            for rec in iter_shard(spec):
                if not isinstance(rec, RawSample):
                    continue  # bad records are the producer's to report, not a scene
                try:
                    img = ImageOps.exif_transpose(Image.open(io.BytesIO(rec.image))).convert("RGB")
                except Exception:  # any undecodable image: skip it
                    continue
                if min(img.size) < MIN_SCENE_SIDE:
                    continue
                caption = rec.caption.decode("utf-8", "replace").strip() if rec.caption else None
                found += 1
                yield Scene(img, caption or None, "input", rec.key, spec.work_unit)
        if not found:
            raise ValueError(f"no usable scene image (decodable, >= {MIN_SCENE_SIDE} px) in {list(inputs)}")


# ------------------------------------------------------------------ procedural scenes

def _jitter(rng: random.Random, c, amount: int) -> tuple:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in c)


def procedural_scene(rng: random.Random, size) -> Scene:
    """A wall, desk or street drawn from shapes and gradients (stand-in for real scenes; see module doc)."""
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    kind = rng.choice(("wall", "desk", "street"))
    if kind == "wall":
        name, base = rng.choice((("red", (150, 70, 55)), ("beige", (200, 180, 150)), ("gray", (135, 135, 130))))
        bh = rng.randint(14, 22)
        d.rectangle([0, 0, w, h], fill=tuple(int(v * 0.82) for v in base))  # mortar: low contrast, little texture
        for row, y in enumerate(range(0, h, bh)):
            for x in range(-(row % 2) * bh, w, 2 * bh + bh // 4):
                d.rectangle([x + 1, y + 1, x + 2 * bh, y + bh - 2], fill=_jitter(rng, base, 14))
        desc = f"A {name} brick wall"
    elif kind == "desk":
        wood = rng.choice(((150, 105, 65), (120, 80, 50), (185, 145, 100)))
        d.rectangle([0, 0, w, h], fill=wood)
        for y in range(0, h, 6):  # wavy grain lines
            shade = _jitter(rng, tuple(int(v * 0.9) for v in wood), 6)
            phase, amp = rng.random() * 6.28, rng.uniform(1, 3)
            d.line([(x, y + amp * math.sin(x / 23 + phase)) for x in range(0, w + 8, 8)], fill=shade, width=2)
        mx, my, r = rng.randint(w // 8, w // 3), rng.randint(h // 8, h // 3), max(18, w // 12)
        d.ellipse([mx - r, my - r, mx + r, my + r], fill=COLORS[rng.choice(("white", "teal", "red"))])
        d.ellipse([mx - r // 2, my - r // 2, mx + r // 2, my + r // 2], fill=(70, 45, 30))  # the coffee
        px, py = rng.randint(w // 2, w - 20), rng.randint(h * 2 // 3, h - 10)
        d.line([(px - w // 5, py + 6), (px, py)], fill=(30, 30, 90), width=5)
        desc = "A wooden desk with a coffee mug and a pen"
    else:
        sky = rng.choice((((110, 160, 220), (200, 225, 245), "blue"), ((240, 170, 110), (250, 220, 170), "sunset")))
        horizon = int(h * rng.uniform(0.55, 0.7))
        draw_gradient(d, (w, horizon), sky[0], sky[1])
        x = 0
        while x < w:  # buildings with window grids
            bw, top = rng.randint(w // 6, w // 3), rng.randint(h // 6, horizon - 20)
            col = _jitter(rng, (150, 140, 130), 30)
            d.rectangle([x, top, x + bw, horizon], fill=col)
            for wy in range(top + 8, horizon - 12, 16):
                for wx in range(x + 6, x + bw - 10, 14):
                    d.rectangle([wx, wy, wx + 7, wy + 9], fill=tuple(int(v * 0.7) for v in col))
            x += bw + rng.randint(0, 6)
        d.rectangle([0, horizon, w, h], fill=(85, 85, 90))
        for x in range(0, w, 40):
            d.rectangle([x, (horizon + h) // 2 - 2, x + 20, (horizon + h) // 2 + 2], fill=(230, 230, 220))
        desc = f"A city street under a {sky[2]} sky"
    return Scene(img, desc, "procedural", kind)


# ------------------------------------------------------------------ the surface and its placement

def _surface(rng: random.Random, kind: str, size, lines: list[str], font_path) -> tuple[Image.Image, str, str]:
    """The flat surface with the text on it; returns it, its description and the text colour's name."""
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    if kind == "sign":
        board = rng.choice(SIGN_COLORS)
        border_name, border = contrasting(rng, COLORS[board])
        d.rectangle([0, 0, w, h], fill=border)
        pad = max(3, w // 30)
        d.rectangle([pad, pad, w - pad, h - pad], fill=COLORS[board])
        color_name, color = contrasting(rng, COLORS[board])
        desc, inner = f"a {board} sign with a {border_name} border", (2 * pad, 2 * pad, w - 2 * pad, h - 2 * pad)
    elif kind == "paper":
        sheet = rng.choice(("white", "cream"))
        d.rectangle([0, 0, w, h], fill=COLORS[sheet])
        color_name, color = rng.choice([(n, COLORS[n]) for n in ("black", "dark blue", "red")])
        desc, inner = f"a sheet of {sheet} paper", (w * 0.1, h * 0.1, w * 0.9, h * 0.9)
    else:
        d.rectangle([0, 0, w, h], fill=(35, 35, 38))  # bezel
        bez = max(4, w // 18)
        screen = rng.choice(((15, 15, 20), (20, 40, 120)))
        d.rectangle([bez, bez, w - bez, h - bez], fill=screen)
        color_name, color = contrasting(rng, screen, ("white", "light blue", "yellow", "green"))
        desc, inner = "a screen", (2 * bez, 2 * bez, w - 2 * bez, h - 2 * bez)
    iw, ih = inner[2] - inner[0], inner[3] - inner[1]
    font = fit_font(d, lines, font_path, iw, ih, start=ih / (len(lines) * 1.4))
    draw_lines(d, lines, inner, font, color, align="centre" if kind != "paper" or rng.random() < 0.5 else "left")
    return img, desc, color_name


def _quad(rng: random.Random, background: Image.Image, aspect: float) -> list[tuple[float, float]]:
    """Corners (TL, TR, BR, BL) of a surface of `aspect` seen slightly from the side and rotated, inside
    the image with room for its shadow, at the least detailed of PLACEMENT_TRIES spots: a wall, the sky
    or a table top rather than a face."""
    w, h = background.size
    qw = rng.uniform(0.45, 0.65) * w
    qh = min(qw / aspect, 0.55 * h)
    qw = qh * aspect
    yaw, tilt, angle = rng.uniform(-0.2, 0.2), rng.uniform(0, 0.12), math.radians(rng.uniform(-8, 8))
    corners = [(-qw / 2 * (1 - tilt), -qh / 2 * (1 - yaw)), (qw / 2 * (1 - tilt), -qh / 2 * (1 + yaw)),
               (qw / 2, qh / 2 * (1 + yaw)), (-qw / 2, qh / 2 * (1 - yaw))]
    ca, sa = math.cos(angle), math.sin(angle)
    pts = np.array([(x * ca - y * sa, x * sa + y * ca) for x, y in corners])
    room = np.array([w, h]) - 2 * (SHADOW_MARGIN + 2)
    pts *= min(1.0, *(room / (pts.max(0) - pts.min(0))))  # shrink to fit, then place it where it fits
    lo = SHADOW_MARGIN + 2 - pts.min(0)
    hi = np.array([w, h]) - SHADOW_MARGIN - 2 - pts.max(0)
    grey = np.asarray(background.convert("L"), dtype=np.float32)
    detail = np.abs(np.diff(grey, axis=0))[:, :-1] + np.abs(np.diff(grey, axis=1))[:-1, :]
    best = None
    for _ in range(PLACEMENT_TRIES):
        spot = pts + [rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])]
        (x0, y0), (x1, y1) = spot.min(0).astype(int), spot.max(0).astype(int)
        score = float(detail[y0:y1, x0:x1].mean())
        if best is None or score < best[0]:
            best = (score, spot)
    return [(round(float(x), 2), round(float(y), 2)) for x, y in best[1]]


def _where(quad, size) -> str:
    """Where the surface is, in words: 'in the upper left of the picture'."""
    cx, cy = np.mean(quad, axis=0) / np.asarray(size)
    col = "left" if cx < 0.38 else "right" if cx > 0.62 else "centre"
    row = "upper" if cy < 0.4 else "lower" if cy > 0.6 else "middle"
    if row == "middle":
        return "in the centre of the picture" if col == "centre" else f"on the {col} of the picture"
    if col == "centre":
        return f"near the {'top' if row == 'upper' else 'bottom'} of the picture"
    return f"in the {row} {col} of the picture"


def compose(scene: Image.Image, surface: Image.Image, quad, rng: random.Random) -> Image.Image:
    """`surface` lit like the scene region under `quad`, with a soft shadow, warped onto `quad` of `scene`."""
    mask = Image.new("L", scene.size)
    ImageDraw.Draw(mask).polygon(quad, fill=255)
    region = np.asarray(scene.convert("L"), dtype=np.float64)[np.asarray(mask) > 0].mean()
    # Brightness a third of the way (geometrically) to the region's, so a white sheet on a dark wall is
    # dimmer yet still reads as white, and the text keeps its contrast (one factor for the whole surface);
    # then a linear light gradient across the surface.
    k = float(np.clip((max(region, 1.0) / max(np.asarray(surface.convert("L")).mean(), 1.0)) ** (1 / 3), 0.7, 1.1))
    sw, sh = surface.size
    horizontal = rng.random() < 0.5
    ramp = np.linspace(1.0, 1.0 - rng.uniform(0.05, 0.2), sw if horizontal else sh)
    if rng.random() < 0.5:
        ramp = ramp[::-1]  # the light comes from the other side
    ramp = ramp[None, :, None] if horizontal else ramp[:, None, None]
    lit = Image.fromarray(np.clip(np.asarray(surface, dtype=np.float64) * k * ramp, 0, 255).astype(np.uint8))
    dx, dy = rng.randint(2, SHADOW_OFFSET), rng.randint(2, SHADOW_OFFSET)
    shadow = Image.new("L", scene.size)
    ImageDraw.Draw(shadow).polygon([(x + dx, y + dy) for x, y in quad], fill=rng.randint(90, 140))
    out = Image.composite(Image.new("RGB", scene.size), scene, shadow.filter(ImageFilter.GaussianBlur(SHADOW_BLUR)))
    coeffs = perspective_coeffs(quad, [(0, 0), (sw, 0), (sw, sh), (0, sh)])
    warped = lit.transform(scene.size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    alpha = Image.new("L", surface.size, 255).transform(scene.size, Image.Transform.PERSPECTIVE, coeffs,
                                                       Image.Resampling.BILINEAR)
    out.paste(warped, mask=alpha)
    return out


def render_scene(seed: int, shard: int, index: int, fonts: Fonts, languages, scene: Scene | None = None) -> Rendered:
    """One scene sample; `scene` None: a procedural scene from the sample's seed."""
    rng = sample_rng(seed, shard, index, "/scene")
    language = rng.choice(fonts.languages(languages))
    if scene is None:
        scene = procedural_scene(rng, rng.choice(SIZES))
    size = scene_size(*scene.image.size)
    background = fit_scene(scene.image, size)
    kind = rng.choice(SURFACES)
    aspect = rng.uniform(*ASPECTS[kind])
    quad = _quad(rng, background, aspect)
    # Draw the surface at about its on-screen size: the warp then neither magnifies nor aliases the text.
    sw = round(max(math.dist(quad[0], quad[1]), math.dist(quad[3], quad[2])))
    lines = rng.sample(ZH_PHRASES if language == "zh" else EN_PHRASES, rng.randint(1, 2 if kind != "paper" else 3))
    surface, desc, color_name = _surface(rng, kind, (sw, round(sw / aspect)), lines, fonts.path(language))
    image = compose(background, surface, quad, rng)
    verb = {"sign": "reading", "paper": "with the words", "screen": "displaying"}[kind]
    context = (scene.caption or "A photo").rstrip(" .")
    caption = (f"{context}, with {desc} {verb} \"{' / '.join(lines)}\" in {color_name} {script_word(language)}, "
               f"{_where(quad, size)}, seen at a slight angle.")
    return Rendered(image, caption, lines, language, "text_in_scene", "scene",
                    {"surface": kind, "quad": [list(p) for p in quad],
                     "scene": {"source": scene.source, "key": scene.key, "origin": scene.origin,
                               "caption": scene.caption}})
