"""Text-to-image and editing in one job (report §4.3): a TP=2 run over a cache of both, the task picked per
global batch by data.cache.task_weights, with a falling loss on each task."""
import json
import math

from megatron_qwen_image.cache import seal
from tests.support.caches import write_edit_unit, write_unit
from tests.torchrun import torchrun


def test_a_mixed_t2i_and_edit_run_trains_both_tasks_with_falling_loss(tmp_path):
    cache = tmp_path / "cache"
    write_unit(cache, 0, [64, 64], n=32)                  # text-to-image
    write_edit_unit(cache, 1, [64, 64], [48, 80], n=32)   # edits: a 48x80 source (latent 6x10) per 64x64 target
    seal(str(cache))
    jsonl = tmp_path / "stats.jsonl"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", "train.train_iters=24",
                       "--data", "cache", "--cache-dir", str(cache), "data.cache.task_weights={t2i: 1, ti2i: 1}",
                       "--log-jsonl", str(jsonl)], timeout=300)
    assert "data: tasks: t2i 32 samples, ti2i 32 samples; task weights t2i 50%, ti2i 50% of the steps" in out
    assert "step     24/24" in out
    records = [json.loads(line) for line in open(jsonl)]
    assert all(math.isfinite(r["loss"]) for r in records)
    # an epoch is 8 + 8 global batches of 4: the weights give each task half of them
    assert sum(r["task"] == "ti2i" for r in records[:16]) == 8
    for r in records:  # the 6x10 source adds 3 x 5 tokens (2x2 patches) per sample
        assert r["cond_tokens"] == (4 * 15 if r["task"] == "ti2i" else 0)
    for task in ("t2i", "ti2i"):
        losses = [r["loss"] for r in records if r["task"] == task]
        assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), (task, losses)
