"""Compute-balanced global batches (megatron_qwen_image.cache.batching) and the loader that plans with them."""
import json

import pytest
import torch

from megatron_qwen_image.cache import BucketedLoader
from megatron_qwen_image.cache.batching import BalancedBatches
from megatron_qwen_image.cache.buckets import buckets_for_base
from tests.support.caches import write_unit


def test_planned_step_cost_varies_at_most_15_percent_over_a_mixed_640_1328_stage():
    """The released 20B width, TP4 x DP8 with micro-batch 2 and 256 samples per 640p step: every bucket of the 640
    and 1328 families gets a step within 15 % of the reference cost, fewer 1328p samples than 640p ones, and a
    global batch that splits into whole micro-batches on every DP rank."""
    plan = BalancedBatches(global_batch_size=256, micro_batch_size=2, reference_resolution=640, text_tokens=512,
                           hidden_size=3072, data_parallel_size=8)
    buckets = buckets_for_base(640) + buckets_for_base(1328)
    costs = [plan.step_cost(b) for b in buckets]
    assert max(costs) / min(costs) <= 1.15, costs
    for b in buckets:
        assert plan.global_batch(b) % (plan.micro_batch(b) * 8) == 0
        # the memory bound: a micro-batch costs at most 1.1 x the reference's, down to one sample per micro-batch
        mb = plan.micro_batch(b)
        assert mb == 1 or mb * plan.sample_cost(*b) <= 1.1 * 2 * plan.sample_cost(640, 640)
    assert plan.global_batch((1328, 1328)) < plan.global_batch((640, 640)) / 4  # attention makes 1328p dearer
    # the cost counts attention: a 1328^2 sample is 5.4 x a 640^2 one without text, not the 4.3 x of its tokens
    bare = BalancedBatches(256, 2, 640, 0, 3072, 8)
    assert bare.sample_cost(1328, 1328) / bare.sample_cost(640, 640) == pytest.approx(5.44, abs=0.01)


def test_bad_batching_arguments_are_refused():
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        BalancedBatches(8, 0, 64, 8, 4)
    with pytest.raises(ValueError, match="data_parallel_size=2 is not dp_size=1"):
        BucketedLoader("unused", 8, batching=BalancedBatches(8, 2, 64, 8, 4, 2))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two buckets whose samples cost 1 : 6 (64x64 and 128x128 pixels) under the plan below."""
    root = tmp_path_factory.mktemp("mixed")
    for unit, res in enumerate([[64, 64], [64, 64], [128, 128]]):
        write_unit(root, unit, res, n=16)
    plan = BalancedBatches(global_batch_size=8, micro_batch_size=2, reference_resolution=64, text_tokens=8,
                           hidden_size=4, data_parallel_size=2)
    assert (plan.global_batch((64, 64)), plan.global_batch((128, 128))) == (8, 2)
    return str(root), plan


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_gives_each_bucket_its_balanced_batch_split_over_dp(mixed):
    root, plan = mixed
    with BucketedLoader(root, 8, 0, 2, seed=3, batching=plan) as r0, BucketedLoader(root, 8, 1, 2, seed=3,
                                                                                    batching=plan) as r1:
        sizes = set()
        for a, b in zip(_take(r0, 12), _take(r1, 12)):
            hw = tuple(a["latents"].shape[-2:])
            assert hw == tuple(b["latents"].shape[-2:])  # one bucket per global batch
            bucket = (hw[1] * 8, hw[0] * 8)
            assert len(a["keys"]) == len(b["keys"]) == plan.global_batch(bucket) // 2
            assert not set(a["keys"]) & set(b["keys"])
            sizes.add((bucket, len(a["keys"])))
        assert sizes == {((64, 64), 4), ((128, 128), 1)}


def test_balanced_loader_resumes_exactly_and_refuses_other_batching(mixed):
    root, plan = mixed
    kw = dict(global_batch_size=8, dp_rank=0, dp_size=2, seed=5, batching=plan)
    with BucketedLoader(root, **kw) as full:
        reference = _take(full, 10)
    with BucketedLoader(root, **kw) as first:
        _take(first, 4)
        state = json.loads(json.dumps(first.state_dict()))
    with BucketedLoader(root, **kw) as resumed:
        resumed.load_state_dict(state)
        rest = _take(resumed, 6)
    for x, y in zip(reference[4:], rest):
        assert x["keys"] == y["keys"] and torch.equal(x["latents"], y["latents"])
    with BucketedLoader(root, 8, 0, 2, seed=5) as fixed:
        with pytest.raises(ValueError, match="batching"):
            fixed.load_state_dict(state)


@pytest.mark.slow
def test_balanced_training_run_takes_per_bucket_batches_and_resumes_exactly_mid_stage(mixed, tmp_path):
    """consumer.train at TP=1 x DP=2 with train.batching=balanced on the two-bucket cache: 64x64 steps take 8
    samples, 128x128 steps 2 (one micro-batch of 1 per rank); consumed_samples counts them; resumed from the
    step-4 checkpoint, steps 5-8 reproduce the uninterrupted run."""
    from tests.torchrun import torchrun

    root, _ = mixed
    common = ["--config", "configs/smoke_tp2.yaml", "parallelism.tensor_model_parallel_size=1",
              "parallelism.sequence_parallel=false", "--data", "cache", "--cache-dir", root, "train.batching=balanced",
              "train.balance_resolution=64", "train.balance_text_tokens=8", "train.global_batch_size=8",
              "train.micro_batch_size=2", "train.train_iters=8", "train.seed=3"]
    out = torchrun(2, ["-m", "consumer.train", *common, "--save", str(tmp_path / "ckpt"), "--save-interval", "4",
                       "--log-jsonl", str(tmp_path / "full.jsonl")], timeout=300)
    assert "compute-balanced per bucket" in out
    full = [json.loads(line) for line in open(tmp_path / "full.jsonl")]
    by_bucket = {tuple(r["latent_hw"]): (r["samples"], r["micro_batch"]) for r in full}
    assert by_bucket == {(8, 8): (8, 2), (16, 16): (2, 1)}, by_bucket
    total = 0
    for r in full:
        total += r["samples"]
        assert r["consumed_samples"] == total and r["image_tokens"] == r["samples"] * (r["latent_hw"][0] // 2) ** 2
    torchrun(2, ["-m", "consumer.train", *common, "--load", str(tmp_path / "ckpt" / "iter_0000004"),
                 "--log-jsonl", str(tmp_path / "resumed.jsonl")], timeout=300)
    resumed = [json.loads(line) for line in open(tmp_path / "resumed.jsonl")]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(full[4:], resumed):
        assert a["latent_hw"] == b["latent_hw"] and a["consumed_samples"] == b["consumed_samples"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Two bucket families: 16 samples of 256x256 (base 256) and 16 of 640x640 (base 640)."""
    root = tmp_path_factory.mktemp("families")
    write_unit(root, 0, [256, 256], n=16, base_resolution=256)
    write_unit(root, 1, [640, 640], n=16, base_resolution=640)
    return str(root)


