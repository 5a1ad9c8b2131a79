"""Rectified-flow (flow matching) training objective, in diffusers' FlowMatchEulerDiscreteScheduler conventions.

For a clean latent x0, noise n ~ N(0, I) and sigma in [0, 1]:

    x_t = sigma * n + (1 - sigma) * x0        (sigma = 1 is pure noise; scheduler.scale_noise)
    v   = n - x0                              (d x_t / d sigma; the scheduler's Euler step is
                                               x_next = x_t + (sigma_next - sigma) * v)
    loss = mean over image tokens and channels of (model(x_t, sigma) - v)^2

sigma comes from a logit-normal distribution, sigmoid(N(logit_mean, logit_std)) (SD3 / Qwen-Image; the
same as diffusers.training_utils.compute_density_for_timestep_sampling("logit_normal")), optionally shifted
like the scheduler shifts its inference sigmas:

* static:  sigma' = s * sigma / (1 + (s - 1) * sigma)              (FlowMatchEulerDiscreteScheduler(shift=s))
* dynamic: sigma' = time_shift(mu, 1, sigma) with the resolution-dependent
           mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
           (QwenImagePipeline.calculate_shift), exponential: e^mu / (e^mu + (1/sigma - 1)),
           linear: mu / (mu + (1/sigma - 1))   (the scheduler's _time_shift_exponential/_linear).

Randomness is drawn per sample from a generator seeded by (seed, step, sample key), so a sample's noise
and sigma do not depend on how the global batch is split over data-parallel ranks or micro-batches, and
the ranks of one tensor-parallel group (which see the same keys) draw identical values.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_qwen_image.config import option


# Qwen-Image's released inference schedule (scheduler/scheduler_config.json of Qwen/Qwen-Image): the keyword
# arguments of diffusers' FlowMatchEulerDiscreteScheduler. The sampler uses it when an encoders directory has no
# scheduler/, and make_tiny writes it into the tiny pipeline.
RELEASED_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                          time_shift_type="exponential")


@dataclass
class SigmaSampling:
    """How training draws sigma (logit-normal, optionally shifted as diffusers' scheduler shifts)."""

    logit_mean: float = option(0.0, "mean of the logit-normal sigma distribution")
    logit_std: float = option(1.0, "standard deviation of the logit-normal sigma distribution (> 0)")
    timestep_shift: str = option("none", "shift of the drawn sigmas: none, static (`shift`), or dynamic "
                                 "(resolution-dependent, QwenImagePipeline's calculate_shift)",
                                 choices=("none", "static", "dynamic"))
    shift: float = option(1.0, "static shift s: sigma' = s*sigma / (1 + (s-1)*sigma)")
    base_image_seq_len: int = option(256, "dynamic shift: image tokens at which mu = base_shift")
    max_image_seq_len: int = option(4096, "dynamic shift: image tokens at which mu = max_shift")
    base_shift: float = option(0.5, "dynamic shift: mu at base_image_seq_len")
    max_shift: float = option(1.15, "dynamic shift: mu at max_image_seq_len")
    time_shift_type: str = option("exponential", "dynamic shift: the scheduler's time_shift_type",
                                  choices=("exponential", "linear"))


def calculate_shift(image_seq_len: float, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu, linear in the image token count (diffusers' QwenImagePipeline.calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigma: torch.Tensor, kind: str = "exponential", exponent: float = 1.0) -> torch.Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler.time_shift (exponent is its `sigma` argument)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1) ** exponent)
    if kind == "linear":
        return mu / (mu + (1 / sigma - 1) ** exponent)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's fixed shift: shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_sigmas(sigma: torch.Tensor, image_seq_len: int, spec: SigmaSampling) -> torch.Tensor:
    if spec.timestep_shift == "none":
        return sigma
    if spec.timestep_shift == "static":
        return static_shift(sigma, spec.shift)
    if spec.timestep_shift == "dynamic":
        mu = calculate_shift(image_seq_len, spec.base_image_seq_len, spec.max_image_seq_len,
                             spec.base_shift, spec.max_shift)
        return time_shift(mu, sigma, spec.time_shift_type)
    raise ValueError(f"timestep_shift must be none|static|dynamic, got {spec.timestep_shift!r}")


def sample_seed(seed: int, step: int, key: str) -> int:
    """A stable 63-bit seed for one sample at one step (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_noise_and_sigmas(keys: Sequence[str], step: int, seed: int, latent_shape: Sequence[int],
                          image_seq_len: int, spec: SigmaSampling, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise [B, *latent_shape] and shifted logit-normal sigmas [B] (see module docstring)."""
    noises, logits = [], []
    for key in keys:
        gen = torch.Generator(device=device).manual_seed(sample_seed(seed, step, key))
        logits.append(torch.normal(spec.logit_mean, spec.logit_std, size=(1,), generator=gen, device=device))
        noises.append(torch.randn(tuple(latent_shape), generator=gen, device=device))
    sigma = shift_sigmas(torch.sigmoid(torch.cat(logits)), image_seq_len, spec)
    return torch.stack(noises).to(dtype), sigma.to(torch.float32)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = sigma * noise + (1 - sigma) * x0 (diffusers' scale_noise)."""
    s = _expand(sigma, x0)
    return s * noise + (1 - s) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0."""
    return noise - x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the image tokens [B, N, C] -> per-sample loss [B], computed in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def sample_losses(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                  text_lengths: Sequence[int], grid_hw: tuple[int, int], dtype: torch.dtype,
                  cond: torch.Tensor | None = None, cond_grids: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """The per-sample loss [B] of `model` (a QwenImageMMDiT) on packed latents x0 and noise [B, N, C] at sigma [B]:
    its prediction from x_t (cast to `dtype`), the sigma as timestep and the text [B, L, D] with its valid
    lengths (host ints), on a (h, w) patch grid of one frame, against v = noise - x0. The training step and the
    validation loss both score the model through this one call.

    Editing (TI2I): `cond` [B, Nc, C] holds the condition images' packed clean latents, one (h, w) patch grid
    each in `cond_grids`. They follow x_t in the image stream, as QwenImageEditPipeline feeds them, and the
    loss is on the target's N tokens only (the condition is given, not predicted)."""
    x_t = noisy_latents(x0, noise, sigma)
    images = [(1, *grid_hw)] + [(1, *g) for g in cond_grids]
    if cond is not None:
        x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
    pred = model(x_t.to(dtype), text, None, sigma, img_shapes=[images] * x0.shape[0], text_lengths=text_lengths)
    return flow_matching_loss(pred[:, :x0.shape[1]], velocity_target(x0, noise))
