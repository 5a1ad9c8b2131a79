"""Text-to-image sampling with our Megatron MMDiT, step for step as diffusers' `QwenImagePipeline.__call__`.

The pipeline (diffusers 0.42.1, pipelines/qwenimage/pipeline_qwenimage.py), and what is taken from it as is:
  1. initial latents `randn_tensor((B, 1, 16, H/8, W/8), generator, dtype)` on the generator's device, packed
     2x2 (`initial_noise`; diffusers' own randn_tensor, so a seed gives the pipeline's noise);
  2. `sigmas = linspace(1, 1/steps, steps)`, `mu = calculate_shift(image tokens, ...)` with the scheduler
     config's base/max sequence lengths and shifts, `scheduler.set_timesteps(sigmas=..., mu=...)`: diffusers'
     own FlowMatchEulerDiscreteScheduler (its dynamic time shift and terminal stretch included);
  3. per step the model at `timestep / 1000`; with true classifier-free guidance (a negative prompt and
     scale > 1) a second forward on the negative prompt, `comb = neg + s * (cond - neg)`, rescaled to the
     conditional prediction's norm over the channel dim; then `scheduler.step`;
  4. unpack, de-normalise with the VAE config's means/stds, decode the one frame, postprocess to PIL
     (`QwenVAEEncoder.decode` + diffusers' VaeImageProcessor).

Editing (QwenImageEditPipeline / QwenImageEditPlusPipeline.__call__): the condition images' normalised VAE
latents, packed, are appended to the latents at every step (`torch.cat([latents, image_latents], dim=1)`)
with img_shapes [(1, h, w), (1, ch, cw), ...], and the prediction is cut back to the target's tokens before
guidance and the scheduler step. The text features are the edit encoder's (megatron_qwen_image.encoders.edit:
the instruction with the condition image in the prompt).

Tensor parallelism: every rank of a TP group runs the same loop on the same inputs; the model's outputs are
complete on every rank (its last layers are replicated), and the noise is drawn on the host from the same
seed, so all ranks of the group hold identical latents at every step and decode identical images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from megatron_qwen_image.cache.format import PIXEL_MULTIPLE, VAE_SCALE_FACTOR
from megatron_qwen_image.flow_matching import RELEASED_SCHEDULER, calculate_shift
from megatron_qwen_image.model import pack_latents, unpack_latents

LATENT_CHANNELS = 16


def load_scheduler(encoders_dir: Optional[str] = None) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of a pipeline directory (`scheduler/`), else Qwen-Image's released one (RELEASED_SCHEDULER)."""
    sub = os.path.join(encoders_dir, "scheduler") if encoders_dir else None
    if sub and os.path.isfile(os.path.join(sub, "scheduler_config.json")):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(sub, local_files_only=True)
    return FlowMatchEulerDiscreteScheduler(**RELEASED_SCHEDULER)


