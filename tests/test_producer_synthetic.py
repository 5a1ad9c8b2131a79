"""Synthetic text-rendering shards: img2dataset layout, captions quoting the text, reproducible bytes."""
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from producer.config import FilterConfig
from producer.filters import SampleFilter
from producer.sources import discover_shards, iter_shard
from producer.synthetic import STRATEGIES, generate_shards, main
from producer.synthetic_common import CJK_FONT_GLOBS, LATIN_FONT_CANDIDATES, Fonts, find_font
from producer.synthetic_scene import (SHADOW_MARGIN, Scene, apply_perspective, fit_scene, perspective_coeffs,
                                      render_scene)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return generate_shards(str(tmp_path_factory.mktemp("syn")), num_shards=2, per_shard=12, seed=5)


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_img2dataset_layout_and_captions_quote_the_text(shards):
    for s, path in enumerate(shards):
        members = _members(path)
        keys = sorted({n.split(".")[0] for n in members})
        assert len(keys) == 12 and all(k.startswith(f"{s:05d}") for k in keys)
        for k in keys:
            assert {f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(members)
            meta = json.loads(members[f"{k}.json"])
            caption = members[f"{k}.txt"].decode("utf-8")
            assert meta["key"] == k and meta["caption"] == caption and meta["status"] == "success"
            assert f"\"{' / '.join(meta['text_lines'])}\"" in caption
            img = Image.open(io.BytesIO(members[f"{k}.jpg"]))
            assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])


def test_reproducible_bytes(shards, tmp_path):
    again = generate_shards(str(tmp_path), num_shards=2, per_shard=12, seed=5)
    for a, b in zip(shards, again):
        assert open(a, "rb").read() == open(b, "rb").read()
    other = generate_shards(str(tmp_path / "other"), num_shards=1, per_shard=12, seed=6)
    assert open(other[0], "rb").read() != open(shards[0], "rb").read()


def test_chinese_samples_when_a_cjk_font_is_installed(shards):
    if find_font(CJK_FONT_GLOBS) is None:
        pytest.skip("no CJK font installed (Debian package fonts-wqy-microhei): generator is English-only here")
    langs = [json.loads(v)["language"] for p in shards for n, v in _members(p).items() if n.endswith(".json")]
    assert "zh" in langs and "en" in langs


def test_english_only_when_asked(tmp_path):
    (path,) = generate_shards(str(tmp_path), num_shards=1, per_shard=6, seed=1, languages=("en",))
    assert {json.loads(v)["language"] for n, v in _members(path).items() if n.endswith(".json")} == {"en"}
    with pytest.raises(ValueError, match="unsupported languages"):
        generate_shards(str(tmp_path), languages=("fr",))


def test_synthetic_samples_pass_the_default_filters(shards):
    f = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256)
    for spec in discover_shards(shards):
        f.start_shard()
        kept, drops, _, _ = f.process(list(iter_shard(spec)))
        assert not drops and len(kept) == 12


# ------------------------------------------------------------------ scene and template strategies (report §3.4)

NEW_STRATEGIES = ("scene", "template")
CATEGORY = {"plain": "text_rendering", "scene": "text_in_scene", "template": "text_template"}


def _samples(path):
    """(meta, caption, jpg bytes) per sample of a shard, in key order."""
    members = _members(path)
    keys = sorted({n.split(".")[0] for n in members})
    return [(json.loads(members[f"{k}.json"]), members[f"{k}.txt"].decode("utf-8"), members[f"{k}.jpg"]) for k in keys]


def _quoted_texts(caption):
    """Every quoted run of the caption, multi-line ones ("A / B") split into their lines."""
    return [line for q in re.findall(r'"([^"]*)"', caption) for line in q.split(" / ")]


@pytest.fixture(scope="module", params=NEW_STRATEGIES)
def strategy_shards(request, tmp_path_factory):
    paths = generate_shards(str(tmp_path_factory.mktemp(request.param)), num_shards=1, per_shard=10, seed=5,
                            strategy=request.param)
    return request.param, paths


