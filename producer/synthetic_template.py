"""Complex rendering in structured templates (Qwen-Image report §3.4): presentation slides (a bullet list or
a table), posters and app screens, their fields filled from phrase pools, the caption naming the layout
and quoting every text in reading order ('A presentation slide with ... the title "Next Steps" and three
bullet points: "Hire two engineers", "Cut costs" and "Ship version 2.0".')."""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from producer.synthetic_common import (COLORS, Fonts, Rendered, contrasting, draw_gradient, draw_lines, fit_font,
                                       luma, plural, quote_list, sample_rng, script_word)

SLIDE_SIZE, POSTER_SIZE, SCREEN_SIZE = (512, 288), (352, 480), (288, 512)

# Slide themes: name, background top and bottom, title colour, text colour, accent.
THEMES = (
    ("white", (248, 248, 248), (222, 226, 234), COLORS["dark blue"], COLORS["black"], COLORS["orange"]),
    ("dark blue", (25, 35, 60), (50, 65, 105), COLORS["white"], (225, 225, 225), COLORS["yellow"]),
    ("cream", (245, 235, 205), (228, 212, 175), COLORS["brown"], COLORS["black"], COLORS["red"]),
    ("teal", (30, 130, 130), (18, 88, 92), COLORS["white"], COLORS["white"], COLORS["yellow"]),
)
TITLES = {
    "en": ("Quarterly Review", "Project Roadmap", "Team Goals 2025", "Our Mission", "Marketing Plan",
           "Weekly Update", "Product Launch", "Lessons Learned", "Next Steps", "Budget Overview"),
    "zh": ("季度总结", "项目路线图", "团队目标", "我们的使命", "市场计划", "每周进展", "产品发布", "经验总结",
           "下一步计划", "预算概览"),
}
BULLETS = {
    "en": ("Grow revenue by 20%", "Hire two engineers", "Launch the mobile app", "Improve test coverage",
           "Cut costs", "Open a new office", "Ship version 2.0", "Survey our users", "Train the new team",
           "Halve the load time", "Expand to Asia", "Publish the report"),
    "zh": ("收入增长百分之二十", "招聘两名工程师", "发布手机应用", "提高测试覆盖率", "降低成本", "开设新办公室",
           "发布二点零版本", "调研用户需求", "培训新团队", "加载时间减半", "拓展亚洲市场", "发布年度报告"),
}
# Tables: title, column headers, and per column a pool to draw from or a number format (_cell).
TABLES = {
    "en": (("Price List", ("Item", "Price", "Stock"),
            (("Apples", "Bananas", "Oranges", "Grapes", "Melons", "Pears", "Lemons"), "dollars", "count")),
           ("Sales by Region", ("Region", "Q1", "Q2"),
            (("North", "South", "East", "West", "Central"), "count", "count")),
           ("Team Schedule", ("Name", "Day", "Time"),
            (("Alice", "Bob", "Carol", "David", "Emma"), ("Mon", "Tue", "Wed", "Thu", "Fri"), "time"))),
    "zh": (("价格表", ("商品", "价格", "库存"),
            (("苹果", "香蕉", "橙子", "葡萄", "西瓜", "梨", "柠檬"), "yuan", "count")),
           ("地区销售", ("地区", "一季度", "二季度"), (("华东", "华南", "华北", "西部", "东北"), "count", "count")),
           ("值班表", ("姓名", "日期", "时间"),
            (("张伟", "李娜", "王芳", "刘洋", "陈静"), ("周一", "周二", "周三", "周四", "周五"), "time"))),
}
POSTERS = {
    "en": (("Jazz Night", "Book Fair", "Grand Opening", "Art Show", "Film Week", "Summer Fest", "Night Market",
            "Charity Run", "Food Fair", "Open House"),
           ("Live bands and food", "Free entry for all", "Join us for a great night", "Meet the artists",
            "Fun for the whole family", "Music, games and prizes"),
           ("Saturday 8 PM, City Hall", "June 12, Central Park", "Every Friday at 7 PM", "May 3 to May 5",
            "Main Square, 10 AM")),
    "zh": (("爵士之夜", "图书博览会", "盛大开业", "艺术展览", "电影周", "夏日音乐节", "夜市开张", "慈善长跑",
            "美食节", "开放日"),
           ("现场乐队与美食", "所有人免费入场", "欢迎一起狂欢", "与艺术家面对面", "适合全家参加", "音乐游戏和奖品"),
           ("周六晚上八点 市政厅", "六月十二日 中央公园", "每周五晚七点", "五月三日至五日", "主广场 上午十点")),
}
SCREENS = {
    "en": (("Settings", ("Wi-Fi", "Bluetooth", "Notifications", "Display", "Battery", "Privacy", "Sound"),
            ("Save", "Cancel")),
           ("Shopping List", ("Milk", "Eggs", "Bread", "Apples", "Coffee", "Rice", "Cheese"), ("Add Item", "Clear")),
           ("Playlist", ("Morning Run", "Focus", "Road Trip", "Chill Mix", "Top Hits", "Jazz Classics"),
            ("Play All", "Shuffle")),
           ("Contacts", ("Alice", "Bob", "Carol", "David", "Emma", "Frank"), ("Call", "Message"))),
    "zh": (("设置", ("无线网络", "蓝牙", "通知", "显示", "电池", "隐私", "声音"), ("保存", "取消")),
           ("购物清单", ("牛奶", "鸡蛋", "面包", "苹果", "咖啡", "大米", "奶酪"), ("添加", "清空")),
           ("播放列表", ("晨跑", "专注", "自驾游", "轻松时刻", "热门歌曲", "爵士经典"), ("全部播放", "随机播放")),
           ("联系人", ("小明", "小红", "张伟", "李娜", "王芳", "刘洋"), ("打电话", "发消息"))),
}
POSTER_COLORS = ("dark blue", "purple", "teal", "red", "black", "green", "brown")  # dark: light text reads
SCREEN_COLORS = ("dark blue", "green", "purple", "teal", "red")


