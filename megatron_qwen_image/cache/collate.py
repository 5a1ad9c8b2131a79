"""Collation into the train loop's batch dict (the contract in docs/cache_format.md, "Batches")."""
from __future__ import annotations

import threading

import torch


def collate(samples, output_dtype: torch.dtype | None = torch.float32, alloc=None) -> dict:
    """[(key, latent [C,H,W], text [L_i, D]) or (key, latent, text, conds), ...] -> the batch dict, where
    `conds` is a sequence of condition latents [C, h, w], one per condition image (image editing; empty or
    left out: text-to-image).

    {"latents": [B,C,H,W], "text_embeds": [B,L,D] zero-padded to the batch's longest L,
     "text_mask": [B,L] bool (True = real token), "keys": [str],
     "cond_latents": [one [B,C,h,w] per condition image] ([] for text-to-image), "task": "t2i" | "ti2i"}.
    All samples must share their condition shapes: condition tokens are never padded (the MMDiT has no
    key-padding mask for image tokens, and their RoPE positions depend on each condition's h, w), so a
    batch is one condition group, as a shard is (docs/cache_format.md, "Condition latents").
    One copy per tensor, straight into the output (with the dtype conversion); only the padding is
    zeroed. output_dtype=None keeps the stored dtype. `alloc(shape, dtype)` provides the output
    tensors (default torch.empty; the loader passes a BufferPool).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    alloc = alloc or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    keys = [s[0] for s in samples]
    conds = [tuple(s[3]) if len(s) > 3 else () for s in samples]
    _, lat0, txt0 = samples[0][:3]
    shape, dim = tuple(lat0.shape), txt0.shape[1]
    cond_shapes = _shapes(conds[0])
    lengths = [s[2].shape[0] for s in samples]
    max_len = max(lengths)
    latents = alloc((len(samples), *shape), output_dtype or lat0.dtype)
    text = alloc((len(samples), max_len, dim), output_dtype or txt0.dtype)
    mask = torch.zeros((len(samples), max_len), dtype=torch.bool)
    cond_latents = [alloc((len(samples), *cs), output_dtype or c.dtype) for cs, c in zip(cond_shapes, conds[0])]
    for i, sample in enumerate(samples):
        key, lat, txt = sample[:3]
        if tuple(lat.shape) != shape:
            raise ValueError(f"sample {key!r}: latent {tuple(lat.shape)} differs from {shape} in the same batch")
        if txt.shape[1] != dim:
            raise ValueError(f"sample {key!r}: text embedding is {txt.shape[1]} wide, others are {dim}")
        if _shapes(conds[i]) != cond_shapes:
            raise ValueError(f"sample {key!r}: condition latents {list(_shapes(conds[i]))} differ from "
                             f"{list(cond_shapes)} of {keys[0]!r} in the same batch (a batch must be one condition "
                             f"group: condition tokens cannot be padded)")
        latents[i].copy_(lat)
        for out, c in zip(cond_latents, conds[i]):
            out[i].copy_(c)
        n = lengths[i]
        text[i, :n].copy_(txt)
        if n < max_len:
            text[i, n:].zero_()
        mask[i, :n] = True
    return {"latents": latents, "text_embeds": text, "text_mask": mask, "keys": keys,
            "cond_latents": cond_latents, "task": "ti2i" if cond_shapes else "t2i"}


def _shapes(conds) -> tuple:
    return tuple(tuple(c.shape) for c in conds)


def _storage_use_count(t: torch.Tensor) -> int | None:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return None if fn is None else fn(t.untyped_storage()._cdata)


class BufferPool:
    """Recycles the memory of batches the train loop has let go of.

    Allocating fresh tens-of-MB tensors per batch costs a page fault per 4 KiB on first touch (on
    some VMs that alone is ~0.1-0.5 GB/s; pinned host memory for GPU copies is costlier still). A
    pooled buffer is handed out again only when nothing but the pool references its storage (the
    storage's use count is back to its baseline), so a batch the caller still holds is never
    overwritten. Without torch's use-count hook the pool degrades to plain allocation.
    """

    def __init__(self, max_buffers: int = 16, pin_memory: bool = False):
        self.max_buffers, self.pin_memory = max_buffers, pin_memory
        self._free_count = _storage_use_count(torch.empty(1))
        self._buffers: list[torch.Tensor] = []  # flat tensors owned by the pool
        self._lock = threading.Lock()

    def _new(self, numel: int, dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin_memory)

    def __call__(self, shape, dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        if self._free_count is None:
            return self._new(numel, dtype).view(shape)
        with self._lock:
            best, smaller = None, None
            for i, buf in enumerate(self._buffers):
                if buf.dtype != dtype or _storage_use_count(buf) != self._free_count:
                    continue
                if buf.numel() >= numel:
                    if best is None or buf.numel() < self._buffers[best].numel():
                        best = i
                elif smaller is None:
                    smaller = i
            if best is None:
                buf = self._new(numel, dtype)
                if len(self._buffers) < self.max_buffers:
                    self._buffers.append(buf)
                elif smaller is not None:  # grow: replace a free buffer that is too small
                    self._buffers[smaller] = buf
                return buf[:numel].view(shape)  # (not pooled if the pool is full of held buffers)
            return self._buffers[best][:numel].view(shape)
