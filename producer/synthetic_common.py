"""What the text-synthesis strategies of producer/synthetic.py (and its edit pairs) share: fonts, phrases,
colours, the per-sample random generator, fitting text into a box, the rendered-sample record, contact sheets."""
from __future__ import annotations

import glob
import hashlib
import random
import warnings
from dataclasses import dataclass, field

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
MIN_FONT_SIZE = 10
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclass(frozen=True)
class Fonts:
    """Font files per script; `cjk` is None when no CJK font is installed (Chinese is then skipped)."""

    latin: str | None
    cjk: str | None

    def languages(self, wanted) -> list[str]:
        """The wanted languages these fonts can render, in order; English when none (only Chinese asked for,
        no CJK font: generate_shards has warned that it writes English)."""
        return [lang for lang in wanted if lang == "en" or (lang == "zh" and self.cjk)] or ["en"]

    def path(self, language: str) -> str | None:
        return self.cjk if language == "zh" else self.latin


@dataclass
class Rendered:
    """One synthetic sample before encoding: the picture, its caption and what KEY.json records."""

    image: Image.Image
    caption: str
    texts: list[str]  # every text drawn, in the order the caption quotes them
    language: str
    category: str  # producer/categories.py reads it from KEY.json
    strategy: str
    extra: dict = field(default_factory=dict)  # strategy-specific metadata (layout, scene, quad, ...)


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


def sample_rng(seed: int, shard: int, index: int, salt: str = "") -> random.Random:
    """The sample's own generator: output is a pure function of (seed, shard, index). The strategy name is
    the salt, so the strategies draw independent content for the same position."""
    digest = hashlib.sha256(f"{seed}/{shard}/{index}{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def draw_gradient(draw: ImageDraw.ImageDraw, size, a, b, vertical: bool = True) -> None:
    """A linear a -> b gradient over the (w, h) area at the origin: top to bottom, or left to right."""
    w, h = size
    n = h if vertical else w
    for i in range(n):
        t = i / max(1, n - 1)
        col = tuple(int(a[k] * (1 - t) + b[k] * t) for k in range(3))
        draw.line([(0, i), (w, i)] if vertical else [(i, 0), (i, h)], fill=col)


def contrasting(rng: random.Random, background, names=None) -> tuple[str, tuple]:
    """A named colour far from `background` in luma, so text on it stays readable."""
    options = [n for n in (names or COLORS) if abs(luma(COLORS[n]) - luma(background)) > 90]
    name = rng.choice(options or ["black" if luma(background) > 128 else "white"])
    return name, COLORS[name]


def script_word(language: str) -> str:
    return "Chinese characters" if language == "zh" else "letters"


def fit_font(draw: ImageDraw.ImageDraw, lines: list[str], font_path: str | None, max_w: float, max_h: float,
             start: int, spacing: float = 0.3):
    """The largest font (<= `start` px) at which `lines`, stacked with `spacing` x size between them, fit in
    max_w x max_h; MIN_FONT_SIZE if none does (phrases are kept short enough for that not to clip)."""
    size = max(MIN_FONT_SIZE, int(start))
    while True:
        font = load_font(font_path, size)
        boxes = [draw.textbbox((0, 0), s, font=font) for s in lines]
        width = max(b[2] - b[0] for b in boxes)
        height = sum(b[3] - b[1] for b in boxes) + spacing * size * (len(lines) - 1)
        if size <= MIN_FONT_SIZE or (width <= max_w and height <= max_h):
            return font
        size = max(MIN_FONT_SIZE, int(size * 0.9))


def draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], box, font, fill, align: str = "centre",
               spacing: float = 0.3) -> None:
    """`lines` stacked and vertically centred in `box` (x0, y0, x1, y1), centred or left-aligned."""
    x0, y0, x1, y1 = box
    boxes = [draw.textbbox((0, 0), s, font=font) for s in lines]
    gap = spacing * font.size
    y = (y0 + y1 - (sum(b[3] - b[1] for b in boxes) + gap * (len(lines) - 1))) / 2
    for s, b in zip(lines, boxes):
        x = (x0 + x1 - (b[2] - b[0])) / 2 if align == "centre" else x0
        draw.text((round(x - b[0]), round(y - b[1])), s, font=font, fill=fill)
        y += b[3] - b[1] + gap


def plural(n: int, word: str) -> str:
    """'three bullet points', 'one row'."""
    return f"{NUMBER_WORDS.get(n, str(n))} {word}{'s' if n != 1 else ''}"


def quote_list(texts) -> str:
    """'"a", "b" and "c"': every text quoted, in order."""
    quoted = [f'"{t}"' for t in texts]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def save_palette_png(sheet: Image.Image, path: str) -> None:
    """A contact sheet as PNG: a dithered 256-colour palette keeps it small enough for the docs (photographic
    thumbnails, lossless)."""
    palette = sheet.quantize(256, method=Image.Quantize.MEDIANCUT)
    sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


def fonts_for(languages) -> Fonts:
    """The fonts for these languages (en, zh); warns and falls back to English when no CJK font is installed."""
    unknown = set(languages) - {"en", "zh"}
    if unknown:
        raise ValueError(f"unsupported languages {sorted(unknown)}: choose from en, zh")
    cjk_font = find_font(CJK_FONT_GLOBS) if "zh" in languages else None
    if "zh" in languages and cjk_font is None:
        warnings.warn(f"no CJK font installed (Debian: apt-get install {CJK_DEBIAN_PACKAGE}); "
                      "generating English samples only", stacklevel=3)
    return Fonts(find_font(LATIN_FONT_CANDIDATES), cjk_font)