def _families_of(batches):
    return [b["latents"].shape[-1] * 8 for b in batches]  # square buckets: the family's side


def test_family_weights_set_each_familys_share_of_an_epoch_deterministically(families):
    """{256: 3, 640: 1} with 2 samples per batch: 16 batches per epoch, 12 of the 256 family (its 8 batches and
    4 repeats) and 4 of the 640 family (half of its 8); the same for every loader, and exactly resumable."""
    kw = dict(global_batch_size=2, seed=7, family_weights={256: 3, 640: 1})
    with BucketedLoader(families, **kw) as a, BucketedLoader(families, **kw) as b:
        first, again = _take(a, 16), _take(b, 16)
        assert [x["keys"] for x in first] == [x["keys"] for x in again]
        counts = _families_of(first)
        assert (counts.count(256), counts.count(640)) == (12, 4)
        state = json.loads(json.dumps(a.state_dict()))
        after = _take(a, 5)
    with BucketedLoader(families, **kw) as resumed:
        resumed.load_state_dict(state)
        assert [x["keys"] for x in _take(resumed, 5)] == [x["keys"] for x in after]
    with BucketedLoader(families, global_batch_size=2, seed=7, family_weights={640: 1}) as only:
        assert set(_families_of(_take(only, 8))) == {640}
    with BucketedLoader(families, global_batch_size=2, seed=7) as plain, pytest.raises(ValueError, match="family_weights"):
        plain.load_state_dict(state)


def test_bad_family_weights_are_refused_naming_the_problem(families):
    from megatron_qwen_image.cache.loader import MissingFamilyError

    with BucketedLoader(families, 2, family_weights={640: 0.7, 1328: 0.3}) as loader:
        with pytest.raises(MissingFamilyError, match=r"bucket families \[1328\] that .* holds no readable sample"):
            loader.check_trainable()
    for weights, words in (({640: 0, 256: 0}, "sum to a positive number"), ({640: -1}, "must be a number >= 0"),
                           ({"big": 1}, "not a base resolution"), ({}, "must be a mapping")):
        with pytest.raises(ValueError, match=words):
            BucketedLoader(families, 2, family_weights=weights)


def test_held_out_samples_come_from_the_stages_families_only(families):
    from consumer.validation_loss import load_held_out

    both = load_held_out(families, 0.5, 100)
    only = load_held_out(families, 0.5, 100, families={640})
    assert {s.latent.shape[-1] for s in both} == {32, 80} and {s.latent.shape[-1] for s in only} == {80}
    assert [s.key for s in only] == [s.key for s in both if s.latent.shape[-1] == 80]
