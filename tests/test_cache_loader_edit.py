"""The loader over a cache of text-to-image and edit samples: batch groups (bucket x condition shapes), task
weights picked per global batch, compute-balanced sizes that count condition tokens."""
import json
from collections import Counter

import pytest
import torch

from consumer.builders import build_cache_loader
from consumer.config import load_config
from consumer.train import step_batch_sizes
from megatron_qwen_image.cache import BucketedLoader, CacheReader, seal
from megatron_qwen_image.cache.batching import BalancedBatches
from megatron_qwen_image.cache.loader import MissingTaskError, check_task_weights
from megatron_qwen_image.config import ConfigError
from tests.support.caches import small_cache, write_edit_unit, write_unit

COND_WIDE, COND_SQUARE = (16, 6, 10), (16, 8, 8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Bucket 64x64 only: 16 text-to-image samples (unit 0), 16 edit samples with a 48x80 source (unit 1) and
    8 with a 64x64 source (unit 2): three batch groups in one bucket."""
    root = tmp_path_factory.mktemp("mixed")
    write_unit(root, 0, [64, 64], n=16)
    write_edit_unit(root, 1, [64, 64], [48, 80], n=16)
    write_edit_unit(root, 2, [64, 64], [64, 64], n=8)
    seal(str(root))
    return str(root)


def _unit(key: str) -> int:
    return int(key.split("/")[0][len("unit-"):])


def _layout(batch) -> tuple:
    return batch["task"], tuple(tuple(c.shape[1:]) for c in batch["cond_latents"])


@pytest.mark.parametrize("dp_size", [1, 2])
def test_each_batch_is_one_group_and_an_epoch_takes_every_sample_once(mixed, dp_size):
    stored = {}
    reader = CacheReader(mixed)
    for info in reader.shards():
        sf = reader.open(info)
        for i in range(sf.num_samples):
            stored[sf.sample(i)[0]] = [c.clone() for c in sf.conditions(i)]
    want_layout = {0: ("t2i", ()), 1: ("ti2i", (COND_WIDE,)), 2: ("ti2i", (COND_SQUARE,))}
    loaders = [BucketedLoader(mixed, 4, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    try:
        seen = []
        for _ in range(10):  # (16 + 16 + 8) / 4: one epoch
            parts = [next(loader) for loader in loaders]
            for batch in parts:
                units = {_unit(k) for k in batch["keys"]}
                assert len(units) == 1 and _layout(batch) == want_layout[units.pop()]
                for i, key in enumerate(batch["keys"]):
                    for got, want in zip(batch["cond_latents"], stored[key], strict=True):
                        assert torch.equal(got[i], want)
            assert len({_layout(b) for b in parts}) == 1  # the DP ranks share the global batch's group
            seen += [k for b in parts for k in b["keys"]]
        assert sorted(seen) == sorted(stored)
    finally:
        for loader in loaders:
            loader.close()


def test_task_weights_pick_the_task_per_global_batch_deterministically_and_resume_exactly(mixed):
    """{t2i: 3, ti2i: 1} over an epoch of 10 batches: 8 text-to-image batches (its 4, each twice) and 2 edit
    batches (distinct, of the 6)."""
    kw = dict(global_batch_size=4, seed=11, task_weights={"t2i": 3, "ti2i": 1})
    with BucketedLoader(mixed, **kw) as a, BucketedLoader(mixed, **kw) as b:
        epoch = [next(a) for _ in range(10)]
        again = [next(b)["keys"] for _ in range(10)]
        assert [x["keys"] for x in epoch] == again
        tasks = Counter(x["task"] for x in epoch)
        assert tasks == {"t2i": 8, "ti2i": 2}
        t2i = Counter(tuple(x["keys"]) for x in epoch if x["task"] == "t2i")
        assert len(t2i) == 4 and set(t2i.values()) == {2}
        edits = [tuple(x["keys"]) for x in epoch if x["task"] == "ti2i"]
        assert len(set(edits)) == 2
        assert "task weights t2i 75%, ti2i 25% of the steps" in a.describe_tasks()
        assert a.describe_tasks().startswith("tasks: t2i 16 samples, ti2i 24 samples")
        state = json.loads(json.dumps(b.state_dict()))
        after = [next(b)["keys"] for _ in range(4)]
    with BucketedLoader(mixed, **kw) as resumed:
        resumed.load_state_dict(state)
        assert [next(resumed)["keys"] for _ in range(4)] == after
    with BucketedLoader(mixed, 4, seed=11, task_weights={"t2i": 1, "ti2i": 1}) as other:
        with pytest.raises(ValueError, match="cannot resume: loader state has task_weights"):
            other.load_state_dict(state)


def test_edit_only_weights_and_unweighted_mixes(mixed):
    with BucketedLoader(mixed, 4, seed=2, task_weights={"t2i": 0, "ti2i": 1}) as edits_only:
        assert {next(edits_only)["task"] for _ in range(10)} == {"ti2i"}
    with BucketedLoader(mixed, 4, seed=2) as plain:  # no weights: each group in proportion to its samples
        assert Counter(next(plain)["task"] for _ in range(10)) == {"t2i": 4, "ti2i": 6}
        assert "no task_weights" in plain.describe_tasks()


def test_a_stream_plans_groups_and_task_weights_as_an_epoch_does(mixed):
    with BucketedLoader(mixed, 4, seed=5, streaming=True, stream_round_samples=8,
                        task_weights={"t2i": 1, "ti2i": 1}) as loader:
        batches = [next(loader) for _ in range(12)]
    for batch in batches:
        assert len({_unit(k) for k in batch["keys"]}) == 1
    assert {_layout(b) for b in batches} == {("t2i", ()), ("ti2i", (COND_WIDE,)), ("ti2i", (COND_SQUARE,))}


def test_a_missing_task_and_bad_weights_are_refused_in_one_line(tmp_path):
    t2i_only = small_cache(tmp_path / "t2i")
    seal(t2i_only)
    with BucketedLoader(t2i_only, 4, task_weights={"t2i": 0.8, "ti2i": 0.2}) as loader:
        with pytest.raises(MissingTaskError, match=r"tasks \['ti2i'\] that no readable sample .* holds t2i=32"):
            loader.check_trainable()
    for bad, match in (({"edit": 1}, "'edit' is not a task; use t2i or ti2i"), ({"t2i": -1}, "must be a number >= 0"),
                       ({"t2i": 0}, "must sum to a positive number"), ([0.5], "must be a mapping of task")):
        with pytest.raises(ValueError, match=match):
            check_task_weights(bad)
    with pytest.raises(ConfigError, match="data.cache.task_weights.*'edit' is not a task"):
        load_config("configs/smoke_tp2.yaml", ["data.source=cache", "data.cache.task_weights={edit: 1}"])
    with pytest.raises(ConfigError, match="data.cache.task_weights.*needs data.source=cache"):
        load_config("configs/smoke_tp2.yaml", ["data.cache.task_weights={ti2i: 1}"])
    cfg = load_config("configs/smoke_tp2.yaml", ["data.source=cache", f"data.cache_dir={t2i_only}",
                                                 "data.cache.task_weights={ti2i: 1}"])
    with pytest.raises(ConfigError, match=r"data.cache.task_weights.*\['ti2i'\]"):
        build_cache_loader(cfg, 0, 1)


def test_balanced_batches_count_the_condition_tokens_as_the_train_step_does(mixed):
    cfg = load_config("configs/smoke_tp2.yaml", ["data.source=cache", f"data.cache_dir={mixed}",
                                                 "train.batching=balanced", "train.balance_resolution=64",
                                                 "train.balance_text_tokens=8", "train.global_batch_size=8",
                                                 "train.micro_batch_size=4"])
    plan = cfg.balanced_batches(1)
    assert isinstance(plan, BalancedBatches)
    # 16 target tokens; a 6x10 source adds 15, an 8x8 one 16: fewer samples per step, as many FLOPs
    sizes = {layout: plan.global_batch((64, 64), layout) for layout in ((), (COND_WIDE,), (COND_SQUARE,))}
    assert sizes[()] == 8 and sizes[(COND_WIDE,)] < 8 and sizes[(COND_SQUARE,)] < 8
    assert plan.micro_batch((64, 64), (COND_WIDE,)) < plan.micro_batch((64, 64)) == 4
    assert plan.step_cost((64, 64), (COND_WIDE,)) == pytest.approx(1.0, abs=0.3)
    with build_cache_loader(cfg, 0, 1) as loader:
        for _ in range(12):
            batch = next(loader)
            layout = _layout(batch)[1]
            assert len(batch["keys"]) == sizes[layout]
            assert step_batch_sizes(cfg, 1, batch["latents"].shape[-2:], layout) == \
                (sizes[layout], plan.micro_batch((64, 64), layout))
