"""Stage-to-stage hand-off of the curriculum (docs/curriculum.md), on 2 CPU processes at TP=2:

* stage 1 trains 3 steps on a cache of two small buckets and saves;
* a start from its checkpoint with --pretrained --pretrained-optimizer holds the same weights and the same Adam
  moments as a full resume of it (bit for bit), but step 0, the fresh LR schedule and the data from the start;
  --pretrained alone holds the same weights and no optimizer state;
* stage 2 then trains on a cache of another bucket family from that hand-off: steps 1.., the warm-up from its
  start, batches of the new cache's bucket only;
* the hand-off refuses a checkpoint that holds no optimizer state, and the flag without --pretrained.
"""
import glob
import json

import pytest
import torch
from safetensors.torch import load_file

from consumer.config import load_config
from consumer.start_point import start_point
from megatron_qwen_image.config import ConfigError
from tests.support.caches import small_cache
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handoff")
    cache = small_cache(tmp / "cache_a")
    torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "--data", "cache", "--cache-dir", cache,
                 "train.train_iters=3", "--save", str(tmp / "stage1"), "--log-jsonl", str(tmp / "stage1.jsonl")],
             timeout=300)
    return {"tmp": tmp, "cache": cache, "ckpt": str(tmp / "stage1" / "iter_0000003")}


def test_handoff_takes_weights_and_optimizer_but_starts_schedule_step_and_data_fresh(stage1):
    prefix = str(stage1["tmp"] / "starts")
    torchrun(2, ["tests/dist/handoff_worker.py", "--ckpt", stage1["ckpt"], "--out", prefix, "data.source=cache",
                 f"data.cache_dir={stage1['cache']}", "train.train_iters=3"], timeout=300)
    for rank in (0, 1):
        info = json.load(open(f"{prefix}.rank{rank}.json"))
        t = load_file(f"{prefix}.rank{rank}.safetensors")
        assert (info["resume"]["step"], info["handoff"]["step"], info["weights"]["step"]) == (3, 0, 0)
        assert info["handoff"]["consumed_samples"] == 0 and info["resume"]["consumed_samples"] == 12
        fresh = info["weights"]["lr"]
        assert info["handoff"]["lr"] == fresh != info["resume"]["lr"]  # the new stage's schedule from its start
        assert info["handoff"]["data_position"]["step"] == 0 < info["resume"]["data_position"]["step"]
        for start in ("handoff", "weights"):
            assert torch.equal(t[f"{start}/output"], t["resume/output"])
        moments = sorted(k.split("/", 1)[1] for k in t if k.startswith("resume/exp_avg"))
        assert moments and info["resume"]["has_adam_state"] and not info["weights"]["has_adam_state"]
        assert all(torch.equal(t[f"handoff/{k}"], t[f"resume/{k}"]) for k in moments)
        assert any(t[f"resume/{k}"].abs().max() > 0 for k in moments)


def test_next_stage_trains_on_its_own_cache_from_the_handoff(stage1):
    tmp = stage1["tmp"]
    cache_b = small_cache(tmp / "cache_b", resolutions=[(80, 80)], seed=6)
    jsonl = tmp / "stage2.jsonl"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "--data", "cache",
                       "--cache-dir", cache_b, "train.train_iters=3", "optimizer.lr=1e-3", "optimizer.min_lr=1e-4",
                       "--pretrained", stage1["ckpt"], "--pretrained-optimizer", "--log-jsonl", str(jsonl)], timeout=300)
    assert f"model weights and optimizer state from {stage1['ckpt']} (schedule, step and data fresh)" in out
    records = [json.loads(line) for line in open(jsonl)]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] == 0.0  # schedule.lr_warmup_init: the warm-up starts again
    # to the new stage's optimizer.lr (1e-3), not stage 1's (5e-3) that its optimizer state's param groups carry
    assert 0 < max(r["lr"] for r in records) <= 1e-3
    assert {tuple(r["latent_hw"]) for r in records} == {(10, 10)}


def test_handoff_refusals(stage1, tmp_path):
    imported = glob.glob(str(stage1["tmp"] / "stage1" / "iter_*"))[0]
    cfg = load_config("configs/smoke_tp2.yaml", [f"checkpoint.pretrained={imported}",
                                                 "checkpoint.pretrained_optimizer=true"])
    assert start_point(cfg.checkpoint).with_optimizer
    with pytest.raises(ConfigError, match="checkpoint.pretrained_optimizer.*needs checkpoint.pretrained"):
        start_point(load_config("configs/smoke_tp2.yaml", ["checkpoint.pretrained_optimizer=true"]).checkpoint)
    from megatron_qwen_image.convert.importer import import_diffusers
    from tests.reference_models import build_tiny_diffusers_transformer

    build_tiny_diffusers_transformer(seed=1).save_pretrained(str(tmp_path / "release"))
    import_diffusers(str(tmp_path / "release"), str(tmp_path / "imported"), progress=False)
    cfg = load_config("configs/smoke_tp2.yaml", [f"checkpoint.pretrained={tmp_path / 'imported'}",
                                                 "checkpoint.pretrained_optimizer=true"])
    with pytest.raises(ConfigError, match="holds model state, not a training checkpoint's optimizer"):
        start_point(cfg.checkpoint)