def test_new_strategies_reproducible_bytes(strategy_shards, tmp_path):
    strategy, paths = strategy_shards
    again = generate_shards(str(tmp_path), num_shards=1, per_shard=10, seed=5, strategy=strategy)
    assert open(again[0], "rb").read() == open(paths[0], "rb").read()
    other = generate_shards(str(tmp_path / "other"), num_shards=1, per_shard=10, seed=6, strategy=strategy)
    assert open(other[0], "rb").read() != open(paths[0], "rb").read()


def test_captions_quote_every_rendered_text_in_order(shards, strategy_shards):
    strategy, paths = strategy_shards
    for name, path in (("plain", shards[0]), (strategy, paths[0])):
        for meta, caption, _ in _samples(path):
            assert meta["strategy"] == name and meta["category"] == CATEGORY[name]
            assert meta["texts"] and _quoted_texts(caption) == meta["texts"], caption


def test_new_strategies_both_languages_when_a_cjk_font_is_installed(strategy_shards):
    if find_font(CJK_FONT_GLOBS) is None:
        pytest.skip("no CJK font installed (Debian package fonts-wqy-microhei): generator is English-only here")
    assert {meta["language"] for meta, _, _ in _samples(strategy_shards[1][0])} == {"en", "zh"}


def test_new_strategies_pass_the_default_filters(strategy_shards):
    f = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256)
    for spec in discover_shards(strategy_shards[1]):
        f.start_shard()
        kept, drops, _, _ = f.process(list(iter_shard(spec)))
        assert not drops and len(kept) == 10


def test_strategy_all_takes_them_in_turn_and_bad_options_are_refused(tmp_path):
    (path,) = generate_shards(str(tmp_path), num_shards=1, per_shard=6, seed=2, strategy="all", languages=("en",))
    assert [m["strategy"] for m, _, _ in _samples(path)] == list(STRATEGIES) * 2
    with pytest.raises(ValueError, match="unknown strategy"):
        generate_shards(str(tmp_path), strategy="poster")
    with pytest.raises(ValueError, match="scene strategy only"):
        generate_shards(str(tmp_path), strategy="template", scenes=[str(path)])


def test_perspective_coefficients_map_the_corners():
    rng = np.random.default_rng(0)
    src = [(0, 0), (120, 0), (120, 80), (0, 80)]
    for _ in range(5):
        dst = np.asarray(src, dtype=float) * rng.uniform(0.5, 2) + rng.uniform(-20, 20, (4, 2)) + 50
        coeffs = perspective_coeffs(src, dst)
        assert len(coeffs) == 8
        np.testing.assert_allclose(apply_perspective(coeffs, src), dst, atol=1e-6)
    # PIL's PERSPECTIVE maps output to input pixels: a surface red on the left, blue on the right, warped onto
    # a quad, is red where the map of a left-half point lands, blue where a right-half point's does.
    surface = Image.new("RGB", (120, 80), (0, 0, 255))
    surface.paste((255, 0, 0), (0, 0, 60, 80))
    quad = [(40, 30), (190, 45), (180, 150), (35, 130)]
    warped = surface.transform((240, 200), Image.Transform.PERSPECTIVE, perspective_coeffs(quad, src),
                               Image.Resampling.BILINEAR)
    forward = perspective_coeffs(src, quad)
    (lx, ly), (rx, ry) = apply_perspective(forward, [(30, 40), (90, 40)])
    assert warped.getpixel((int(lx), int(ly))) == (255, 0, 0) and warped.getpixel((int(rx), int(ry))) == (0, 0, 255)
    assert warped.getpixel((5, 5)) == (0, 0, 0)  # outside the quad: untouched


