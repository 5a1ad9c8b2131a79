"""SYNTHETIC stand-in for the latent cache (flagged: `--data synthetic`). Never real training data.

Yields the consumer's batch contract, like `megatron_qwen_image.cache.BucketedLoader`:
    {"latents": [B, 16, h, w] float32, "text_embeds": [B, L, D] (padded to the batch's longest),
     "text_mask": [B, L] bool (True = valid), "keys": list[str]}
where B = global_batch_size / dp_size is this data-parallel rank's share of the global batch.

The data is learnable, so that a short run shows a falling loss: each sample belongs to one of
`num_classes` classes; its latent is the class's smooth random pattern (resized to the batch's bucket)
plus a little noise, and its text embedding tokens are the class's random vector plus noise.

Determinism and sharding: global sample j (j = batch_index * global_batch_size + position) is generated
from a generator seeded by (seed, j) alone, and rank r of dp_size takes positions
[r * B, (r + 1) * B) of each global batch; each global batch has one bucket (latent size), chosen from
(seed, batch_index). So ranks of one TP group (same dp_rank) get identical batches, DP ranks get disjoint
parts of the same global batch, and the union over DP ranks does not depend on dp_size.
`state_dict()` / `load_state_dict()` hold the position (the next batch index).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

LATENT_CHANNELS = 16
VAE_FACTOR = 8


def _seed(*parts) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


@dataclass(frozen=True)
class _Sample:
    latent: torch.Tensor  # [16, h, w]
    text: torch.Tensor    # [L, D], unpadded
    key: str


class SyntheticLatentBatches(Iterator[dict]):
    """Deterministic synthetic batches in the cache loader's format (see module docstring)."""

    def __init__(self, global_batch_size: int, dp_rank: int, dp_size: int, seed: int, text_dim: int,
                 resolutions: Sequence[Sequence[int]] = ((64, 64),), text_len: Sequence[int] = (4, 16),
                 num_classes: int = 4, noise_std: float = 0.1):
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.global_batch_size, self.dp_rank, self.dp_size, self.seed = global_batch_size, dp_rank, dp_size, seed
        self.local_batch_size = global_batch_size // dp_size
        self.text_dim = text_dim
        self.latent_sizes = [(h // VAE_FACTOR, w // VAE_FACTOR) for h, w in resolutions]
        self.text_len = (int(text_len[0]), int(text_len[1]))
        self.num_classes = num_classes
        self.noise_std = noise_std
        self.batch_index = 0
        # per-class patterns: a coarse 4x4 random field upsampled per bucket, and a text vector
        self._patterns = [torch.randn(1, LATENT_CHANNELS, 4, 4, generator=_gen(seed, "pattern", c))
                          for c in range(num_classes)]
        self._text_vectors = [torch.randn(text_dim, generator=_gen(seed, "text", c)) for c in range(num_classes)]

    def _sample(self, j: int, size: tuple[int, int]) -> _Sample:
        g = _gen(self.seed, "sample", j)
        cls = int(torch.randint(self.num_classes, (1,), generator=g))
        pattern = F.interpolate(self._patterns[cls], size=size, mode="bilinear", align_corners=False)[0]
        latent = pattern + self.noise_std * torch.randn(pattern.shape, generator=g)
        length = int(torch.randint(self.text_len[0], self.text_len[1] + 1, (1,), generator=g))
        text = self._text_vectors[cls] + self.noise_std * torch.randn(length, self.text_dim, generator=g)
        return _Sample(latent, text, f"synthetic/{j:010d}")

    def __next__(self) -> dict:
        b = self.batch_index
        self.batch_index += 1
        bucket = int(torch.randint(len(self.latent_sizes), (1,), generator=_gen(self.seed, "bucket", b)))
        size = self.latent_sizes[bucket]
        first = b * self.global_batch_size + self.dp_rank * self.local_batch_size
        samples = [self._sample(j, size) for j in range(first, first + self.local_batch_size)]
        longest = max(s.text.shape[0] for s in samples)
        text = torch.zeros(len(samples), longest, self.text_dim)
        mask = torch.zeros(len(samples), longest, dtype=torch.bool)
        for i, s in enumerate(samples):
            text[i, : s.text.shape[0]] = s.text
            mask[i, : s.text.shape[0]] = True
        return {"latents": torch.stack([s.latent for s in samples]), "text_embeds": text, "text_mask": mask,
                "keys": [s.key for s in samples]}

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        self.batch_index = int(state["batch_index"])
