"""Compute-balanced global batches: how many samples a step takes from a bucket, so that every step costs
about the same whatever its resolution.

A step over one bucket costs, per MMDiT block and sample of S tokens (image tokens + caption tokens), about
24·h²·S FLOPs in the linear layers (each token through its stream's q/k/v, out and MLP weights, at an MLP of
4h) plus 4·h·S² in attention: the model FLOPs that MFU counts (megatron_qwen_image.flops). At h = 3072 a
1328² sample (6,889 image tokens) costs 5.4 times a 640² sample (1,600) without caption tokens, more than the
token count says: attention grows with S². A mixed 640p/1328p stage with one sample count per step makes its
1328p steps that much slower than its 640p ones, and its memory swing with them.

`BalancedBatches` sizes each bucket's global batch to the cost of `global_batch_size` samples at the
reference resolution, and its micro-batch to the cost of `micro_batch_size` reference samples (the memory
bound), rounded so that the global batch divides evenly into micro-batches over the data-parallel ranks.
Every DP rank thus runs the same number of micro-batches of the same bucket in a step: no rank waits for
another. An edit sample's condition images are image tokens too (after the target's, in the same attention), so
a group with condition images (`cond_shapes`, latent (C, h, w) each) counts them in its cost. Sizes depend on the bucket alone (not on the cache), so a streaming cache's new buckets are sized
the same way on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_qwen_image.flops import ModelDims, attention_flops, linear_flops

from .format import PATCH_SIZE, PIXEL_MULTIPLE

# The buckets of one family differ from base² pixels by a few per cent: a micro-batch may cost this much more
# than the reference one, so that they all keep the reference micro-batch size.
MEMORY_SLACK = 1.1


@dataclass(frozen=True)
class BalancedBatches:
    """Samples per global batch and per micro-batch by bucket (see the module docstring)."""

    global_batch_size: int      # samples per step at the reference resolution
    micro_batch_size: int       # samples per micro-batch at the reference resolution (bounds activation memory)
    reference_resolution: int   # the reference sample is reference_resolution² pixels (e.g. 640)
    text_tokens: int            # caption tokens assumed per sample in the cost
    hidden_size: int            # model width h: weighs attention (4·h·S²) against the linear layers (24·h²·S)
    data_parallel_size: int = 1
    ffn_hidden_size: int | None = None  # the MLP width (None: 4 x hidden_size, as diffusers)

    def __post_init__(self):
        for name in ("global_batch_size", "micro_batch_size", "reference_resolution", "hidden_size",
                     "data_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens={self.text_tokens!r} must be an integer >= 0")

    def sample_cost(self, width: int, height: int, cond_shapes: tuple = ()) -> float:
        """Forward FLOPs of one block for one sample of this pixel size (and these condition latents' (C, h, w)):
        linear layers + attention."""
        cond_tokens = sum((h // PATCH_SIZE) * (w // PATCH_SIZE) for _, h, w in cond_shapes)
        s = (width // PIXEL_MULTIPLE) * (height // PIXEL_MULTIPLE) + cond_tokens + self.text_tokens
        dims = ModelDims(hidden=self.hidden_size, ffn=self.ffn_hidden_size or 4 * self.hidden_size)
        return float(linear_flops(s, dims) + attention_flops(s, dims))

    def _ratio(self, bucket: tuple[int, int], cond_shapes: tuple) -> float:
        """Reference sample's cost / this group's sample cost."""
        ref = self.reference_resolution
        return self.sample_cost(ref, ref) / self.sample_cost(*bucket, cond_shapes)

    def micro_batch(self, bucket: tuple[int, int], cond_shapes: tuple = ()) -> int:
        """Samples per micro-batch of `bucket` (width, height), with condition latents `cond_shapes`: at most the
        reference micro-batch's cost (with MEMORY_SLACK); at least one sample."""
        return max(1, int(self.micro_batch_size * self._ratio(bucket, cond_shapes) * MEMORY_SLACK))

    def global_batch(self, bucket: tuple[int, int], cond_shapes: tuple = ()) -> int:
        """Samples per step of `bucket` (and `cond_shapes`): the multiple of micro_batch x DP closest to the
        reference step's cost."""
        unit = self.micro_batch(bucket, cond_shapes) * self.data_parallel_size
        return max(1, round(self.global_batch_size * self._ratio(bucket, cond_shapes) / unit)) * unit

    def step_cost(self, bucket: tuple[int, int], cond_shapes: tuple = ()) -> float:
        """Planned relative cost of one step of `bucket` (and `cond_shapes`; 1.0 = the reference step)."""
        ref = self.reference_resolution
        reference = self.global_batch_size * self.sample_cost(ref, ref)
        return self.global_batch(bucket, cond_shapes) * self.sample_cost(*bucket, cond_shapes) / reference
