"""MSRoPE: Qwen-Image's multimodal scalable rotary embedding (diffusers' QwenEmbedRope, scale_rope=True).

The head dim is split into three axes (frame, height, width; (16, 56, 56) at full size). Each axis rotates
interleaved pairs (x[2j], x[2j+1]) by angle pos * theta^(-2j / axis_dim).

Positions, per sample (every sample in a batch has the same image shapes):
- image i of the sample, token (f, y, x) of an (F, H, W) patch grid: (i + f, y - (H - H//2), x - (W - W//2)),
  i.e. rows and columns are centred: -(H - H//2) ... H//2 - 1;
- text token t: max over images of max(H//2, W//2), plus t, on all three axes.

Rather than diffusers' complex lookup tables (4096 positions precomputed), we compute cos/sin of
pos * inv_freq directly in float32 from the same integer positions and the same inverse frequencies, which
gives the same angles without a size limit, and apply them with real arithmetic (bf16-friendly).
"""
from __future__ import annotations

from typing import Sequence

import torch

ImageShape = tuple  # (frames, height, width) in patch units
TEXT_TABLE_STEP = 256  # text RoPE tables are cached for a multiple of this many positions


def normalize_img_shapes(img_shapes, batch_size: int) -> list[tuple[int, int, int]]:
    """Return the (frames, h, w) list of images of ONE sample, checking every sample has the same shapes.

    Accepts what diffusers accepts: a list with one entry per sample, each entry either a (f, h, w) tuple or a
    list of such tuples (several images per sample, e.g. edit models). A batch must share one image layout
    (our loader buckets by size); a mixed batch is refused rather than silently mis-positioned.
    """
    if img_shapes is None:
        raise ValueError("img_shapes is required: one (frames, height, width) per sample, in patch units")
    if isinstance(img_shapes, tuple) and len(img_shapes) == 3 and all(isinstance(v, int) for v in img_shapes):
        img_shapes = [img_shapes] * batch_size
    if len(img_shapes) != batch_size:
        raise ValueError(f"img_shapes has {len(img_shapes)} entries for a batch of {batch_size}")

    def one(entry):
        if isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(v, int) for v in entry):
            return [tuple(int(v) for v in entry)]
        return [tuple(int(v) for v in fhw) for fhw in entry]

    per_sample = [one(e) for e in img_shapes]
    if any(s != per_sample[0] for s in per_sample):
        raise ValueError(f"img_shapes must be the same for every sample of a batch, got {img_shapes}")
    for fhw in per_sample[0]:
        if len(fhw) != 3 or min(fhw) <= 0:
            raise ValueError(f"img_shapes entry {fhw} must be (frames, height, width), all positive")
    return per_sample[0]


def msrope_positions(images: Sequence[tuple[int, int, int]], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer positions [N_img, 3] and [text_len, 3] (frame, row, column axes) for one sample."""
    img_pos = []
    max_vid_index = 0
    for idx, (f, h, w) in enumerate(images):
        frames = torch.arange(f) + idx
        rows = torch.arange(h) - (h - h // 2)
        cols = torch.arange(w) - (w - w // 2)
        grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1)  # [f, h, w, 3]
        img_pos.append(grid.reshape(-1, 3))
        max_vid_index = max(max_vid_index, h // 2, w // 2)
    txt = (torch.arange(text_len) + max_vid_index)[:, None].expand(text_len, 3)
    return torch.cat(img_pos, dim=0), txt


class QwenMSRoPE(torch.nn.Module):
    """Produces (img_cos, img_sin, txt_cos, txt_sin), each [S, head_dim // 2] float32, for a batch layout."""

    CACHE_SIZE = 32  # image layouts; batches are bucketed by size, so a training run sees few distinct ones

    def __init__(self, axes_dims: Sequence[int], theta: int = 10000):
        super().__init__()
        self.axes_dims = tuple(int(a) for a in axes_dims)
        self.theta = theta
        self._cache: dict = {}

    def inv_freqs(self, axis: int) -> torch.Tensor:
        dim = self.axes_dims[axis]
        # Same expression as diffusers' rope_params: 1 / theta ** (arange(0, dim, 2) / dim), in float32.
        return 1.0 / torch.pow(self.theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[S, 3] integer positions -> [S, head_dim // 2] float32 angles (axis 0 pairs, then 1, then 2)."""
        return torch.cat([torch.outer(positions[:, a], self.inv_freqs(a)) for a in range(3)], dim=1)

    @torch.no_grad()
    def forward(self, images: Sequence[tuple[int, int, int]], text_len: int, device=None):
        """(img_cos, img_sin, txt_cos, txt_sin) for this image layout and text length.

        Cached per image layout and device; the text tables are kept for the longest text seen so far (grown
        to a multiple of TEXT_TABLE_STEP positions) and sliced, so the varying caption lengths of a run cause no new
        host-to-device copy (each copy from pageable memory would block the host)."""
        key = (tuple(tuple(fhw) for fhw in images), str(device))
        entry = self._cache.get(key)
        if entry is None or entry[2].shape[0] < text_len:
            capacity = -(-max(int(text_len), 1) // TEXT_TABLE_STEP) * TEXT_TABLE_STEP
            img_pos, txt_pos = msrope_positions(images, capacity)
            img_ang, txt_ang = self.angles(img_pos), self.angles(txt_pos)
            if entry is None and len(self._cache) >= self.CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            entry = tuple(t.to(device) for t in (img_ang.cos(), img_ang.sin(), txt_ang.cos(), txt_ang.sin()))
            self._cache[key] = entry
        img_cos, img_sin, txt_cos, txt_sin = entry
        return img_cos, img_sin, txt_cos[:text_len], txt_sin[:text_len]
