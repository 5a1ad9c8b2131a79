"""Synthetic edit triplets (producer/synthetic_edit.py, `python -m producer.synthetic --task edit`): in the tar
layout the producer reads, deterministic, every edit kind, the instruction saying what changed, and a source and
target that differ only there."""
import hashlib
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from producer.config import FilterConfig
from producer.filters import SampleFilter
from producer.sources import RawSample, discover_shards, iter_shard
from producer.synthetic import generate_shards, main
from producer.synthetic_common import fonts_for
from producer.synthetic_edit import EDITS, render_edit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("edits")
    return generate_shards(str(out), num_shards=2, per_shard=12, seed=3, task="edit")


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_edit_shards_are_deterministic_and_in_the_edit_layout(shards, tmp_path):
    again = generate_shards(str(tmp_path), num_shards=2, per_shard=12, seed=3, task="edit")
    assert [hashlib.sha256(open(p, "rb").read()).digest() for p in shards] == \
        [hashlib.sha256(open(p, "rb").read()).digest() for p in again]
    members = _members(shards[0])
    assert sorted(members)[:4] == ["000000000.jpg", "000000000.json", "000000000.src.png", "000000000.txt"]
    assert len(members) == 4 * 12


def test_the_producer_reads_every_pair_with_its_instruction_and_source(shards):
    records = [r for s in discover_shards(shards) for r in iter_shard(s)]
    assert len(records) == 24 and all(isinstance(r, RawSample) and len(r.cond_images) == 1 for r in records)
    kinds = Counter()
    for r in records:
        meta = r.meta
        kinds[meta["edit"]] += 1
        assert meta["category"] == "text_edit" and r.caption.decode() == meta["instruction"]
        src, dst = meta["source_texts"], meta["texts"]
        if meta["edit"] == "replace_text":
            old, new = (set(src) - set(dst)), (set(dst) - set(src))
            assert len(old) == len(new) == 1 and f'"{old.pop()}" to "{new.pop()}"' in meta["instruction"]
        elif meta["edit"] == "add_text":
            assert dst[:-1] == src and f'"{dst[-1]}"' in meta["instruction"]
        elif meta["edit"] == "remove_text":
            gone = [t for t in src if t not in dst]
            assert len(dst) == len(src) - 1 and f'"{gone[0]}"' in meta["instruction"]
        else:  # colours change, the texts do not
            assert src == dst
    assert set(kinds) == set(EDITS), kinds
    # nearly every pair passes the image filters, both images checked (the demo trains on them); a busy striped
    # background behind dense text can exceed max_texture, like any input: dropped, counted under its reason
    kept, dropped, _, _ = SampleFilter(FilterConfig(min_caption_tokens=None, max_caption_tokens=None), 256,
                                      condition_area=256 * 256).process(records)
    assert len(kept) + sum(dropped.values()) == 24 and len(kept) >= 22, dropped
    assert set(dropped) <= {"texture", "source_texture"}, dropped


@pytest.mark.parametrize("kind", EDITS)
def test_source_and_target_differ_only_where_the_instruction_says(kind):
    fonts = fonts_for(("en",))
    index = next(i for i in range(50) if _applies(kind, i, fonts))
    pair = render_edit(0, 0, index, fonts, ("en",), kind)
    src, dst = (np.asarray(im, dtype=np.int16) for im in (pair.source, pair.target))
    changed = np.abs(src - dst).max(axis=-1) > 0
    assert changed.any()
    if kind == "background_color":
        assert changed.mean() > 0.5  # the background is most of the picture
        assert pair.source_texts == pair.target_texts
    else:  # text edits: the background, the corners included, is untouched
        assert not changed[0, 0] and not changed[-1, -1] and changed.mean() < 0.5
    # the written source is the rendered one, lossless
    out = io.BytesIO()
    pair.source.save(out, format="PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.getvalue()))), np.asarray(pair.source))


def _applies(kind, index, fonts):
    try:
        render_edit(0, 0, index, fonts, ("en",), kind)
        return True
    except ValueError:
        return False


def test_the_cli_refuses_edit_pairs_of_other_strategies_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path), "--task", "edit", "--strategy", "scene"])
    assert err.value.code == 2
    assert "edit pairs are drawn from the plain strategy only" in capsys.readouterr().err
    assert main([str(tmp_path), "--task", "edit", "--shards", "1", "--per-shard", "2"]) == 0
    meta = json.loads(_members(str(tmp_path / "00000.tar"))["000000001.json"])
    assert meta["strategy"] == "edit" and meta["generator"] == "producer.synthetic"
