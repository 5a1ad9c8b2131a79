"""Validation loss on held-out data: the key-hash split (the loader never trains on a held-out key, the
validation set is exactly those keys, resume refuses another fraction), the loss against diffusers' model, the
same numbers at TP=1/DP=1, TP=2 (sequence parallel) and DP=2, and the refusal of a split that selects nothing."""
import json
import os

import pytest
import torch
from diffusers import QwenImagePipeline

from consumer.validation_loss import DEFAULT_SIGMAS, load_held_out, validation_loss
from megatron_qwen_image.cache import BucketedLoader, CacheReader, CacheWriter, seal
from megatron_qwen_image.cache.exclusions import write_exclusions
from megatron_qwen_image.cache.holdout import hash_unit, held_out
from megatron_qwen_image.flow_matching import sample_seed
from tests.reference_models import (TINY_DIFFUSERS_CONFIG, build_tiny_diffusers_transformer, megatron_from_diffusers,
                                    single_process_model_parallel)
from tests.torchrun import torchrun

TEXT_DIM = TINY_DIFFUSERS_CONFIG["joint_attention_dim"]
SHAPES = ((16, 4, 6), (16, 4, 4))  # latent [C, H, W] of two buckets (6 and 4 image tokens)
SEED = 5
FRACTION = 0.3
VAL_SAMPLES = 7  # odd: DP=2 splits them unevenly


def write_cache(root, units: int, per_shape: int, max_shard_samples: int = 1 << 30) -> dict:
    """`units` work units of `per_shape` samples of each latent shape (text 1..9 tokens); returns
    {key: (latent, text)} as stored (bf16)."""
    data = {}
    for unit in range(units):
        g = torch.Generator().manual_seed(unit)
        with CacheWriter(root, f"unit-{unit}", max_shard_samples=max_shard_samples) as w:
            for i in range(per_shape * len(SHAPES)):
                key = f"u{unit}-{i}"
                lat = torch.randn(SHAPES[i % len(SHAPES)], generator=g)
                txt = torch.randn(1 + (3 * i + unit) % 9, TEXT_DIM, generator=g)
                w.add(key, lat, txt)
                data[key] = (lat.to(torch.bfloat16), txt.to(torch.bfloat16))
    seal(root)
    return data


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("split") / "cache")
    return root, write_cache(root, units=4, per_shape=7, max_shard_samples=4)  # 56 samples in 16 shards


@pytest.fixture(scope="module")
def val_cache(tmp_path_factory):
    """A separate validation cache of 8 samples in two buckets; validation takes VAL_SAMPLES of them."""
    root = str(tmp_path_factory.mktemp("val") / "cache")
    return root, write_cache(root, units=1, per_shape=4)


def test_held_out_is_a_stable_key_hash_split():
    keys = [f"sample-{i}" for i in range(2000)]
    small = {k for k in keys if held_out(k, 0.1)}
    large = {k for k in keys if held_out(k, FRACTION)}
    assert small < large  # raising the fraction only adds samples
    assert 0.25 < len(large) / len(keys) < 0.35
    assert all(0 <= hash_unit(k) < 1 for k in keys)
    assert hash_unit("sample-0") == 0.14025811428819746  # the split must never move
    assert not any(held_out(k, 0.0) for k in keys)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="holdout_fraction"):
            held_out("k", bad)


def test_loader_never_yields_a_held_out_key_and_validation_reads_exactly_those(split_cache):
    root, data = split_cache
    held = {k for k in data if held_out(k, FRACTION)}
    train = set(data) - held
    assert held and train
    with BucketedLoader(root, 1, seed=3, prefetch=0, holdout_fraction=FRACTION) as loader:
        seen = [key for _ in range(len(train)) for key in next(loader)["keys"]]  # one epoch of G=1
        assert sorted(seen) == sorted(train)  # every training key once, no held-out key
        assert loader.state_dict()["position"]["epoch"] == 0
        assert not set(next(loader)["keys"]) & held  # the next epoch starts, still without them
        assert loader.stats["held_out_samples"] == len(held)
        state = json.loads(json.dumps(loader.state_dict()))

    samples = load_held_out(root, FRACTION, max_samples=1000)
    assert [s.key for s in samples] == sorted(held, key=hash_unit)
    for s in samples:
        lat, txt = data[s.key]
        assert torch.equal(s.latent, lat) and torch.equal(s.text, txt)
        s.latent.add_(1)  # copies, not the read-only shard maps
    assert [s.key for s in load_held_out(root, FRACTION, max_samples=3)] == [s.key for s in samples[:3]]

    for other in (0.0, 0.2):
        with BucketedLoader(root, 1, seed=3, prefetch=0, holdout_fraction=other) as resumed:
            with pytest.raises(ValueError, match="holdout_fraction"):
                resumed.load_state_dict(state)
    with BucketedLoader(root, 1, seed=3, prefetch=0, holdout_fraction=FRACTION) as resumed:
        resumed.load_state_dict(state)
        assert not set(next(resumed)["keys"]) & held


