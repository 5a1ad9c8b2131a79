"""Per-category sampling weights (megatron_qwen_image.cache.categories, plan.weigh_categories) in the loader."""
import json
from collections import Counter

import pytest

from megatron_qwen_image.cache import BucketedLoader, seal
from megatron_qwen_image.cache.categories import CategoryGroups, category_of, check_category_weights
from megatron_qwen_image.cache.loader import MissingCategoryError
from tests.support.caches import write_unit

# unit 0 (64x64): 12 photos, 4 text renderings; unit 1 (48x80): 8 portraits, 8 without a category
CATEGORIES = {0: ["photo"] * 12 + ["text_rendering"] * 4, 1: ["portrait"] * 8 + [None] * 8}


@pytest.fixture(scope="module")
def categorised(tmp_path_factory):
    root = tmp_path_factory.mktemp("categorised")
    for unit, res in ((0, [64, 64]), (1, [48, 80])):
        write_unit(root, unit, res, n=16, categories=CATEGORIES[unit])
    seal(str(root))
    return str(root)


def _category(key: str):
    unit, *_, index = key.split("/")  # unit-<unit>/synthetic/<index>
    return CATEGORIES[int(unit[len("unit-"):])][int(index)]


def _keys(loader, batches: int) -> list[str]:
    return [k for _ in range(batches) for k in next(loader)["keys"]]


def test_the_test_caches_keys_name_their_category(categorised):
    with BucketedLoader(categorised, 4, seed=1) as loader:
        keys = _keys(loader, 8)
    assert Counter(map(_category, keys)) == {"photo": 12, "text_rendering": 4, "portrait": 8, None: 8}


def test_each_category_supplies_its_share_of_an_epoch_deterministically_and_resumes_exactly(categorised):
    """{photo: 1, text_rendering: 1, *: 2} over 32 samples: 8 photos (of 12, no repeats), 8 text renderings (its 4
    twice each) and 16 of the rest (portraits and the uncategorised, all of them); samples move between buckets
    with their category, so the 64x64 bucket shrinks to 16 samples."""
    kw = dict(global_batch_size=4, seed=7, category_weights={"photo": 1, "text_rendering": 1, "*": 2})
    with BucketedLoader(categorised, **kw) as a, BucketedLoader(categorised, **kw) as b:
        epoch, again = _keys(a, 8), _keys(b, 8)
        assert epoch == again
        counts = Counter(map(_category, epoch))
        assert (counts["photo"], counts["text_rendering"], counts["portrait"] + counts[None]) == (8, 8, 16)
        photos = [k for k in epoch if _category(k) == "photo"]
        texts = Counter(k for k in epoch if _category(k) == "text_rendering")
        assert len(set(photos)) == 8 and sorted(texts.values()) == [2, 2, 2, 2]
        assert a.stats["category_samples"] == {"photo": 12, "text_rendering": 4, "*": 16}
        second = _keys(a, 8)  # the next epoch draws other photos
        assert {k for k in second if _category(k) == "photo"} != set(photos)
        state = json.loads(json.dumps(b.state_dict()))
        after = _keys(b, 3)
    with BucketedLoader(categorised, **kw) as resumed:
        resumed.load_state_dict(state)
        assert _keys(resumed, 3) == after
    with BucketedLoader(categorised, 4, seed=7) as plain, pytest.raises(ValueError, match="category_weights"):
        plain.load_state_dict(state)


def test_samples_of_no_weighted_category_are_left_out_and_counted(categorised):
    with BucketedLoader(categorised, 4, seed=3, category_weights={"photo": 1, "portrait": 0}) as loader:
        assert {_category(k) for k in _keys(loader, 6)} == {"photo"}
        assert loader.stats["category_samples"] == {"photo": 12, "portrait": 0}
        assert loader.stats["unweighted_samples"] == 20
    with BucketedLoader(categorised, 4, seed=3, category_weights={"photo": 1}, streaming=True,
                        stream_round_samples=16) as stream:
        assert {_category(k) for k in _keys(stream, 6)} == {"photo"}


def test_held_out_samples_stay_out_of_the_category_draw(categorised):
    from megatron_qwen_image.cache.holdout import held_out

    with BucketedLoader(categorised, 2, seed=3, category_weights={"photo": 1}, holdout_fraction=0.3) as loader:
        keys = _keys(loader, 6)
        assert {_category(k) for k in keys} == {"photo"} and not any(held_out(k, 0.3) for k in keys)
        assert 0 < loader.stats["category_samples"]["photo"] < 12
        assert loader.stats["category_samples"]["photo"] + loader.stats["held_out_samples"] >= 12


def test_a_category_no_sample_has_and_bad_weights_are_refused(categorised):
    with BucketedLoader(categorised, 4, category_weights={"painting": 1, "*": 1}) as loader:
        with pytest.raises(MissingCategoryError, match=r"categories \['painting'\] that no readable sample .* has"):
            loader.check_trainable()
    for weights, words in (({"photo": 0}, "sum to a positive number"), ({"photo": -1}, "must be a number >= 0"),
                           ({"": 1}, "not a category name"), ({3: 1}, "not a category name"),
                           ([], "must be a mapping")):
        with pytest.raises(ValueError, match=words):
            check_category_weights(weights)


def test_categories_come_from_the_meta_jsons_category_field():
    assert category_of('{"category": " portrait ", "scores": {}}') == "portrait"
    assert category_of('{"source_meta": {"category": "x"}}') is None  # only the top-level field
    assert category_of('{"category": 3}') is None and category_of('{"category": ""}') is None
    assert category_of("{}") is None and category_of('{"category": "a"') is None  # broken JSON: none
    groups = CategoryGroups({"b": 1, "a": 2, "z": 0, "*": 1})
    assert groups.names == ["a", "b", "z", "*"]
    assert [groups.code(c) for c in ("a", "b", "z", "other", None)] == [0, 1, 255, 3, 3]


def test_the_start_up_line_names_each_categorys_share_and_samples(categorised):
    with BucketedLoader(categorised, 4, category_weights={"photo": 1, "*": 3}) as loader:
        loader.check_trainable()
        assert loader.describe_categories() == ("category weights: photo 25% (12 samples), * 75% (20 samples); "
                                                "0 samples of no weighted category left out")
    with BucketedLoader(categorised, 4) as plain:
        assert plain.describe_categories() is None