def _photo(size, seed) -> Image.Image:
    """A stand-in photograph: a gradient with random shapes (enough detail for the clarity filter)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray((np.array([70, 120, 170]) * (1 - y) + np.array([200, 180, 140]) * y
                           + np.zeros((h, w, 3))).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        d.ellipse([x0, y0, x0 + rng.integers(10, 60), y0 + rng.integers(10, 60)],
                  fill=tuple(int(v) for v in rng.integers(30, 230, 3)))
    return img


@pytest.fixture(scope="module")
def scene_tar(tmp_path_factory):
    """Two captioned scenes as a WebDataset tar (what img2dataset writes), and each as the tar holds it."""
    path = tmp_path_factory.mktemp("scenes") / "scenes.tar"
    scenes = {}
    with tarfile.open(path, "w") as tf:
        for key, size, seed, caption in (("harbour", (400, 300), 1, "A photo of a quiet harbour at dawn."),
                                         ("market", (300, 400), 2, "A busy street market")):
            buf = io.BytesIO()
            _photo(size, seed).save(buf, format="JPEG", quality=95)
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            scenes[key] = (Image.open(buf).convert("RGB"), caption)
    return str(path), scenes


def _outside(size, quad, margin):
    """Mask of pixels farther than `margin` from the quad's bounding box."""
    w, h = size
    (x0, y0), (x1, y1) = np.min(quad, axis=0) - margin, np.max(quad, axis=0) + margin
    ys, xs = np.mgrid[0:h, 0:w]
    return (xs < x0) | (xs > x1) | (ys < y0) | (ys > y1)


def test_scene_strategy_composes_text_into_the_given_scenes(scene_tar, tmp_path):
    tar, scenes = scene_tar
    (path,) = generate_shards(str(tmp_path), num_shards=1, per_shard=4, seed=3, strategy="scene", scenes=[tar])
    samples = _samples(path)
    # The k-th scene sample takes the k-th scene, cycling; the scene's caption leads the caption.
    assert [m["scene"]["key"] for m, _, _ in samples] == ["harbour", "market"] * 2
    for meta, caption, jpg in samples:
        scene, scene_caption = scenes[meta["scene"]["key"]]
        assert meta["scene"]["source"] == "input" and caption.startswith(scene_caption.rstrip("."))
        img = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float64)
        background = np.asarray(fit_scene(scene, (meta["width"], meta["height"])), dtype=np.float64)
        far = _outside((meta["width"], meta["height"]), meta["quad"], SHADOW_MARGIN + 8)  # + a JPEG block
        assert far.mean() > 0.2 and np.abs(img - background)[far].mean() < 3  # JPEG noise only
        inside = ~_outside((meta["width"], meta["height"]), np.mean(meta["quad"], axis=0, keepdims=True), 12)
        assert np.abs(img - background)[inside].mean() > 20  # the surface covers the scene there
    f = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256)
    kept, drops, _, _ = f.process(list(iter_shard(discover_shards([path])[0])))
    assert not drops and len(kept) == 4


def test_scene_pixels_outside_the_surface_are_the_resized_scene_exactly(scene_tar):
    scene_img, caption = scene_tar[1]["harbour"]
    fonts = Fonts(find_font(LATIN_FONT_CANDIDATES), None)
    for index in range(3):
        r = render_scene(9, 0, index, fonts, ("en",), Scene(scene_img, caption, "input", "harbour"))
        background = np.asarray(fit_scene(scene_img, r.image.size))
        far = _outside(r.image.size, r.extra["quad"], SHADOW_MARGIN)
        assert far.any() and (np.asarray(r.image)[far] == background[far]).all()
        assert r.texts and f'"{" / ".join(r.texts)}"' in r.caption


def test_procedural_scenes_without_inputs(tmp_path):
    (path,) = generate_shards(str(tmp_path), num_shards=1, per_shard=4, seed=5, strategy="scene", languages=("en",))
    scenes = [m["scene"] for m, _, _ in _samples(path)]
    assert {s["source"] for s in scenes} == {"procedural"} and len({s["key"] for s in scenes}) >= 2


def test_preview_contact_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    assert main(["--preview", str(out), "--languages", "en"]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 600 and out.stat().st_size < 300_000
