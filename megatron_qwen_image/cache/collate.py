"""Collation into the train loop's batch dict (the contract in docs/cache_format.md, "Batches")."""
from __future__ import annotations

import torch


def collate(samples, output_dtype: torch.dtype | None = torch.float32) -> dict:
    """[(key, latent [C,H,W], text [L_i, D]), ...] -> the batch dict.

    {"latents": [B,C,H,W], "text_embeds": [B,L,D] zero-padded to the batch's longest L,
     "text_mask": [B,L] bool (True = real token), "keys": [str]}.
    One copy per tensor, straight into the output (with the dtype conversion); only the padding is
    zeroed. output_dtype=None keeps the stored dtype.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = [s[0] for s in samples]
    lat0, txt0 = samples[0][1], samples[0][2]
    shape, dim = tuple(lat0.shape), txt0.shape[1]
    lengths = [s[2].shape[0] for s in samples]
    max_len = max(lengths)
    latents = torch.empty((len(samples), *shape), dtype=output_dtype or lat0.dtype)
    text = torch.empty((len(samples), max_len, dim), dtype=output_dtype or txt0.dtype)
    mask = torch.zeros((len(samples), max_len), dtype=torch.bool)
    for i, (key, lat, txt) in enumerate(samples):
        if tuple(lat.shape) != shape:
            raise ValueError(f"sample {key!r}: latent {tuple(lat.shape)} differs from {shape} in the same batch")
        if txt.shape[1] != dim:
            raise ValueError(f"sample {key!r}: text embedding is {txt.shape[1]} wide, others are {dim}")
        latents[i].copy_(lat)
        n = lengths[i]
        text[i, :n].copy_(txt)
        if n < max_len:
            text[i, n:].zero_()
        mask[i, :n] = True
    return {"latents": latents, "text_embeds": text, "text_mask": mask, "keys": keys}