def _gradient(size, top, bottom) -> Image.Image:
    img = Image.new("RGB", size)
    draw_gradient(ImageDraw.Draw(img), size, top, bottom)
    return img


def _decorate(rng: random.Random, d: ImageDraw.ImageDraw, size, accent, base) -> None:
    """A shape in a tint of the accent colour: without it slides of one theme and shape are near
    duplicates by perceptual hash (the producer's dedup would drop them)."""
    w, h = size
    tint = tuple(int(a * 0.35 + b * 0.65) for a, b in zip(accent, base))
    kind = rng.choice(("band", "circle", "corner", "stripe"))
    if kind == "band":
        bw = rng.uniform(0.02, 0.05) * w
        x = rng.choice((0, w - bw))
        d.rectangle([x, 0, x + bw, h], fill=accent)
    elif kind == "circle":
        r = rng.uniform(0.3, 0.5) * h
        cx, cy = rng.choice(((w, 0), (w, h), (0, h)))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tint)
    elif kind == "corner":
        s = rng.uniform(0.25, 0.45) * h
        d.polygon(rng.choice(([(w, 0), (w - 2 * s, 0), (w, s)], [(w, h), (w - 2 * s, h), (w, h - s)])), fill=tint)
    else:
        y = rng.uniform(0.96, 0.98) * h
        d.rectangle([0, y, w, h], fill=accent)


def _text(d, text, box, font_path, color, start, align="centre"):
    x0, y0, x1, y1 = box
    draw_lines(d, [text], box, fit_font(d, [text], font_path, x1 - x0, y1 - y0, start), color, align)


def _cell(rng: random.Random, spec) -> str:
    """A table cell: drawn from the column's pool, or a number in the column's format."""
    if isinstance(spec, tuple):
        return rng.choice(spec)
    if spec == "dollars":
        return f"${rng.randint(1, 19)}.{rng.choice(('00', '50', '99'))}"
    if spec == "yuan":
        return f"¥{rng.randint(2, 99)}"
    if spec == "time":
        return f"{rng.randint(8, 18)}:{rng.choice(('00', '30'))}"
    return str(rng.randint(0, 120))  # "count"


def _slide_base(rng: random.Random, font, title: str):
    """A themed, decorated slide with `title` at the top left; returns it, its draw, theme name, text and
    accent colours, and its top background colour."""
    w, h = SLIDE_SIZE
    name, top, bottom, title_color, text_color, accent = rng.choice(THEMES)
    img = _gradient(SLIDE_SIZE, top, bottom)
    d = ImageDraw.Draw(img)
    _decorate(rng, d, SLIDE_SIZE, accent, top)
    _text(d, title, (0.07 * w, 0.05 * h, 0.93 * w, 0.22 * h), font, title_color, 0.13 * h, "left")
    d.rectangle([0.07 * w, 0.25 * h, 0.3 * w, 0.25 * h + 3], fill=accent)
    return img, d, name, text_color, accent, top


