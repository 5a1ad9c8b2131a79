"""Phase (a), smoke: the tiny model through the trainer itself (consumer.train.train) on the device.

bf16 on CUDA (fp32 on CPU, as the trainer), TP=1, micro-batch 2, synthetic data whose captions vary in length
(data.synthetic.text_len), so micro-batches are padded and the model takes its bool key-mask path. Checks the
losses are finite and records the step times; the first step includes CUDA/cuBLAS start-up.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile

from consumer.config import load_config
from consumer.synthetic_data import SyntheticLatentBatches
from consumer.train import train

from benchmarks.gpu.settings import TINY_MODEL_YAML, Settings
from benchmarks.gpu.timing import Budget

MICRO_BATCH = 2
TEXT_LEN = (4, 12)          # [min, max] caption tokens: two captions of one micro-batch rarely match
RESOLUTION = (64, 64)


class PaddingCounter:
    """Wraps the data iterator; counts the batches whose text is padded (some sample shorter than the longest)."""

    def __init__(self, inner):
        self.inner = inner
        self.batches = self.padded = 0
        self.text_lengths: list[list[int]] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.inner)
        lengths = batch["text_mask"].sum(dim=1).tolist()
        self.batches += 1
        self.padded += int(min(lengths) < batch["text_mask"].shape[1])
        self.text_lengths.append([int(n) for n in lengths])
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def run_smoke(settings: Settings, budget: Budget) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-smoke-") as tmp:
        cfg = load_config(TINY_MODEL_YAML, [
            "parallelism.tensor_model_parallel_size=1", f"precision.bf16={'true' if settings.bf16 else 'false'}",
            f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={MICRO_BATCH}",
            f"train.train_iters={settings.smoke_steps}", f"train.seed={settings.seed}", "data.source=synthetic",
            f"data.synthetic.text_len=[{TEXT_LEN[0]}, {TEXT_LEN[1]}]",
            f"data.synthetic.resolutions=[[{RESOLUTION[0]}, {RESOLUTION[1]}]]",
            f"logging.log_jsonl={os.path.join(tmp, 'stats.jsonl')}"])
        t, d = cfg.train, cfg.data.synthetic
        data = PaddingCounter(SyntheticLatentBatches(t.global_batch_size, 0, 1, t.seed,
                                                     text_dim=cfg.model.joint_attention_dim, **d.build_kwargs()))
        records = train(cfg, data_iterator=data)
    losses = [r["loss"] for r in records]
    times = [r["step_time_s"] for r in records]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    return {
        "ok": finite and len(records) == settings.smoke_steps,
        "steps": len(records), "losses": losses, "losses_finite": finite,
        "grad_norms": [r["grad_norm"] for r in records], "step_times_s": times,
        "median_step_after_first_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "batches_with_padding": data.padded, "text_lengths": data.text_lengths,
        "precision": "bf16" if settings.bf16 else "fp32",
        "summary": f"{len(records)} steps, losses {'finite' if finite else 'NOT FINITE'} "
                   f"({', '.join(f'{x:.4f}' for x in losses)}), {data.padded}/{data.batches} batches padded, "
                   f"step times {', '.join(f'{x * 1e3:.0f}' for x in times)} ms",
    }
