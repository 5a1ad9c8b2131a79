"""Each sample's category (producer/categories.py): from the input's metadata, a caption rule or the default, stored
as the top-level `category` of the sample's meta JSON, counted in the producer's report; read back by the trainer's
loader (megatron_qwen_image.cache.categories)."""
import pytest

from megatron_qwen_image.cache import CacheReader
from megatron_qwen_image.cache.categories import category_of
from megatron_qwen_image.cache.shard import ShardFile
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.categories import UNCATEGORISED, CategoryConfig, CategoryRule, Categorizer
from producer.config import load_config
from producer.report import ProgressReporter, RunStats, ShardOutcomes, format_table
from producer.sources import discover_shards
from producer.synthetic import generate_shards
from producer.workers import CpuWorker, EncoderWorker


def test_the_field_then_the_first_matching_rule_then_the_default():
    rules = [CategoryRule("portrait", r"(?i)\bportrait\b"), CategoryRule("text_rendering", r"the text \"")]
    pick = Categorizer(CategoryConfig(field="labels.kind", rules=rules, default="general"))
    assert pick({"labels": {"kind": " poster "}}, "a portrait") == "poster"
    assert pick({"labels": {"kind": 7}}, "") == "7"  # an integer label
    for meta in ({}, {"labels": {"kind": ""}}, {"labels": {"kind": ["a"]}}, {"labels": {"kind": True}}, {"labels": 3}):
        assert pick(meta, "A Portrait with the text \"hi\"") == "portrait"
    assert pick({}, 'a sign with the text "hi"') == "text_rendering"
    assert pick({}, "a cat") == "general"
    assert Categorizer(CategoryConfig(field=None))({"category": "x"}, "a cat") is None


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """One synthetic shard (its JSON sidecars say category text_rendering) through the CPU and encoder actors'
    code, once with the default categories and once with the field off and caption rules instead."""
    tiny = ensure_tiny()
    [spec] = discover_shards(generate_shards(str(tmp_path_factory.mktemp("syn")), num_shards=1, per_shard=6, seed=4))
    out = {}
    for name, extra in (("field", []), ("rules", ["categories.field=null", "categories.default=plain",
                                                  "categories.rules=[{category: two_lines, caption: 'on 2 lines'}]"])):
        cfg = load_config("configs/producer/default.yaml", [f"encoders.dir={tiny}", *extra])
        cache = str(tmp_path_factory.mktemp(name))
        chunks = list(CpuWorker(cfg).process_shard(spec, chunk_size=3))
        enc = EncoderWorker(cfg, cache)
        stats = RunStats()
        for c in chunks:
            stats.add_chunk(enc.add_chunk(spec.work_unit, 0, c))
        enc.commit(spec.work_unit, 0, len(chunks))
        out[name] = cache, stats
    return out


def test_the_stored_meta_carries_the_category_and_the_report_counts_it(produced):
    cache, stats = produced["field"]
    records = list(CacheReader(cache).iter_records())
    assert len(records) == 6 and {r["meta"]["category"] for r in records} == {"text_rendering"}
    assert stats.categories == {"text_rendering": 6}
    report = ProgressReporter(1, 0).final(stats, 1.0, {}, ShardOutcomes(1))
    assert report["categories"] == {"text_rendering": 6}
    assert "text_rendering                   6     100.0%" in format_table(report)


def test_caption_rules_and_the_default_when_the_field_is_not_read(produced):
    cache, stats = produced["rules"]
    records = list(CacheReader(cache).iter_records())
    expected = {r["key"]: "two_lines" if "on 2 lines" in r["caption"] else "plain" for r in records}
    assert {r["key"]: r["meta"]["category"] for r in records} == expected
    assert sum(stats.categories.values()) == 6 and set(stats.categories) == {"two_lines", "plain"}
    # what the trainer's loader reads: the stored meta JSON's top-level field
    metas = [m for shard in CacheReader(cache).shards() for m in ShardFile(cache, shard, "none").column("meta")]
    assert sorted(category_of(m) for m in metas) == sorted(expected.values())


def test_samples_nothing_categorises_store_none_and_are_counted_as_such():
    assert Categorizer(CategoryConfig())({"other": 1}, "x") is None
    stats = RunStats()
    stats.add_chunk({"seen": 1, "written": 1, "drops": {}, "buckets": {"256x256": 1}, "categories": {UNCATEGORISED: 1}})
    assert stats.categories == {"(none)": 1}