def test_a_shard_that_fails_to_open_for_its_keys_is_left_out_as_unreadable(tmp_path, caplog):
    root = str(tmp_path / "cache")
    data = write_cache(root, units=2, per_shape=3)
    reader = CacheReader(root)
    broken = reader.shards()[0]
    path = os.path.join(root, broken.path)
    with open(path, "r+b") as f:  # same size (passes the planner's stat check), no Arrow footer
        f.seek(-12, os.SEEK_END)
        f.write(b"\0" * 12)
    lost = {k for k in data if k.startswith("u0-") and data[k][0].shape == broken.latent_shape}
    with BucketedLoader(root, 1, prefetch=0, holdout_fraction=0.5) as loader:
        keys = [k for _ in range(4) for k in next(loader)["keys"]]
        stats = loader.stats
    assert stats["unreadable_shards"] == 1 and stats["unreadable_samples"] == len(lost) == 3
    assert "unreadable Arrow shard" in stats["unreadable_shard_reasons"][broken.path]
    assert not set(keys) & lost
    samples = load_held_out(root, 0.5, max_samples=100)
    assert {s.key for s in samples} == {k for k in data if held_out(k, 0.5)} - lost
    assert "skipping corrupt shard" in caplog.text


def test_excluded_samples_are_neither_trained_nor_validated_on(tmp_path):
    root = str(tmp_path / "cache")
    data = write_cache(root, units=2, per_shape=3)
    reader = CacheReader(root)
    rows, excluded = {}, set()
    for info in reader.shards():  # rows 0 and 2 of every shard
        keys = reader.open(info).column("key")
        rows[info.path] = [0, 2]
        excluded |= {keys[0], keys[2]}
    write_exclusions(root, rows, {"tool": "test"})
    held = {k for k in data if held_out(k, 0.5)}
    assert excluded & held and excluded - held
    for fraction in (0.0, 0.5):
        train = set(data) - excluded - {k for k in data if held_out(k, fraction)}
        with BucketedLoader(root, 1, prefetch=0, holdout_fraction=fraction) as loader:
            assert sorted(k for _ in range(len(train)) for k in next(loader)["keys"]) == sorted(train)
    assert {s.key for s in load_held_out(root, 0.5, max_samples=100)} == held - excluded


def test_bad_holdout_input_is_refused_in_one_line(split_cache):
    root, data = split_cache
    tiny = min(hash_unit(k) for k in data) / 2  # below every key's hash: selects none
    with pytest.raises(ValueError, match=r"no held-out samples in .* \(holdout_fraction=.* of 56 samples selects "
                                         r"none\): raise the fraction or give validation.loss_cache_dir") as e:
        load_held_out(root, tiny, max_samples=10)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holdout_fraction=1.5"):
        BucketedLoader(root, 1, holdout_fraction=1.5)
    with pytest.raises(ValueError, match="max_samples"):
        load_held_out(root, FRACTION, max_samples=0)


