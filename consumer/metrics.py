"""Per-step training stats: console line, TensorBoard scalars and a JSONL file (rank 0 writes)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from megatron_qwen_image.cache.buckets import bucket_of_latent


class MetricsLogger:
    """Console every `log_interval` steps; TensorBoard (if a dir is given) and JSONL every step.

    JSONL record keys: step, loss, grad_norm, lr, step_time_s, samples_per_s, image_tokens_per_s, consumed_samples,
    skipped, latent_hw (the batch's latent height/width), samples and micro_batch (this step's global batch and
    micro-batch: they vary by bucket with train.batching=balanced), image_tokens, task ("t2i" or "ti2i": every
    global batch is of one task) and cond_tokens (the condition images' tokens of an edit batch); with the latent cache also, counted since the start of
    this process: skipped_shards, skipped_samples, data_wait_s (consumer.train.data_counters); at a validation
    step (consumer.validation) also val_s (seconds it took), val_images, val_loss and val_loss_sigma_<s> per
    sigma, and val_loss_t2i / val_loss_ti2i when the held-out set has both tasks. One JSON object per line, flushed each step, so a crashed or running job's file is always readable.
    Validation goes to TensorBoard as val/* scalars and the grid as the image `validation/samples`.
    """

    def __init__(self, enabled: bool, train_iters: int, log_interval: int = 1,
                 tensorboard_dir: Optional[str] = None, jsonl_path: Optional[str] = None):
        self.enabled, self.train_iters, self.log_interval = enabled, train_iters, log_interval
        self.jsonl_path = jsonl_path
        self._tb = self._jsonl = None
        self._start = time.perf_counter()
        self._first_step: Optional[int] = None
        if not enabled:
            return
        if tensorboard_dir:
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a")

    def log(self, record: dict, grid: Optional[np.ndarray] = None) -> None:
        """One step's record; `grid` (HxWx3 uint8): the validation images of this step."""
        if not self.enabled:
            return
        step = record["step"]
        if self._first_step is None:
            self._first_step = step - 1
            self._start = time.perf_counter() - record["step_time_s"]
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb:
            for key in ("loss", "grad_norm", "lr", "step_time_s", "samples_per_s", "image_tokens_per_s"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            if record.get("task") is not None:  # the loss of each task on its own curve
                self._tb.add_scalar(f"train/loss_{record['task']}", record["loss"], step)
            if "latent_hw" in record and "image_tokens_per_s" in record:  # throughput per bucket (pixel w x h)
                w, h = bucket_of_latent(tuple(record["latent_hw"]))
                for key in ("samples_per_s", "image_tokens_per_s"):
                    self._tb.add_scalar(f"bucket_{w}x{h}/{key}", record[key], step)
            for key in sorted(k for k, v in record.items() if k.startswith("val_") and isinstance(v, float)):
                self._tb.add_scalar(f"val/{key[4:]}", record[key], step)
            if grid is not None:
                self._tb.add_image("validation/samples", grid, step, dataformats="HWC")
            if "val_s" in record:  # rare and worth seeing at once
                self._tb.flush()
        if step % self.log_interval == 0 or step == self.train_iters:
            done = step - self._first_step
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(done, 1) * (self.train_iters - step)
            grad = "n/a" if record.get("grad_norm") is None else f"{record['grad_norm']:.4f}"
            print(f"step {step:>6}/{self.train_iters} | loss {record['loss']:.5f} | grad_norm {grad} | "
                  f"lr {record['lr']:.3e} | {record['step_time_s']:.3f} s/step | "
                  f"{record['samples_per_s']:.2f} samples/s"
                  + (" ({} x {}x{})".format(record["samples"], *bucket_of_latent(tuple(record["latent_hw"])))
                     if "samples" in record else "")
                  + (f" {record['task']}" if record.get("task", "t2i") != "t2i" else "") + f" | ETA {eta:.0f} s"
                  + (" | SKIPPED (inf/nan grads)" if record.get("skipped") else ""), flush=True)
        if "val_s" in record:
            print(validation_line(record), flush=True)

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        if self._jsonl:
            self._jsonl.close()


def validation_line(record: dict) -> str:
    parts = [f"validation at step {record['step']}"]
    if "val_loss" in record:
        by_sigma = ", ".join(f"{k[len('val_loss_sigma_'):]}: {v:.4f}" for k, v in record.items()
                             if k.startswith("val_loss_sigma_"))
        by_task = "".join(f", {t} {record[f'val_loss_{t}']:.4f}" for t in ("t2i", "ti2i") if f"val_loss_{t}" in record)
        parts.append(f"loss {record['val_loss']:.5f} (by sigma {by_sigma}{by_task})")
    if "val_images" in record:
        parts.append(f"{record['val_images']} images" + (f" -> {record['val_grid']}" if "val_grid" in record else ""))
    return " | ".join(parts + [f"{record['val_s']:.1f} s"])


def data_summary(record: dict) -> str:
    """The end-of-run line about the data, from the last step's record (see consumer.train.data_counters)."""
    return (f"data: shards skipped {record['skipped_shards']} (unreadable when planned, or corrupt), "
            f"samples skipped {record['skipped_samples']} (each replaced by another of its bucket), "
            f"waited for producers {record['data_wait_s']:.0f} s")
