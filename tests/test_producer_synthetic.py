"""Synthetic text-rendering shards: img2dataset layout, captions quoting the text, reproducible bytes."""
import io
import json
import tarfile

import pytest
from PIL import Image

from producer.config import FilterConfig
from producer.filters import SampleFilter
from producer.sources import discover_shards, iter_shard
from producer.synthetic import CJK_FONT_GLOBS, find_font, generate_shards


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