def _slide_bullets(rng: random.Random, language: str, font):
    w, h = SLIDE_SIZE
    title = rng.choice(TITLES[language])
    bullets = rng.sample(BULLETS[language], rng.randint(2, 4))
    img, d, name, text_color, accent, _ = _slide_base(rng, font, title)
    x0, y0, y1 = 0.13 * w, 0.33 * h, 0.93 * h
    rh = (y1 - y0) / len(bullets)
    bullet_font = fit_font(d, bullets, font, 0.8 * w, h * len(bullets), start=min(rh * 0.5, 0.09 * h))
    for i, text in enumerate(bullets):
        cy = y0 + (i + 0.5) * rh
        d.ellipse([0.08 * w, cy - 4, 0.08 * w + 8, cy + 4], fill=accent)
        draw_lines(d, [text], (x0, y0 + i * rh, 0.93 * w, y0 + (i + 1) * rh), bullet_font, text_color, "left")
    caption = (f"A presentation slide with a {name} background, the title \"{title}\" and "
               f"{plural(len(bullets), 'bullet point')}: {quote_list(bullets)}.")
    return img, [title, *bullets], caption, {"bullets": len(bullets)}


def _slide_table(rng: random.Random, language: str, font):
    w, h = SLIDE_SIZE
    title, headers, columns = rng.choice(TABLES[language])
    n = rng.randint(2, 4)
    first = rng.sample(columns[0], n)  # distinct row names
    rows = [[first[r]] + [_cell(rng, spec) for spec in columns[1:]] for r in range(n)]
    img, d, name, _, accent, top = _slide_base(rng, font, title)
    grid = [list(headers)] + rows
    x0, y0, x1, y1 = rng.uniform(0.07, 0.2) * w, 0.32 * h, rng.uniform(0.8, 0.93) * w, rng.uniform(0.8, 0.94) * h
    rh, cw = (y1 - y0) / len(grid), (x1 - x0) / len(headers)
    # One size for every cell: the tallest that a row allows at which the widest cell fits its column.
    cell_font = fit_font(d, [c for row in grid for c in row], font, cw * 0.85, h * len(grid), start=rh * 0.5)
    for r, row in enumerate(grid):
        fill = accent if r == 0 else tuple(int(v * (0.92 if r % 2 else 0.85)) for v in top)
        d.rectangle([x0, y0 + r * rh, x1, y0 + (r + 1) * rh], fill=fill, outline=(128, 128, 128))
        color = COLORS["black"] if luma(fill) > 128 else COLORS["white"]
        for c, text in enumerate(row):
            draw_lines(d, [text], (x0 + c * cw, y0 + r * rh, x0 + (c + 1) * cw, y0 + (r + 1) * rh), cell_font, color)
    for c in range(1, len(headers)):
        d.line([(x0 + c * cw, y0), (x0 + c * cw, y1)], fill=(128, 128, 128))
    body = "; ".join(f"row {r + 1} reads {quote_list(row)}" for r, row in enumerate(rows))
    caption = (f"A presentation slide with a {name} background titled \"{title}\" and a table of "
               f"{plural(len(headers), 'column')} and {plural(n, 'row')} below a header row: the header reads "
               f"{quote_list(headers)}; {body}.")
    return img, [title, *headers, *(c for row in rows for c in row)], caption, {"rows": n, "columns": len(headers)}