def check_size(width: int, height: int) -> None:
    """Pixel sizes the model can generate exactly: multiples of 16 (VAE factor 8 x 2x2 packing). The pipeline
    would silently round others down; we refuse them."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % PIXEL_MULTIPLE:
            raise ValueError(f"{name} {v} must be a positive multiple of {PIXEL_MULTIPLE} (VAE factor 8 x 2x2 "
                             f"packing)")


@dataclass
class TextBatch:
    """Prompt embeddings of a batch, zero-padded to its longest: `embeds` [B, L, D], `lengths` the valid tokens
    per prompt (host ints, so the model never syncs to read a mask)."""

    embeds: torch.Tensor
    lengths: list[int]

    @classmethod
    def from_list(cls, features: Sequence[torch.Tensor]) -> "TextBatch":
        """Unpadded [L_i, D] features (QwenTextEncoder.encode, an encoded prompts file) -> a padded batch."""
        lengths = [int(f.shape[0]) for f in features]
        embeds = features[0].new_zeros(len(features), max(lengths), features[0].shape[1])
        for i, f in enumerate(features):
            embeds[i, : lengths[i]] = f
        return cls(embeds, lengths)

    @property
    def mask(self) -> torch.Tensor:
        """[B, L] bool, True = a valid token (the pipeline's prompt_embeds_mask)."""
        return torch.arange(self.embeds.shape[1])[None, :] < torch.tensor(self.lengths)[:, None]

    def to(self, device, dtype) -> "TextBatch":
        return TextBatch(self.embeds.to(device, dtype), self.lengths)


def initial_noise(generator, batch: int, width: int, height: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed initial latents [B, (H/16)(W/16), 64], exactly as QwenImagePipeline.prepare_latents draws them for
    `generator` (one torch.Generator for the batch, or one per image) and this dtype; then moved to `device`."""
    check_size(width, height)
    h, w = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
    noise = randn_tensor((batch, 1, LATENT_CHANNELS, h, w), generator=generator, device=torch.device("cpu"),
                         dtype=dtype)
    return pack_latents(noise[:, 0]).to(device)


def set_timesteps(scheduler, steps: int, image_seq_len: int, device=None) -> torch.Tensor:
    """The pipeline's schedule: linear sigmas from 1 to 1/steps, shifted by the resolution-dependent mu."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def guided(cond: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance with the pipeline's rescale to the conditional prediction's norm."""
    comb = neg + scale * (cond - neg)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def pack_conditions(conds: Sequence[torch.Tensor], patch_size: int = 2) -> tuple[torch.Tensor, list]:
    """Condition latents, one [B, 16, h, w] per condition image -> (packed tokens [B, sum(h·w/4), 64] in image
    order, their (h, w) patch grids): what the edit pipelines append to the latents."""
    packed = torch.cat([pack_latents(c, patch_size) for c in conds], dim=1)
    return packed, [(c.shape[-2] // patch_size, c.shape[-1] // patch_size) for c in conds]


@torch.no_grad()
def sample_latents(model, text: TextBatch, latents: torch.Tensor, width: int, height: int, steps: int,
                   scheduler=None, negative: Optional[TextBatch] = None, guidance: float = 1.0,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cond: Optional[torch.Tensor] = None, cond_grids: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Run the Euler flow-matching loop from the packed `latents` (initial_noise) and return the final packed
    latents. `model` is the (unwrapped) QwenImageMMDiT; `text`/`negative` are on the model's device, in its
    dtype, like `latents`. Guidance runs only with a negative prompt and guidance > 1, as in the pipeline.
    `progress(step, steps)` is called after each step. Editing: `cond` [B, Nc, 64] the packed condition
    latents (pack_conditions), `cond_grids` their patch grids."""
    check_size(width, height)
    p = model.config.patch_size
    target = (1, height // VAE_SCALE_FACTOR // p, width // VAE_SCALE_FACTOR // p)
    img_shapes = [[target] + [(1, *g) for g in cond_grids]] * latents.shape[0]
    batch = latents.shape[0]
    if (cond is None) != (not cond_grids) or (cond is not None and cond.shape[0] != batch):
        raise ValueError("condition latents need their grids and one entry per latent")
    if text.embeds.shape[0] != batch or (negative is not None and negative.embeds.shape[0] != batch):
        raise ValueError(f"{latents.shape[0]} latents need as many prompts (and negative prompts)")
    scheduler = scheduler or load_scheduler()
    timesteps = set_timesteps(scheduler, steps, latents.shape[1], device=latents.device)
    cfg = negative is not None and guidance > 1
    n = latents.shape[1]
    for i, t in enumerate(timesteps):
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        x = latents if cond is None else torch.cat([latents, cond], dim=1)
        pred = model(x, text.embeds, None, timestep, img_shapes=img_shapes, text_lengths=text.lengths)[:, :n]
        if cfg:
            neg = model(x, negative.embeds, None, timestep, img_shapes=img_shapes,
                        text_lengths=negative.lengths)[:, :n]
            pred = guided(pred, neg, guidance)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents


def decode_images(vae, latents: torch.Tensor, width: int, height: int) -> list:
    """Packed latents -> PIL images, as the pipeline's output_type='pil' (vae: a QwenVAEEncoder)."""
    z = unpack_latents(latents, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
    return vae.to_pil(vae.decode(z))


@dataclass
class SampleRequest:
    """One image to generate: unpadded prompt features [L, D] (and a negative prompt's, for guidance), its
    pixel size and the seed of its initial noise (the pipeline's `generator=torch.Generator().manual_seed(seed)`).
    An edit: `cond_latents`, the condition images' normalised latents [16, h, w] (the edit encoder's)."""

    embeds: torch.Tensor
    width: int
    height: int
    seed: int
    negative_embeds: Optional[torch.Tensor] = None
    cond_latents: tuple = ()

    @property
    def cond_shapes(self) -> tuple:
        return tuple(tuple(c.shape) for c in self.cond_latents)

    @classmethod
    def from_prompt(cls, prompt) -> "SampleRequest":
        """The request of an encoded prompt (megatron_qwen_image.prompts.EncodedPrompt)."""
        spec = prompt.spec
        return cls(prompt.embeds, spec.width, spec.height, spec.seed, prompt.negative_embeds,
                   tuple(getattr(prompt, "cond_latents", ())))


def batches_of(requests: Sequence[SampleRequest], batch_size: int) -> list[list[int]]:
    """Indices of `requests` grouped into batches of one size, one guidance mode and one condition layout (a
    batch runs one loop), at most `batch_size` each, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.width, r.height, r.negative_embeds is not None, r.cond_shapes), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def generate(model, requests: Sequence[SampleRequest], steps: int, guidance: float, device, dtype,
             batch_size: int = 4, scheduler=None, progress: Optional[Callable[[int, int], None]] = None
             ) -> list[torch.Tensor]:
    """Final packed latents [N, 64] of every request, in order. Each image's noise comes from its own seed, so
    it does not depend on the batch it ran in; `progress(done, total)` counts sampling steps over all batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scheduler = scheduler or load_scheduler()
    out: list[Optional[torch.Tensor]] = [None] * len(requests)
    plan = batches_of(requests, batch_size)
    for b, idx in enumerate(plan):
        batch = [requests[i] for i in idx]
        width, height = batch[0].width, batch[0].height
        noise = initial_noise([torch.Generator().manual_seed(r.seed) for r in batch], len(batch), width, height,
                              dtype, device)
        text = TextBatch.from_list([r.embeds for r in batch]).to(device, dtype)
        negative = (TextBatch.from_list([r.negative_embeds for r in batch]).to(device, dtype)
                    if batch[0].negative_embeds is not None else None)
        step = None if progress is None else (lambda i, n, b=b: progress(b * steps + i, len(plan) * steps))
        cond, grids = None, []
        if batch[0].cond_latents:
            conds = [torch.stack([r.cond_latents[k] for r in batch]).to(device, dtype)
                     for k in range(len(batch[0].cond_latents))]
            cond, grids = pack_conditions(conds, model.config.patch_size)
        latents = sample_latents(model, text, noise, width, height, steps, scheduler, negative, guidance, step,
                                 cond, grids)
        for i, lat in zip(idx, latents):
            out[i] = lat
    return out