def reference_validation_loss(diff, data: dict, sigmas, seed: int) -> dict:
    """Straightforward: each sample alone through diffusers' model, x_t = s*n + (1-s)*x0, target n - x0, MSE;
    the noise per sample from its key (sample_seed(seed, -1, key)), the same at every sigma."""
    by_sigma = {}
    for sigma in sigmas:
        losses = []
        for key, (lat, txt) in data.items():
            x0 = lat.float()[None]
            c, h, w = lat.shape
            n = torch.randn((c, h, w), generator=torch.Generator().manual_seed(sample_seed(seed, -1, key)))[None]
            x_t = QwenImagePipeline._pack_latents(sigma * n + (1 - sigma) * x0, 1, c, h, w)
            target = QwenImagePipeline._pack_latents(n - x0, 1, c, h, w)
            with torch.no_grad():
                pred = diff(hidden_states=x_t, encoder_hidden_states=txt.float()[None],
                            encoder_hidden_states_mask=torch.ones(1, txt.shape[0], dtype=torch.bool),
                            timestep=torch.tensor([sigma]), img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
            losses.append(((pred - target) ** 2).mean().item())
        by_sigma[sigma] = sum(losses) / len(losses)
    return by_sigma


@pytest.fixture(scope="module")
def single_process_result(val_cache):
    root, _ = val_cache
    diff = build_tiny_diffusers_transformer(seed=0)
    samples = load_held_out(root, None, max_samples=VAL_SAMPLES)
    with single_process_model_parallel():
        model = megatron_from_diffusers(diff).eval()
        results = {mb: validation_loss(model, samples, DEFAULT_SIGMAS, SEED, mb, 2, torch.device("cpu"),
                                       torch.float32) for mb in (2, 1)}
    return diff, samples, results


def test_validation_loss_matches_diffusers_evaluated_directly(val_cache, single_process_result):
    _, data = val_cache
    diff, samples, results = single_process_result
    got = results[2]
    assert got["val_samples"] == len(samples) == VAL_SAMPLES
    assert {s.latent.shape for s in samples} == {torch.Size(shape) for shape in SHAPES}
    assert len({s.text.shape[0] for s in samples}) > 2
    assert list(got["val_loss_by_sigma"]) == list(DEFAULT_SIGMAS)
    want = reference_validation_loss(diff, {s.key: data[s.key] for s in samples}, DEFAULT_SIGMAS, SEED)
    assert got["val_loss_by_sigma"] == pytest.approx(want, rel=1e-5)
    assert got["val_loss"] == pytest.approx(sum(want.values()) / len(want), rel=1e-5)
    assert len(set(want.values())) == len(want)  # the sigmas are really different evaluations
    # batching is no part of the number
    assert results[1]["val_loss"] == pytest.approx(got["val_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def two_process_results(val_cache, tmp_path_factory):
    root, _ = val_cache
    out = tmp_path_factory.mktemp("validation_loss_dist")
    torchrun(2, ["tests/dist/validation_loss_worker.py", "--cache", root, "--out", str(out), "--seed", str(SEED),
                 "--max-samples", str(VAL_SAMPLES), "--micro-batch-size", "2"], timeout=300)
    return {layout: [json.loads((out / f"{layout}-rank{r}.json").read_text()) for r in range(2)]
            for layout in ("tp", "dp")}


@pytest.mark.parametrize("layout,tp", [("tp", 2), ("dp", 1)], ids=["tp2-sequence-parallel", "dp2"])
def test_the_same_numbers_on_every_layout(single_process_result, two_process_results, layout, tp):
    _, _, results = single_process_result
    want = results[2]
    for rank in two_process_results[layout]:
        assert rank["tp"] == tp and rank["val_samples"] == want["val_samples"]
        assert rank["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
        got = {float(s): v for s, v in rank["val_loss_by_sigma"].items()}
        assert got == pytest.approx(want["val_loss_by_sigma"], rel=1e-6)


def test_edit_samples_are_scored_with_their_conditions_and_per_task(tmp_path):
    """A held-out set of text-to-image and edit samples: each edit sample's loss is diffusers' model on
    [x_t, clean condition tokens] scored on the target's tokens; the loss is reported per task too."""
    root = str(tmp_path / "cache")
    g = torch.Generator().manual_seed(1)
    data = {}
    with CacheWriter(root, "mixed") as w:
        for i in range(4):
            lat, txt = torch.randn(16, 4, 4, generator=g), torch.randn(3 + i, TEXT_DIM, generator=g)
            conds = [torch.randn(16, 2, 4, generator=g)] if i % 2 else []
            w.add(f"s{i}", lat, txt, cond_latents=conds or None)
            data[f"s{i}"] = (lat.to(torch.bfloat16), txt.to(torch.bfloat16), [c.to(torch.bfloat16) for c in conds])
    seal(root)
    samples = load_held_out(root, None, max_samples=4)
    assert sorted(s.task for s in samples) == ["t2i", "t2i", "ti2i", "ti2i"]
    # a stage that trains one task (data.cache.task_weights) validates on that task alone
    assert [s.task for s in load_held_out(root, None, max_samples=4, tasks={"t2i"})] == ["t2i", "t2i"]
    diff = build_tiny_diffusers_transformer(seed=3, zero_cond_t=True)
    sigmas = (0.4,)
    with single_process_model_parallel():
        got = validation_loss(megatron_from_diffusers(diff).eval(), samples, sigmas, SEED, 2, 2, torch.device("cpu"),
                              torch.float32)
    want = {"t2i": [], "ti2i": []}
    for key, (lat, txt, conds) in data.items():
        c, h, w = lat.shape
        n = torch.randn((c, h, w), generator=torch.Generator().manual_seed(sample_seed(SEED, -1, key)))[None]
        x_t = QwenImagePipeline._pack_latents(0.4 * n + 0.6 * lat.float()[None], 1, c, h, w)
        shapes = [(1, h // 2, w // 2)]
        for cond in conds:
            x_t = torch.cat([x_t, QwenImagePipeline._pack_latents(cond.float()[None], 1, *cond.shape)], dim=1)
            shapes.append((1, cond.shape[1] // 2, cond.shape[2] // 2))
        with torch.no_grad():
            pred = diff(hidden_states=x_t, encoder_hidden_states=txt.float()[None],
                        encoder_hidden_states_mask=torch.ones(1, txt.shape[0], dtype=torch.bool),
                        timestep=torch.tensor([0.4]), img_shapes=[shapes], return_dict=False)[0][:, :h * w // 4]
        target = QwenImagePipeline._pack_latents(n - lat.float()[None], 1, c, h, w)
        want["ti2i" if conds else "t2i"].append(((pred - target) ** 2).mean().item())
    assert got["val_loss_by_task"] == pytest.approx({t: sum(v) / len(v) for t, v in want.items()}, rel=1e-5)
    assert got["val_loss"] == pytest.approx(sum(sum(v) for v in want.values()) / 4, rel=1e-5)
