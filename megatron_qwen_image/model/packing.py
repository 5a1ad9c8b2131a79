"""2x2 patchify / unpatchify of VAE latents, identical to diffusers' QwenImagePipeline._pack_latents /
_unpack_latents: packed channel index = c * 4 + dy * 2 + dx, tokens in row-major (row, column) patch order."""
from __future__ import annotations

import torch


def pack_latents(z: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H / p) * (W / p), C * p * p]."""
    if z.dim() != 4:
        raise ValueError(f"pack_latents expects [B, C, H, W] latents, got shape {tuple(z.shape)}")
    b, c, h, w = z.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent height/width ({h}, {w}) must be divisible by patch_size={patch_size}")
    z = z.view(b, c, h // patch_size, patch_size, w // patch_size, patch_size).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)


def unpack_latents(x: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """[B, (H / p) * (W / p), C * p * p] -> [B, C, H, W]; height/width are LATENT sizes (pixels / 8)."""
    b, n, ch = x.shape
    hp, wp = height // patch_size, width // patch_size
    if height % patch_size or width % patch_size or n != hp * wp or ch % (patch_size * patch_size):
        raise ValueError(f"cannot unpack {tuple(x.shape)} into a {height}x{width} latent with patch_size={patch_size}")
    c = ch // (patch_size * patch_size)
    x = x.view(b, hp, wp, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)
