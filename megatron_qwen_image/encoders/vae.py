"""Qwen-Image VAE latents, normalised exactly as diffusers' Qwen-Image pipelines do, and their decoding.

Path (diffusers 0.42.1, pipeline_qwenimage_img2img.py `_encode_vae_image` and the `VaeImageProcessor`
it preprocesses with): PIL RGB -> float32 / 255 -> 2x - 1 -> [B, 3, 1, H, W] (one frame: the VAE is the
Wan-style causal 3-D VAE) -> `AutoencoderKLQwenImage.encode` -> latent distribution -> `mode()` (or a
`sample()`) -> `(z - latents_mean) * (1 / latents_std)` with the VAE config's 16 means/stds. The text-
to-image pipeline inverts exactly this (`latents / (1 / std) + mean`) before decoding.

Images must already be resized/cropped to their bucket (the cache's `resize_to_bucket`), so
H and W are multiples of 16 (VAE factor 8 x patch 2) and the pipeline's preprocessing does no resize.

Decoding (`decode`, `to_pil`) is QwenImagePipeline.__call__'s last steps: de-normalise, decode the one frame,
clamp, VaeImageProcessor.postprocess. A trainer that only decodes validation samples loads the VAE with
`decoder_only=True`: the encoder half's weights are dropped after loading.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.image_processor import VaeImageProcessor

from megatron_qwen_image.encoders.local_dir import VAE, component_dir


def image_to_tensor(image) -> torch.Tensor:
    """PIL image or uint8 HxWx3 array -> float32 [3, H, W] in [-1, 1], as VaeImageProcessor.preprocess does."""
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image or uint8 HxWx3 array, got dtype {arr.dtype} shape {arr.shape}")
    x = arr.astype(np.float32) / 255.0
    x = 2.0 * x - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def key_generator(key: str, seed: int, device="cpu") -> torch.Generator:
    """A generator seeded from (sample key, seed): sampled latents are then reproducible per sample, so a
    redone work unit writes the same bytes (the cache writer's idempotence relies on it)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class QwenVAEEncoder:
    """Images (same size, already bucketed) -> normalised latents [B, z_dim, H/8, W/8]."""

    def __init__(self, vae, sample_mode: str = "mode", seed: int = 0, batch_size: int = 4):
        if sample_mode not in ("mode", "sample"):
            raise ValueError(f"sample_mode must be 'mode' or 'sample', got {sample_mode!r}")
        self.vae = vae.eval()
        self.sample_mode = sample_mode
        self.seed = seed
        self.batch_size = batch_size
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)
        # Kept as the pipeline builds them: mean as-is, std as its reciprocal (multiplied, not divided),
        # so our floating-point results are bit-identical to the pipeline's.
        self._mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, local_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        decoder_only: bool = False, **kwargs) -> "QwenVAEEncoder":
        """Load from a local HF-layout directory: a Qwen-Image repo (vae/) or the VAE directory itself.
        `decoder_only`: drop the encoder half (about half the weights) for a process that only decodes."""
        vae = AutoencoderKLQwenImage.from_pretrained(component_dir(local_dir, VAE), torch_dtype=dtype,
                                                     local_files_only=True)
        if decoder_only:
            # decode() never touches these; clear_cache() only counts the encoder's convolutions (none left).
            vae.encoder, vae.quant_conv = torch.nn.Module(), None
        return cls(vae.to(device), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, C, 1, h, w] -> the pipeline's normalised latents (same shape)."""
        return (z - self._mean.to(z.device, z.dtype)) * self._inv_std.to(z.device, z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`, written as QwenImagePipeline.__call__ does before decoding."""
        return z / self._inv_std.to(z.device, z.dtype) + self._mean.to(z.device, z.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, h, w] -> images [B, 3, 8h, 8w] in [-1, 1], in the VAE's dtype."""
        z = self.denormalize(latents.to(self.device, self.dtype)[:, :, None])
        return self.vae.decode(z, return_dict=False)[0][:, :, 0]

    def to_pil(self, images: torch.Tensor) -> list:
        """decode()'s output -> PIL images, as the pipeline's output_type='pil'."""
        return VaeImageProcessor(vae_scale_factor=self.spatial_factor * 2).postprocess(images, output_type="pil")

    @torch.no_grad()
    def encode_batch(self, images: Sequence, keys: Sequence[str] | None = None) -> torch.Tensor:
        """One VAE pass over same-size images -> [B, z_dim, H/8, W/8] (normalised)."""
        x = torch.stack([image_to_tensor(im) for im in images]) if not torch.is_tensor(images) else images
        if x.ndim != 4:
            raise ValueError(f"expected [B, 3, H, W] images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"image size {w}x{h} is not a multiple of the VAE factor {self.spatial_factor}; "
                             "resize to a bucket first")
        x = x.unsqueeze(2).to(self.device, self.dtype)  # [B, 3, 1, H, W]
        dist = self.vae.encode(x).latent_dist
        if self.sample_mode == "mode":
            z = dist.mode()
        else:
            if keys is None or len(keys) != x.shape[0]:
                raise ValueError("sample_mode='sample' needs one key per image to seed its noise reproducibly")
            z = torch.cat([dist.mean[i : i + 1] + dist.std[i : i + 1] * torch.randn(
                dist.mean[i : i + 1].shape, generator=key_generator(k, self.seed), dtype=dist.mean.dtype,
            ).to(self.device) for i, k in enumerate(keys)])
        return self.normalize(z)[:, :, 0]

    def encode(self, images: Sequence, keys: Sequence[str] | None = None) -> torch.Tensor:
        """Same-size images -> normalised latents [B, z_dim, H/8, W/8], `batch_size` images per VAE pass."""
        sizes = {(im.size if hasattr(im, "size") and not torch.is_tensor(im) else tuple(np.shape(im)[1::-1]))
                 for im in images}
        if len(sizes) > 1:
            raise ValueError(f"encode() needs images of one size (one bucket), got sizes {sorted(sizes)}")
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self.encode_batch(images[i : i + self.batch_size],
                                         None if keys is None else keys[i : i + self.batch_size]))
        return torch.cat(out)
