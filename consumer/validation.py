"""Validation in the train loop: every `validation.eval_interval` steps, images of fixed prompts and a held-out loss.

Images: the encoded validation prompts (megatron_qwen_image.prompts; no text encoder in the trainer) are
shared out over the data-parallel groups (prompt i to DP rank i % DP); every rank of a TP group runs the
sampler (megatron_qwen_image.sampling) on its group's prompts from each prompt's own seed, so an image at step
500 and at step 1000 start from the same noise and differ only by what the model learnt. TP rank 0 of each
group decodes its images with the VAE decoder (loaded once, on first use) and rank 0 gathers them into
`<samples_dir>/step_000500.png` (the prompt under each image) and TensorBoard's `validation/samples`.

Loss: consumer.validation_loss at fixed sigmas with fixed noise per held-out sample, from a separate cache
(`validation.loss_cache_dir`) or the training cache's held-out keys (`data.cache.holdout_fraction`, which the
training loader leaves out).

Validation never changes training: it draws from its own generators, runs without autograd on the unwrapped
model with megatron DDP's param all-gather hooks off (after syncing the params, as megatron-LM evaluates), and
touches no optimizer, scheduler or loader state.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from PIL import Image

from consumer.checkpointing import pre_hooks_disabled, unwrap_model
from consumer.config import TrainConfig
from consumer.validation_loss import HeldOutSample, load_held_out, validation_loss
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.image_grid import image_grid, save_png
from megatron_qwen_image.parallel import ParallelContext
from megatron_qwen_image.prompts import load_encoded
from megatron_qwen_image.sampling import SampleRequest, decode_images, generate, load_scheduler


def loss_enabled(cfg: TrainConfig) -> bool:
    """A held-out set exists: a separate cache, or held-out keys of the training cache."""
    return cfg.validation.loss_cache_dir is not None or (
        cfg.data.source == "cache" and cfg.data.cache.holdout_fraction > 0)


def load_decoder(encoders_dir: str, device: torch.device):
    """The VAE decoder (a QwenVAEEncoder without its encoder half)."""
    # Imported here, not at the top: every training rank imports this module, and only the ranks that decode
    # validation images should pay for importing diffusers' VAE (most of a second per process).
    from megatron_qwen_image.encoders.vae import QwenVAEEncoder

    return QwenVAEEncoder.from_pretrained(encoders_dir, device=device, decoder_only=True)


def held_out_samples(cfg: TrainConfig) -> list[HeldOutSample]:
    """The validation loss's samples; ConfigError (naming the key) when the held-out set is empty."""
    v, c = cfg.validation, cfg.data.cache
    key = "validation.loss_cache_dir" if v.loss_cache_dir else "data.cache.holdout_fraction"
    try:
        return load_held_out(v.loss_cache_dir or cfg.data.cache_dir, None if v.loss_cache_dir else c.holdout_fraction,
                             v.loss_samples, base_resolution=c.base_resolution, buckets=c.buckets,
                             families=None if c.family_weights is None else set(c.family_weights),
                             tasks=None if c.task_weights is None else {t for t, w in c.task_weights.items() if w > 0})
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


class Validation:
    """What the train loop calls: `due(step)`, then `run(model, step, dtype)` on every rank."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext, run_dir: str):
        v = cfg.validation
        self.cfg, self.ctx = cfg, ctx
        self.interval = v.eval_interval
        self.samples_dir = v.samples_dir or os.path.join(run_dir, "samples")
        self.prompts = load_encoded(v.prompts) if (self.interval and v.prompts) else None
        self.mine = [] if self.prompts is None else list(range(len(self.prompts.prompts)))[ctx.dp_rank::ctx.dp_size]
        self.scheduler = load_scheduler(v.encoders) if self.prompts is not None else None
        self._vae = None  # load_decoder's, on the first validation of a decoding rank
        self.held_out = held_out_samples(cfg) if self.interval and loss_enabled(cfg) else None

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def run(self, model, step: int, dtype: torch.dtype) -> tuple[dict, Optional[np.ndarray]]:
        """Validate the model after `step` steps -> (stats for the step's record, the grid as an HxWx3 uint8
        array on rank 0, else None)."""
        t0 = time.perf_counter()
        stats, grid = {}, None
        module = unwrap_model(model)
        with pre_hooks_disabled(model, param_sync=True), torch.no_grad():
            if self.prompts is not None:
                grid = self._images(module, step, dtype)
                stats["val_images"] = len(self.prompts.prompts)
                if grid is not None:
                    stats["val_grid"] = self.grid_path(step)
            if self.held_out is not None:
                v, t = self.cfg.validation, self.cfg.train
                loss = validation_loss(module, self.held_out, v.loss_sigmas, t.seed,
                                       v.loss_micro_batch_size or t.micro_batch_size, self.cfg.model.patch_size,
                                       self.ctx.device, dtype, self.ctx.dp_rank, self.ctx.dp_size,
                                       parallel_state.get_data_parallel_group())
                stats["val_loss"] = loss["val_loss"]
                stats.update({f"val_loss_sigma_{s:g}": x for s, x in loss["val_loss_by_sigma"].items()})
                stats.update({f"val_loss_{t}": x for t, x in loss.get("val_loss_by_task", {}).items()})
        stats["val_s"] = round(time.perf_counter() - t0, 3)
        return stats, grid

    def _images(self, module, step: int, dtype: torch.dtype) -> Optional[np.ndarray]:
        v, items = self.cfg.validation, self.prompts.prompts
        requests = [SampleRequest.from_prompt(items[i]) for i in self.mine]
        latents = generate(module, requests, v.steps, v.guidance, self.ctx.device, dtype, v.batch_size, self.scheduler)
        mine = []
        if self.ctx.tp_rank == 0:
            if self._vae is None:
                self._vae = load_decoder(v.encoders, self.ctx.device)
            mine = [(i, np.asarray(decode_images(self._vae, lat[None], items[i].spec.width, items[i].spec.height)[0]))
                    for i, lat in zip(self.mine, latents)]
        gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if not self.ctx.is_main:
            return None
        images = dict(pair for part in gathered for pair in part)
        grid = image_grid([Image.fromarray(images[i]) for i in range(len(items))], [it.spec.prompt for it in items])
        save_png(grid, self.grid_path(step))
        return np.asarray(grid)

    def grid_path(self, step: int) -> str:
        return os.path.join(self.samples_dir, f"step_{step:06d}.png")