def _poster(rng: random.Random, language: str, font):
    w, h = POSTER_SIZE
    headline, subtitle, info = (rng.choice(pool) for pool in POSTERS[language])
    bg_name = rng.choice(POSTER_COLORS)
    bg = COLORS[bg_name]
    img = _gradient(POSTER_SIZE, bg, tuple(int(v * 0.7) for v in bg))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):  # decoration: large soft circles, partly off the poster
        r, cx, cy = rng.randint(w // 6, w // 2), rng.randint(0, w), rng.randint(0, h)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(min(255, int(v * 1.25) + 20) for v in bg))
    head_name, head_color = contrasting(rng, bg, ("white", "yellow", "cream", "light blue", "pink"))
    _text(d, headline, (0.08 * w, 0.14 * h, 0.92 * w, 0.42 * h), font, head_color, 0.14 * h)
    _text(d, subtitle, (0.1 * w, 0.5 * h, 0.9 * w, 0.6 * h), font, COLORS["white"], 0.06 * h)
    band_name = rng.choice(("white", "yellow", "cream"))
    d.rectangle([0, 0.82 * h, w, h], fill=COLORS[band_name])
    _text(d, info, (0.06 * w, 0.85 * h, 0.94 * w, 0.97 * h), font, COLORS["black"], 0.05 * h)
    caption = (f"A {bg_name} poster with the headline \"{headline}\" in large {head_name} {script_word(language)}, "
               f"the subtitle \"{subtitle}\" below it, and a {band_name} band at the bottom reading \"{info}\".")
    return img, [headline, subtitle, info], caption, {}


def _screen(rng: random.Random, language: str, font):
    w, h = SCREEN_SIZE
    title, pool, buttons = rng.choice(SCREENS[language])
    items = rng.sample(pool, rng.randint(3, 5))
    buttons = buttons[: rng.randint(1, 2)]
    color_name = rng.choice(SCREEN_COLORS)
    primary = COLORS[color_name]
    # Light or dark mode, header height, an optional banner and the row height vary the layout, so that
    # screens are not near duplicates of each other by perceptual hash.
    mode = rng.choice(("light", "dark"))
    if mode == "light":
        bg, ink, rule, second = ((244, 244, 246), (228, 230, 236)), COLORS["black"], (205, 205, 210), "gray"
    else:
        bg, ink, rule, second = ((28, 28, 32), (44, 44, 50)), (235, 235, 235), (75, 75, 82), "dark gray"
    img = _gradient(SCREEN_SIZE, *bg)
    d = ImageDraw.Draw(img)
    header = rng.uniform(0.1, 0.14) * h
    d.rectangle([0, 0, w, header], fill=primary)
    _text(d, title, (0.08 * w, 0.15 * header, 0.92 * w, 0.85 * header), font, COLORS["white"], 0.05 * h)
    top = header + 0.03 * h
    banner = rng.random() < 0.5
    if banner:  # a picture card without text: a tinted panel with a sun and hills
        card = tuple(int(v * 0.45 + 140) for v in primary)
        d.rounded_rectangle([0.06 * w, top, 0.94 * w, top + 0.16 * h], radius=12, fill=card)
        d.ellipse([0.7 * w, top + 0.02 * h, 0.7 * w + 0.05 * h, top + 0.07 * h], fill=COLORS["yellow"])
        d.polygon([(0.1 * w, top + 0.16 * h), (0.4 * w, top + 0.06 * h), (0.7 * w, top + 0.16 * h)], fill=primary)
        top += 0.19 * h
    rh = min(rng.uniform(0.08, 0.11) * h, (0.83 * h - top) / len(items))
    item_font = fit_font(d, items, font, 0.6 * w, h * len(items), start=0.45 * rh)
    cards = rng.random() < 0.5  # items as separate cards, or rows between rules
    for i, item in enumerate(items):
        y0 = top + i * rh
        cy = y0 + rh / 2
        if cards:
            d.rounded_rectangle([0.04 * w, y0 + 0.06 * rh, 0.96 * w, y0 + 0.94 * rh], radius=8, fill=rule)
        else:
            d.line([(0.06 * w, y0 + rh), (0.94 * w, y0 + rh)], fill=rule)
        d.ellipse([0.06 * w, cy - 12, 0.06 * w + 24, cy + 12], fill=tuple(int(v * 0.5 + 120) for v in primary))
        draw_lines(d, [item], (0.2 * w, y0, 0.85 * w, y0 + rh), item_font, ink, "left")
        d.line([(0.88 * w, cy - 6), (0.91 * w, cy), (0.88 * w, cy + 6)], fill=(150, 150, 150), width=2)  # chevron
    fills = [(primary, COLORS["white"], color_name), (rule, ink, second)]
    bw = (0.88 * w - 0.06 * w * (len(buttons) - 1)) / len(buttons)
    by = rng.choice((0.86 * h, top + len(items) * rh + 0.03 * h))  # at the bottom, or right below the list
    described = []
    for i, (label, (fill, label_ink, fill_name)) in enumerate(zip(buttons, fills)):
        x0 = 0.06 * w + i * (bw + 0.06 * w)
        d.rounded_rectangle([x0, by, x0 + bw, by + 0.09 * h], radius=10, fill=fill)
        _text(d, label, (x0 + 6, by + 0.01 * h, x0 + bw - 6, by + 0.08 * h), font, label_ink, 0.04 * h)
        described.append(f"a {fill_name} \"{label}\" button")
    caption = (f"A mobile app screen in {mode} mode with a {color_name} header bar titled \"{title}\", "
               f"{'a picture banner, ' if banner else ''}a list of {plural(len(items), 'item')}: {quote_list(items)}, "
               f"and {' and '.join(described)} {'at the bottom' if by == 0.86 * h else 'below it'}.")
    return img, [title, *items, *buttons], caption, {"items": len(items), "buttons": len(buttons), "mode": mode}


TEMPLATES = {"slide_bullets": _slide_bullets, "slide_table": _slide_table, "poster": _poster, "app_screen": _screen}


def render_template(seed: int, shard: int, index: int, fonts: Fonts, languages) -> Rendered:
    """One template sample: a layout of TEMPLATES with its fields drawn from the sample's seed."""
    rng = sample_rng(seed, shard, index, "/template")
    language = rng.choice(fonts.languages(languages))
    layout = rng.choice(sorted(TEMPLATES))
    img, texts, caption, extra = TEMPLATES[layout](rng, language, fonts.path(language))
    return Rendered(img, caption, texts, language, "text_template", "template", {"layout": layout, **extra})
