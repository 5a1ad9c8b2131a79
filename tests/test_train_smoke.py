"""configs/smoke_tp2.yaml trains 20 steps on 2 CPU processes (TP=2, distributed optimizer, full recompute)
with a falling loss; stats reach the console, TensorBoard and the JSONL file."""
import glob
import json
import math

from consumer.config import load_config
from tests.torchrun import torchrun


def test_smoke_tp2_trains_20_steps_with_falling_loss(tmp_path):
    jsonl, tb = tmp_path / "stats.jsonl", tmp_path / "tb"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "--data", "synthetic",
                       "--log-jsonl", str(jsonl), "--tensorboard-dir", str(tb)], timeout=300)
    assert "world 2 = TP 2 x DP 1" in out and "SYNTHETIC" in out
    assert "step     20/20" in out

    records = [json.loads(line) for line in open(jsonl)]
    assert [r["step"] for r in records] == list(range(1, 21))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5, losses
    assert all(math.isfinite(r["grad_norm"]) and r["samples_per_s"] > 0 for r in records)
    assert {tuple(r["latent_hw"]) for r in records} == {(8, 8), (6, 10)}  # both synthetic buckets were used

    # LR follows megatron's schedule: linear warmup from 0 over 2 iterations, cosine to min_lr at 20
    cfg = load_config("configs/smoke_tp2.yaml")
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.0 and lrs[1] == cfg.optimizer.lr / 2 and lrs[2] == cfg.optimizer.lr
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > cfg.optimizer.min_lr
    assert glob.glob(str(tb / "events.out.tfevents.*"))


def test_cache_loader_plugs_into_the_train_loop(tmp_path):
    """--data cache --cache-dir: the cache helper's BucketedLoader feeds the same loop (TP=2, 2 processes)."""
    from consumer.synthetic_data import SyntheticLatentBatches
    from megatron_qwen_image.cache import CacheWriter

    source = SyntheticLatentBatches(16, 0, 1, seed=3, text_dim=64, resolutions=[[64, 64], [48, 80]], text_len=[3, 9])
    cache = tmp_path / "cache"
    for unit in range(2):  # two producer work units
        batch = next(source)
        with CacheWriter(str(cache), work_unit=f"unit-{unit}", latent_dtype="fp32", text_dtype="fp32") as writer:
            for key, latent, text, mask in zip(batch["keys"], batch["latents"], batch["text_embeds"], batch["text_mask"]):
                writer.add(key, latent, text[mask], caption="synthetic", source="test")
            writer.commit()
    jsonl = tmp_path / "stats.jsonl"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "train.train_iters=4",
                       "--data", "cache", "--cache-dir", str(cache), "--log-jsonl", str(jsonl)], timeout=300)
    assert "SYNTHETIC" not in out and "step      4/4" in out
    records = [json.loads(line) for line in open(jsonl)]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert {tuple(r["latent_hw"]) for r in records} <= {(8, 8), (6, 10)}


def test_recompute_variants_give_the_same_training_run(tmp_path):
    """Activation recompute only trades compute for memory: selective (all modules), full/uniform and
    full/block runs reproduce the no-recompute run's losses (TP=1, same seed and weights, 3 steps)."""
    out = tmp_path / "losses.json"
    torchrun(1, ["tests/dist/train_recompute.py", str(out), "train.micro_batch_size=1", "train.global_batch_size=2",
                 "train.train_iters=3", "optimizer.lr=3e-3", "train.seed=5", "data.synthetic.resolutions=[[32, 48]]"], timeout=300)
    losses = json.load(open(out))
    assert len(losses["none"]) == 3 and losses["none"][0] != losses["none"][-1]
    for name in ("selective", "full_uniform", "full_block"):
        assert max(abs(a - b) for a, b in zip(losses[name], losses["none"])) <= 1e-6, losses
